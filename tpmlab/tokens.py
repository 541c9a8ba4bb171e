"""The user's gateway token, read from the environment in one place.

Everything that talks to a gateway on the user's behalf (``tpmlab.connect(gateway=...)``,
the sidebar's usage panel) finds the token here when none is given. First set wins:

1. ``$TPMLAB_TOKEN``: a tpmlab API key that the gateway's administrators issued;
2. ``$TPMLAB_GATEWAY_TOKEN``: the same, under its older name;
3. ``$JUPYTERHUB_API_TOKEN``: the token every JupyterHub single-user server has (a gateway
   that trusts the Hub accepts it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

TOKEN_ENVS = ("TPMLAB_TOKEN", "TPMLAB_GATEWAY_TOKEN", "JUPYTERHUB_API_TOKEN")


def gateway_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The first of :data:`TOKEN_ENVS` set (non-empty) in ``environ`` (default: ``os.environ``)."""
    env = os.environ if environ is None else environ
    return next((env[name] for name in TOKEN_ENVS if env.get(name)), None)


def token_sources() -> str:
    """The variables, in order, as a message names them."""
    return ", ".join(f"${name}" for name in TOKEN_ENVS)
