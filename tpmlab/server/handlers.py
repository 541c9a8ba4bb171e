"""REST handlers under ``<base_url>tpmlab/api/``; every one requires an authenticated user.

| method | path | body | answer |
|---|---|---|---|
| GET | ``/tpmlab/api/status`` | | cluster, models, requests, usage, errors |
| GET | ``/tpmlab/api/models`` | | ``{"models": [...], "available": [...]}`` |
| POST | ``/tpmlab/api/models`` | ``{"name": str, "stages": int}`` | 202 ``{"name", "stages", "state": "deploying"}`` |
| DELETE | ``/tpmlab/api/models/<name>`` | | ``{"name", "removed": [keys]}`` |
| GET | ``/tpmlab/api/lenses`` | | ``{"lenses": [{"name", "title", "description", "inputs"}], "errors": {name: str}}`` |

Field by field: ``docs/rest-api.md``. Blocking cluster calls run on a worker thread, never
on the server's event loop; deploys (seconds to minutes) on a second one, so that status
polls keep answering while a model loads.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from traitlets import Dict, Float, Unicode, default
from traitlets.config import Configurable

from .state import GATEWAY_ENV, ClusterState, GatewayUsage

AUTH_RESOURCE = "tpmlab"
MAX_STAGES = 64


class TpmlabServer(Configurable):
    """Settings of the tpmlab server extension (``c.TpmlabServer.<name>`` in jupyter config)."""

    scheduler_address = Unicode(
        "", config=True,
        help="Dask scheduler the sidebar reports on and deploys to (e.g. tcp://host:8786). "
             "Default: $TPMLAB_SCHEDULER; empty: the embedded cluster, started on first deploy.")
    connect_timeout = Float(10.0, config=True, help="Seconds to wait for the scheduler.")
    embedded_options = Dict(config=True,
                            help="Options for tpmlab.connect() when it starts the embedded cluster.")

    gateway_url = Unicode(
        "", config=True,
        help="The deployment's gateway, asked for the user's usage (GET /v1/me) with the "
             "user's token ($TPMLAB_TOKEN, else $TPMLAB_GATEWAY_TOKEN, else "
             "$JUPYTERHUB_API_TOKEN: tpmlab.tokens). Default: "
             "$TPMLAB_GATEWAY; empty: no usage panel.")

    @default("scheduler_address")
    def _default_address(self) -> str:
        return os.environ.get("TPMLAB_SCHEDULER", "")

    @default("gateway_url")
    def _default_gateway(self) -> str:
        return os.environ.get(GATEWAY_ENV, "")


class _Base(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def state(self) -> ClusterState:
        return self.settings["tpmlab_state"]

    async def blocking(self, fn: Any, *args: Any) -> Any:
        pool: ThreadPoolExecutor = self.settings["tpmlab_pool"]
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def user_name(self) -> str | None:
        user = self.current_user
        return getattr(user, "username", None) or (user if isinstance(user, str) else None)

    def body(self) -> dict[str, Any]:
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError as e:
            raise web.HTTPError(400, f"the body is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        return data


class StatusHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.finish(json.dumps(await self.blocking(self.state.status, self.user_name())))


class ModelsHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        status = await self.blocking(self.state.status, self.user_name())
        available = await self.blocking(self.state.available)
        self.finish(json.dumps({"models": status["models"], "available": available,
                                "errors": status["errors"]}))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        data = self.body()
        name = data.get("name")
        stages = data.get("stages", 1)
        if not isinstance(name, str) or not name.strip():
            raise web.HTTPError(400, 'expected {"name": "<model>", "stages": <int>}; '
                                     f"got name={name!r}")
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= MAX_STAGES:
            raise web.HTTPError(400, f"stages must be an integer from 1 to {MAX_STAGES}; "
                                     f"got {stages!r}")
        name = name.strip()
        self.state.begin_deploy(name, stages)
        # Loading weights takes seconds to minutes: answer now, the status shows progress.
        # Deploys get their own thread so that status polls keep answering meanwhile.
        asyncio.get_running_loop().run_in_executor(self.settings["tpmlab_deploy_pool"],
                                                   self.state.deploy, name, stages)
        self.set_status(202)
        self.finish(json.dumps({"name": name, "stages": stages, "state": "deploying"}))


def lens_list() -> dict[str, Any]:
    """Every registered lens that keeps the lens contract, for the sidebar's lens menu, and
    the error of each plugin that does not load or does not keep it."""
    import tpmlab.lenses

    found, errors = tpmlab.lenses.catalog()
    return {"lenses": [info.to_dict() for info in found], "errors": errors}


class LensesHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        # Loading plugins imports their modules (torch, the first time): off the event loop.
        self.finish(json.dumps(await self.blocking(lens_list)))


class ModelHandler(_Base):
    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        removed = await self.blocking(self.state.undeploy, name)
        if not removed:
            raise web.HTTPError(404, f"model {name!r} is not deployed on this cluster")
        self.finish(json.dumps({"name": name, "removed": removed}))


def setup_handlers(server_app: Any) -> None:
    web_app = server_app.web_app
    config = TpmlabServer(config=server_app.config)
    base_url = web_app.settings.get("base_url", "/")
    state = ClusterState(config.scheduler_address or None, base_url=base_url,
                         hub_prefix=os.environ.get("JUPYTERHUB_SERVICE_PREFIX"),
                         connect_timeout=config.connect_timeout,
                         embedded_options=dict(config.embedded_options),
                         proxy=_server_proxy_enabled(server_app),
                         gateway=GatewayUsage.from_env({**os.environ,
                                                        GATEWAY_ENV: config.gateway_url}))
    pool = ThreadPoolExecutor(1, thread_name_prefix="tpmlab-server")
    web_app.settings["tpmlab_state"] = state
    web_app.settings["tpmlab_pool"] = pool
    web_app.settings["tpmlab_deploy_pool"] = ThreadPoolExecutor(1, thread_name_prefix="tpmlab-deploy")
    api = url_path_join(base_url, "tpmlab", "api")
    web_app.add_handlers(".*$", [
        (url_path_join(api, "status"), StatusHandler),
        (url_path_join(api, "models"), ModelsHandler),
        (url_path_join(api, "models", r"([^/]+)"), ModelHandler),
        (url_path_join(api, "lenses"), LensesHandler),
    ])

    def shutdown() -> None:
        pool.submit(state.close).result(timeout=30)
        pool.shutdown(wait=False)

    # Module extensions get no stop hook: close the client (and any embedded cluster) at exit.
    atexit.register(_quiet, shutdown)


def _server_proxy_enabled(server_app: Any) -> bool:
    """Whether jupyter-server-proxy is enabled in this server (its ``/proxy/<port>/`` route
    serves the Dask dashboard behind Jupyter's login)."""
    manager = getattr(server_app, "extension_manager", None)
    package = manager.extensions.get("jupyter_server_proxy") if manager is not None else None
    return bool(package is not None and package.enabled)


def _quiet(fn: Any) -> None:
    try:
        fn()
    except Exception:
        pass
