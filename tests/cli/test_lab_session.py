"""``tpmlab lab`` for real: a TLS cluster with tiny-llama as 2 stages and JupyterLab on a
free loopback port, in a subprocess of its own session (as a terminal runs it). A kernel
that JupyterLab starts attaches with no step of the user's and runs a trace; the sidebar's
API reports the cluster and links the dashboard behind Jupyter's login; Ctrl-C stops
everything quietly and leaves no process and no credentials behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
psutil = pytest.importorskip("psutil")

START_TIMEOUT = 420.0  # seconds: cluster, deploy and JupyterLab on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningLab:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, runtime: Path) -> None:
        self.proc, self.log, self.runtime = proc, log, runtime
        self.url = self.token = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, *, token: bool = True) -> tuple[int, bytes]:
        headers = {"Authorization": f"token {self.token}"} if token else {}
        request = urllib.request.Request(f"{self.url}{path.lstrip('/')}", headers=headers)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_until_served(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tpmlab lab exited with {self.proc.returncode}:\n"
                            f"{self.output()[-4000:]}")
            servers = sorted(self.runtime.glob("jpserver-*.json"))
            if servers:
                info = json.loads(servers[0].read_text())
                self.url, self.token = info["url"], info["token"]
                try:
                    code, body = self.get("tpmlab/api/status")
                    if code == 200 and json.loads(body)["models"]:
                        return
                except OSError:
                    pass
            time.sleep(1)
        pytest.fail(f"JupyterLab did not answer in {START_TIMEOUT:.0f}s:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect to the login page is an answer
        return None


def _sigint_as_at_a_terminal() -> None:
    """SIGINT's default disposition in the child, as a command typed at a terminal has it:
    a suite started in the background by a non-interactive shell inherits SIGINT ignored,
    and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def running_lab(tmp_path_factory):
    home = tmp_path_factory.mktemp("lab-home")
    runtime = home / "runtime"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TPMLAB_SCHEDULER", "TPMLAB_CLUSTER_CREDENTIALS",
                        "JUPYTERHUB_SERVICE_PREFIX", "JUPYTER_TOKEN")}
    env.update(HOME=str(home), JUPYTER_RUNTIME_DIR=str(runtime),
               JUPYTERLAB_WORKSPACES_DIR=str(home), PYTHONUNBUFFERED="1")
    script = Path(sys.executable).with_name("tpmlab")  # the console script `make lab` runs
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tpmlab.cli"]
    log = home / "lab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command + ["lab", "--model", "tiny-llama", "--stages", "2", "--no-browser",
                       "--port", str(_free_port()), "--notebook-dir", str(home)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_sigint_as_at_a_terminal)
    lab = RunningLab(proc, log, runtime)
    try:
        lab.wait_until_served()
        yield lab
    finally:
        lab.stop()


def _execute(lab: RunningLab, code: str, timeout: float = 300.0) -> str:
    """Start a kernel through JupyterLab's REST API, run ``code`` over the kernel's websocket
    (Jupyter's message protocol), return its stdout; fail with the kernel's traceback."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    request = urllib.request.Request(f"{lab.url}api/kernels", data=b"{}", method="POST",
                                     headers={"Authorization": f"token {lab.token}"})
    kernel = json.loads(urllib.request.urlopen(request, timeout=60).read())["id"]
    session, msg_id = uuid.uuid4().hex, uuid.uuid4().hex

    async def run() -> str:
        ws_url = lab.url.replace("http", "ws", 1) + f"api/kernels/{kernel}/channels?session_id={session}"
        ws = await websocket_connect(HTTPRequest(ws_url, connect_timeout=60, headers={
            "Authorization": f"token {lab.token}"}))
        await ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": session,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
        out: list[str] = []
        while True:
            raw = await asyncio.wait_for(ws.read_message(), timeout)
            assert raw is not None, "the kernel's websocket closed"
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                out.append(content["text"])
            elif kind == "error":
                pytest.fail("the kernel raised:\n" + "\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                ws.close()
                return "".join(out)

    return asyncio.run(run())


TRACE_IN_A_KERNEL = """
import json, torch, tpmlab
from distributed import Client

