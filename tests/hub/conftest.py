"""One real JupyterHub on 127.0.0.1 for the package: DummyAuthenticator, single-user servers
as local processes (SimpleLocalProcessSpawner: no system users), configurable-http-proxy from
npm, and the configuration `tpmlab hub-config` writes, as an administrator would use it: the
tpmlab gateway as a Hub-managed service on the in-process engine with the default model.
Beside it, as a second Hub-managed service, dask-gateway-server (its local backend, Hub
authentication) and, for alice only, a TLS Dask cluster her sidebar reports on (its dashboard
reached through the Hub's proxy).

The Hub is started once, bounded in time, and stopped (with its services, its proxy and the
single-user servers) by the fixture."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHP = BIN / "configurable-http-proxy"
MODEL = "smollm2-135m"
USERS = ("alice", "bob")
START_TIMEOUT = 240.0  # seconds for the Hub, its services and a single-user server

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Hub:
    """The running Hub: its public URL, the test's admin token, the users' password."""

    url: str
    api_url: str  # the Hub's own API, not through the proxy
    api_token: str
    password: str
    root: Path
    gateway_url: str  # the tpmlab gateway through the Hub's proxy
    ledger_url: str
    dask_gateway_url: str
    dask_gateway_proxy: str
    log: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, f"{self.api_url}{path}", timeout=30,
                             headers={"Authorization": f"token {self.api_token}"}, **kw)

    def home(self, user: str) -> Path:
        return self.root / "home" / user

    def token(self, user: str, scopes: list[str] | None = None) -> str:
        """A new API token of ``user`` (with the user's own permissions unless ``scopes``)."""
        body = {"note": "test", "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = scopes
        r = self.api("POST", f"/users/{user}/tokens", json=body)
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def _hub_config(*, root: Path, ports: dict[str, int], password: str, admin_token: str,
                fragment: str, extra: dict[str, dict]) -> str:
    """The test's jupyterhub_config.py: what a test Hub needs, then the fragment exactly as
    `tpmlab hub-config` wrote it, then dask-gateway as a second service."""
    py = sys.executable
    return f"""
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {ports['public']}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {ports['hub']}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{ports['proxy_api']}"
c.ConfigurableHTTPProxy.command = [{str(CHP)!r}]
c.JupyterHub.db_url = "sqlite:///{root}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{root}/cookie_secret"
c.JupyterHub.pid_file = "{root}/jupyterhub.pid"
c.JupyterHub.cleanup_servers = True
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {password!r}
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "{root}/home/{{username}}"
c.Spawner.cmd = [{py!r}, "-m", "jupyterhub.singleuser"]
c.Spawner.args = ["--allow-root", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                  "--LabApp.news_url=None"]
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
c.JupyterHub.services = []
c.JupyterHub.load_roles = []
c.Spawner.environment = {{}}
# dask-gateway, a Hub-managed service: Hub users create their own clusters there
# (first: the Hub starts services one after the other, and it starts at once).
c.JupyterHub.services.append({{
    "name": "dask-gateway",
    "command": [{py!r}, "-m", "dask_gateway_server", "-f", "{root}/dask_gateway_config.py"],
    "environment": {{"TPMLAB_HOME": {os.environ['TPMLAB_HOME']!r}}},
}})

# ---- `tpmlab hub-config` ----
{fragment}
# ---- end ----

# The test drives the Hub with a service token of its own.
c.JupyterHub.services.append({{"name": "test-admin", "api_token": {admin_token!r}}})
c.JupyterHub.load_roles.append({{"name": "test-admin", "services": ["test-admin"],
                                 "scopes": ["admin:users", "admin:servers", "tokens"]}})

# Per-user extras (alice's sidebar reports on her own TLS cluster).
EXTRA = {extra!r}


def _extras(spawner):
    more = EXTRA.get(spawner.user.name, {{}})
    spawner.environment.update(more.get("env", {{}}))
    spawner.args = [*spawner.args, *more.get("args", [])]


c.Spawner.pre_spawn_hook = _extras
"""


def _dask_gateway_config(root: Path, ports: dict[str, int]) -> str:
    return f"""
c = get_config()  # noqa
c.DaskGateway.address = "127.0.0.1:{ports['dg_api']}"
c.Proxy.address = "127.0.0.1:{ports['dg_http']}"
c.Proxy.tcp_address = "127.0.0.1:{ports['dg_tcp']}"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.JupyterHubAuthenticator"
# Local processes as the gateway's own user: the local backend without its setuid step.
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.UnsafeLocalBackend.clusters_directory = "{root}/dask-clusters"
c.ClusterConfig.scheduler_cmd = [{sys.executable!r}, "-m", "distributed.cli.dask_scheduler"]
c.ClusterConfig.worker_cmd = [{sys.executable!r}, "-m", "distributed.cli.dask_worker"]
c.ClusterConfig.worker_cores = 1
c.ClusterConfig.worker_threads = 1
c.ClusterConfig.worker_memory = "3 G"
c.ClusterConfig.scheduler_memory = "1 G"
c.ClusterConfig.environment = {{"TPMLAB_HOME": {os.environ['TPMLAB_HOME']!r},
                                "OMP_NUM_THREADS": "1"}}
c.ClusterConfig.idle_timeout = 600
"""


@pytest.fixture(scope="package")
def alice_cluster(tmp_path_factory):
    """A TLS Dask cluster of alice's (as `tpmlab lab` starts one), dashboard on loopback."""
    import logging

    from distributed import LocalCluster

    from tpmlab.cluster.security import new_security, write_credentials

    security = new_security()
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls",
                           host="127.0.0.1", dashboard_address="127.0.0.1:0",
                           security=security, silence_logs=logging.ERROR)
    folder = write_credentials(security, cluster.scheduler_address,
                               root=tmp_path_factory.mktemp("alice-credentials"))
    yield cluster, folder
    cluster.close()


@pytest.fixture(scope="package")
def hub(tmp_path_factory, alice_cluster):
    from tpmlab.hub.config import HubConfig, render

    if not CHP.exists():
        pytest.fail(f"{CHP} is missing: scripts/setup.sh installs configurable-http-proxy")
    root = tmp_path_factory.mktemp("hub")
    ports = {k: free_port() for k in ("public", "hub", "proxy_api", "gateway", "dg_api",
                                      "dg_http", "dg_tcp")}
    public = f"http://127.0.0.1:{ports['public']}"
    password, admin_token = secrets.token_hex(8), secrets.token_hex(24)
    ledger = f"sqlite:///{root}/ledger.db"
    fragment = render(HubConfig(
        public_url=public, port=ports["gateway"], db=ledger, models=[MODEL],
        command=[sys.executable, "-m", "tpmlab.cli"],
        # A request holds its worst case, sized from the gateway's calibration at start; a
        # busy machine inflates that (a CPU-bound neighbour made one short trace hold 1,536
        # SU, over the default first allocation of 1,000): room for that, usage still shows.
        hub_units=1_000_000.0,
        environment={"TPMLAB_HOME": os.environ["TPMLAB_HOME"]},
        grants=["access:services!service=dask-gateway"]))
    cluster, credentials = alice_cluster
    extra = {"alice": {"env": {"TPMLAB_CLUSTER_CREDENTIALS": str(credentials)},
                       "args": [f"--TpmlabServer.scheduler_address={cluster.scheduler_address}"]}}
    (root / "jupyterhub_config.py").write_text(_hub_config(
        root=root, ports=ports, password=password, admin_token=admin_token,
        fragment=fragment, extra=extra))
    (root / "dask_gateway_config.py").write_text(_dask_gateway_config(root, ports))
    for user in USERS:
        (root / "home" / user).mkdir(parents=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_SERVICE_PREFIX", "TPMLAB_GATEWAY",
                "TPMLAB_SCHEDULER", "TPMLAB_CLUSTER_CREDENTIALS"):
        env.pop(key, None)
    log = root / "jupyterhub.log"
    proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f",
                             str(root / "jupyterhub_config.py")],
                            cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    h = Hub(url=public, api_url=f"http://127.0.0.1:{ports['hub']}/hub/api",
            api_token=admin_token, password=password, root=root,
            gateway_url=f"{public}/services/tpmlab", ledger_url=ledger,
            dask_gateway_url=f"http://127.0.0.1:{ports['dg_http']}",
            dask_gateway_proxy=f"gateway://127.0.0.1:{ports['dg_tcp']}", log=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        _wait(lambda: h.api("GET", "").status_code == 200, proc, h, deadline, "the Hub")
        for user in USERS:  # start both servers now: they come up while the gateway loads
            assert h.api("POST", f"/users/{user}").status_code in (201, 409)
            assert h.api("POST", f"/users/{user}/server").status_code in (201, 202)
        _wait(lambda: httpx.get(f"{h.gateway_url}/health", timeout=10).status_code == 200,
              proc, h, deadline, "the tpmlab gateway service")
        _wait(lambda: httpx.get(f"{h.dask_gateway_url}/api/health",
                                timeout=10).status_code == 200,
              proc, h, deadline, "dask-gateway")
        for user in USERS:
            _wait(lambda u=user: h.api("GET", f"/users/{u}").json()["servers"][""]["ready"],
                  proc, h, deadline, f"{user}'s server")
        yield h
    finally:
        _stop(proc, root)


def _wait(ready, proc, hub: Hub, deadline: float, what: str) -> None:
    while True:
        try:
            if ready():
                return
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not come up; the Hub's log ends:\n{hub.tail()}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, root: Path) -> None:
    """SIGTERM: the Hub stops the single-user servers, its services and its proxy. Then
    whatever is left of this Hub's processes (a Hub that died leaves its services): those
    run from, or name, this Hub's own folder."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()
    for left in _processes_of(root):
        try:
            left.kill()
        except Exception:
            pass


def _processes_of(root: Path) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if p.pid == os.getpid():
            continue
        cmd, cwd = " ".join(p.info.get("cmdline") or []), p.info.get("cwd") or ""
        if str(root) in cmd or cwd.startswith(str(root)):
            found.append(p)
    return found


@pytest.fixture(scope="package")
def chromium():
    """The system's Chromium through Playwright (never a downloaded browser)."""
    from tests.ui.test_sidebar_browser import CHROMIUM, CHROMIUM_FLAGS

    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: scripts/system-packages.sh installs it")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def login(browser, hub: Hub, user: str):
    """A browser context logged in to the Hub as ``user``, its page on the user's JupyterLab."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(f"{hub.url}/hub/login?next=/user/{user}/lab", timeout=60_000)
    page.fill("#username_input", user)
    page.fill("#password_input", hub.password)
    page.click("#login_submit")
    page.wait_for_url(f"**/user/{user}/lab**", timeout=120_000)
    return context, page


def write_notebook(path: Path, cells: list[str]) -> None:
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {},
                     "outputs": [], "source": src} for src in cells],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                      "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
