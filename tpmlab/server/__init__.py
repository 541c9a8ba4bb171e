"""Jupyter server extension: the REST API under ``/tpmlab/api/`` that the sidebar polls.

Enabled by ``jupyter-config/jupyter_server_config.d/tpmlab.json`` (installed with the
package). Which cluster it reports on: ``c.TpmlabServer.scheduler_address`` or the
``TPMLAB_SCHEDULER`` environment variable; with neither, the first deploy action starts
the embedded cluster through ``tpmlab.connect()``. The endpoints are documented in
``docs/rest-api.md``.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "tpmlab.server"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    from .handlers import setup_handlers

    setup_handlers(server_app)
    server_app.log.info("tpmlab server extension loaded: /tpmlab/api/")


# older name, still looked up by some servers
load_jupyter_server_extension = _load_jupyter_server_extension