lab = tpmlab.connect()                  # no address: $TPMLAB_SCHEDULER, set by tpmlab lab
model = lab.model("tiny-llama")         # the lab's own deployment: attached, not deployed again
with model.trace("The Eiffel Tower is in"):
    hidden = model.layers[2].output.save()
    logits = model.output.logits.save()
with tpmlab.connect("local") as local:
    ref = local.model("tiny-llama")
    with ref.trace("The Eiffel Tower is in"):
        ref_logits = ref.output.logits.save()
address = lab.backend.client.scheduler.address
with Client(address, timeout=60) as plain:   # a bare Dask client finds the credentials too
    workers = len(plain.scheduler_info()["workers"])
print("RESULT", json.dumps({
    "scheme": address.split("://")[0], "stages": len(model.info.stage_starts),
    "shape": list(hidden.value.shape), "workers": workers,
    "same": torch.allclose(logits.value, ref_logits.value, atol=1e-5, rtol=1e-5)}))
lab.close()
"""


def test_a_kernel_of_the_lab_attaches_and_runs_a_trace(running_lab):
    out = _execute(running_lab, TRACE_IN_A_KERNEL)
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    assert result["scheme"] == "tls" and result["stages"] == 2, result
    assert result["shape"][0] == 1 and result["same"] and result["workers"] >= 2, result


def test_the_sidebar_reaches_the_cluster_and_links_the_dashboard_behind_the_login(running_lab):
    code, body = running_lab.get("tpmlab/api/status")
    status = json.loads(body)
    assert code == 200 and status["errors"] == [], status["errors"]
    cluster = status["cluster"]
    assert cluster["connected"] and cluster["address"].startswith("tls://127.0.0.1:")
    assert [m["name"] for m in status["models"]] == ["tiny-llama"]
    link = cluster["dashboard"]
    port = int(link["direct"].rsplit(":", 1)[1].split("/")[0])
    assert link["url"] == f"/proxy/{port}/status"
    code, page = running_lab.get(link["url"])
    assert code == 200 and b"Dask" in page
    code, _ = running_lab.get(link["url"], token=False)
    assert code in (302, 401, 403)  # Jupyter's login, not the dashboard


def test_ctrl_c_stops_jupyterlab_and_the_cluster_quietly(running_lab):
    proc = running_lab.proc
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3  # JupyterLab and the two stage workers, at least
    folders = list(running_lab.runtime.glob("tpmlab-cluster-*"))
    assert len(folders) == 1
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    assert proc.wait(120) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]
    output = running_lab.output()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-4000:]
    assert "tpmlab: stopping JupyterLab and the cluster" in output
    assert not folders[0].exists()  # the credentials go with the cluster


def test_a_model_that_cannot_be_found_is_one_line_and_starts_nothing(tmp_path):
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)}
    script = Path(sys.executable).with_name("tpmlab")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tpmlab.cli"]
    proc = subprocess.run(command + ["lab", "--model", "no-such-model", "--no-browser"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert "no-such-model" in proc.stderr and "Traceback" not in proc.stderr
    assert "starting a local Dask cluster" not in proc.stdout
    assert not list(tmp_path.glob("tpmlab-cluster-*"))


def test_a_ctrl_c_taken_by_another_thread_still_stops_the_wait():
    """The kernel may deliver the terminal's SIGINT to any thread that does not block it;
    the main thread waiting for JupyterLab must still raise KeyboardInterrupt (a blocking
    waitpid would sleep on until JupyterLab exited)."""
    import threading

    from tpmlab.cli import wait_interruptibly

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"])
    # Python's own Ctrl-C handler, whatever this suite inherited (see _sigint_as_at_a_terminal)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    other = threading.Thread(target=lambda: (time.sleep(0.5),
                                             signal.pthread_kill(threading.get_ident(),
                                                                 signal.SIGINT)))
    try:
        other.start()
        with pytest.raises(KeyboardInterrupt):
            wait_interruptibly(proc)
        assert proc.poll() is None  # raised while JupyterLab still ran, not once it exited
    finally:
        other.join()
        signal.signal(signal.SIGINT, previous)
        proc.kill()
        proc.wait()
