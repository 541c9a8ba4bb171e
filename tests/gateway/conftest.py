"""Gateway fixtures: tiny-llama in process, gateways on 127.0.0.1 with a real SQLite
ledger, users of every tier, a fake JupyterHub, and a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

MODEL = "tiny-llama"
PG_BIN = Path(os.environ.get("TPMLAB_PG_BIN", "/usr/lib/postgresql/15/bin"))


@pytest.fixture(scope="session")
def engine_backend():
    from tpmlab.runtime.backend import LocalBackend

    backend = LocalBackend(device="cpu", dtype=torch.float32)
    backend.deploy(MODEL)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def cost_model():
    from tpmlab.gateway.units import CostModel

    return CostModel(fixed_seconds=0.01, seconds_per_token=0.001)


def make_gateway(backend, db_url, cost_model, **config):
    from tpmlab.gateway.core import Gateway, GatewayConfig
    from tpmlab.gateway.ledger import Ledger

    config.setdefault("learn_costs", False)  # the tests' numbers are priced by cost_model
    cfg = GatewayConfig(models=[MODEL], cost_models={MODEL: cost_model}, **config)
    return Gateway(backend, Ledger(db_url), cfg)


class Served:
    """A gateway on 127.0.0.1 with one API key per tier (``keys[tier]``)."""

    def __init__(self, gateway, server, keys):
        self.gateway, self.server, self.keys = gateway, server, keys
        self.url = server.url

    def client(self, tier_or_key):
        import httpx

        key = self.keys.get(tier_or_key, tier_or_key)
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"},
                            timeout=120)

    def lab(self, tier):
        import tpmlab

        return tpmlab.connect(gateway=self.url, token=self.keys[tier])


def serve(gateway, hub=None, units=10_000.0):
    from tpmlab.gateway.app import create_app
    from tpmlab.gateway.server import ServerThread

    keys = {}
    for tier in ("query", "embed", "inspect", "intervene", "gradients", "admin"):
        gateway.ledger.create_user(f"{tier}-user", tier, units=units)
        keys[tier] = gateway.ledger.create_key(f"{tier}-user")
    server = ServerThread(create_app(gateway, hub=hub)).start()
    return Served(gateway, server, keys)


@pytest.fixture(scope="module")
def served(engine_backend, cost_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("ledger") / "ledger.db"
    s = serve(make_gateway(engine_backend, f"sqlite:///{db}", cost_model, batch_window=0.02))
    yield s
    s.server.stop()


@pytest.fixture(scope="module")
def lab_model(served):
    """The client-side model (a proxy: plans are recorded here and sent nowhere)."""
    lab = served.lab("intervene")
    yield lab.model(MODEL)
    lab.close()


# -- a fake JupyterHub ------------------------------------------------------------------------------
class FakeHub:
    """``GET /hub/api/user`` answering for the tokens in ``users`` (token -> name)."""

    def __init__(self, users: dict[str, str]):
        self.users = users
        self.calls = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hub.calls += 1
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("token ") if auth.startswith("token ") else None
                if self.path != "/hub/api/user" or token not in hub.users:
                    self.send_response(403)
                    self.end_headers()
                    self.wfile.write(b'{"status": 403, "message": "Forbidden"}')
                    return
                body = json.dumps({"kind": "user", "name": hub.users[token], "admin": False,
                                   "groups": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hub/api"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_hub():
    hub = FakeHub({"hub-token-of-carol": "carol"})
    yield hub
    hub.stop()


# -- a real PostgreSQL ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of our own: initdb into a tmp dir, pg_ctl start on a free
    127.0.0.1 port (as the ``postgres`` user when the tests run as root)."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} "
                    "(scripts/system-packages.sh installs them)")
    pytest.importorskip("psycopg", reason="psycopg (v3) is the PostgreSQL driver")
    # pytest's own tmp dirs are private to root; the server's user needs its own dir
    root = Path(tempfile.mkdtemp(prefix="tpmlab-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to start PostgreSQL as 'postgres'")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        for p in (root, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(root, 0o755)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *cmd: subprocess.run(prefix + list(cmd), check=True, capture_output=True,  # noqa: E731
                                      text=True, timeout=120)
    run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "tpmlab", "--auth=trust", "-E", "UTF8",
        "--no-sync")
    run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
        "-o", f"-h 127.0.0.1 -p {port} -k {sock} -F", "start")
    try:
        run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tpmlab",
            "tpmlab_test")
        yield f"postgresql+psycopg://tpmlab@127.0.0.1:{port}/tpmlab_test"
    finally:
        subprocess.run(prefix + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                                 "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


# -- gateways as separate processes -----------------------------------------------------------------
class GatewayProcess:
    """``tpmlab gateway`` (the real CLI) in its own process on a free 127.0.0.1 port, serving
    tiny-llama from ``db`` with a pinned cost model (so every gateway prices alike)."""

    def __init__(self, db: str, *args: str, cost: str = "0.01,0.001"):
        import sys

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tpmlab.cli", "gateway", "--model", MODEL, "--db", db,
               "--port", str(self.port), "--cost-model", cost, "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def wait_ready(self, timeout: float = 180.0) -> GatewayProcess:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the gateway on {self.url} did not start within {timeout:g} s")

    def kill(self) -> None:
        """kill -9: no clean shutdown, as in a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def fresh_postgres(url: str) -> str:
    """``url`` with the gateway's tables dropped (a clean ledger)."""
    from sqlalchemy import create_engine

    from tpmlab.gateway.ledger import Base

    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    return url


def raw_request(url: str, request_line: str, headers: dict[str, str], body: bytes = b"",
                timeout: float = 30.0) -> bytes:
    """Send an HTTP/1.1 request byte for byte (clients refuse to send malformed ones) and
    return what came back (b"" if the server closed the connection without answering)."""
    host, port = url.removeprefix("http://").split(":")
    head = [request_line, f"Host: {host}:{port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:  # closed on us while sending: read what it said
            pass
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)
