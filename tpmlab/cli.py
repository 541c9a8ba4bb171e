"""The ``tpmlab`` command: ``demo``, ``lab`` and the subcommands other parts register."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import TpmlabError
from .models.errors import ModelNotFoundError, UnsupportedArchitectureError

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
LOOPBACK = "127.0.0.1"
JUPYTER_STOP_TIMEOUT = 30.0  # seconds JupyterLab gets to shut its kernels down
# Ctrl-C, `kill`, the terminal closing: each stops `tpmlab lab` the same way
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def demo(prompt: str, model_name: str, top_k: int, address: str | None) -> str:
    """Layer by layer, the top tokens at the last position (logit lens), as a text table."""
    import tpmlab

    lab = tpmlab.connect(address or "local")
    model = lab.model(model_name)
    with model.trace(prompt):
        tops = []
        for layer in model.layers:
            probs = model.unembed(model.final_norm(layer.output[:, -1])).softmax(-1)
            tops.append(probs.topk(top_k).save())
    tok = model.tokenizer
    width = 14
    lines = [f"prompt: {prompt!r}   model: {model.name} ({model.version[:19]})",
             f"{'layer':>5}  " + "  ".join(f"{'top ' + str(i + 1):<{width + 7}}" for i in range(top_k))]
    for i, top in enumerate(tops):
        values, indices = top.value
        cells = [f"{tok.decode([int(t)])!r:<{width}} {float(p):6.1%}"
                 for p, t in zip(values[0], indices[0])]
        lines.append(f"{i:>5}  " + "  ".join(cells))
    lab.close()
    return "\n".join(lines)


def prepare() -> str:
    """Convert the default model (and its tokenizer) into ``$TPMLAB_HOME`` unless already
    there: the one slow step of a first deploy (dequantizing its GGUF file, 10-20 s on two
    cores), done at install time. Says where it is and how long it took."""
    import time

    from .models.default import ensure_model, ensure_tokenizer

    start = time.perf_counter()
    ensure_tokenizer()
    folder = ensure_model()
    return f"tpmlab: the default model is in {folder} ({time.perf_counter() - start:.1f} s)"


def jupyter_command(args: argparse.Namespace) -> list[str]:
    """The JupyterLab command line ``tpmlab lab`` runs."""
    notebooks = Path(args.notebook_dir or Path.cwd() / "notebooks")
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--ip={args.ip}", f"--port={args.port}",
           f"--notebook-dir={notebooks if notebooks.exists() else Path.cwd()}"]
    if args.no_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and HPC nodes often run as root
        cmd.append("--allow-root")
    return cmd


def lab_command(args: argparse.Namespace) -> int:
    """The main job: a local Dask cluster with the default model deployed as pipeline stages,
    and JupyterLab on this machine's loopback whose kernels and sidebar attach to it.

    The cluster speaks TLS under credentials made for it, written to a private folder for
    JupyterLab and its kernels (:mod:`tpmlab.cluster.security`) and removed at the end.
    Ctrl-C (or SIGTERM, or the terminal closing) stops JupyterLab, then the cluster,
    quietly; a second Ctrl-C while stopping ends everything at once.
    """
    session = LabSession(args)
    with _signals_raise_interrupt(*STOP_SIGNALS[1:]):
        try:
            return session.run()
        except KeyboardInterrupt:
            print("\ntpmlab: stopping JupyterLab and the cluster ...", file=sys.stderr,
                  flush=True)
            return 0
        except (TpmlabError, ModelNotFoundError, UnsupportedArchitectureError) as e:
            # a model that cannot be deployed, say: its message says what to do
            print(f"tpmlab lab: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            session.stop()


class LabSession:
    """What ``tpmlab lab`` starts, in order, and stops in reverse order."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cluster: Any = None
        self.lab: Any = None
        self.credentials: Path | None = None
        self.jupyter: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        from .cluster.embedded import start_local_cluster
        from .cluster.security import kernel_environment, write_credentials
        from .lab import connect
        from .models import resolve

        args = self.args
        resolve(args.model)  # a wrong name fails now, before the cluster starts
        print(f"tpmlab: starting a local Dask cluster (TLS) and deploying {args.model} "
              f"as {args.stages} stage(s) ...", flush=True)
        self.cluster = start_local_cluster(dashboard_address=f"{LOOPBACK}:0")
        address = self.cluster.scheduler_address
        self.credentials = write_credentials(self.cluster.security, address)
        self.lab = connect(address, security=self.cluster.security)
        model = self.lab.model(args.model, stages=args.stages)
        dashboard = self.cluster.scheduler.services.get("dashboard")
        print(f"tpmlab: {model!r} on {address}; only holders of the credentials in "
              f"{self.credentials} can reach it", flush=True)
        if dashboard is not None:  # reached through JupyterLab, behind its login
            print(f"tpmlab: Dask dashboard at <JupyterLab URL>/proxy/{dashboard.port}/status "
                  "(the sidebar links it)", flush=True)
        # Kernels started by this JupyterLab inherit the address and the credentials:
        # tpmlab.connect() attaches. Its own session, so that the terminal's Ctrl-C reaches
        # only this process, which stops JupyterLab in order.
        env = {**os.environ, **kernel_environment(self.credentials, address)}
        self.jupyter = subprocess.Popen(jupyter_command(args), env=env, start_new_session=True)
        return wait_interruptibly(self.jupyter)

    def stop(self) -> None:
        """Stop JupyterLab (its kernels first), then the cluster; delete the credentials."""
        previous = {s: signal.signal(s, self._force_stop) for s in STOP_SIGNALS}
        try:
            if self.jupyter is not None and self.jupyter.poll() is None:
                self.jupyter.terminate()  # Jupyter shuts its kernels down on SIGTERM
                try:
                    self.jupyter.wait(JUPYTER_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    _kill_group(self.jupyter.pid)
                    self.jupyter.wait()
            for part in (self.lab, self.cluster):
                if part is not None:
                    try:
                        part.close()
                    except Exception as e:  # stopping anyway: say what failed, no traceback
                        print(f"tpmlab: while stopping: {type(e).__name__}: {e}",
                              file=sys.stderr)
            self.lab = self.cluster = None
        finally:
            from .cluster.security import remove_credentials

            remove_credentials(self.credentials)
            self.credentials = None
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _force_stop(self, signum: int, frame: Any) -> None:
        """A second Ctrl-C (or SIGTERM) while stopping: kill JupyterLab and leave now (the
        workers exit with this process: distributed's worker processes watch their parent)."""
        if self.jupyter is not None:
            _kill_group(self.jupyter.pid)
        from .cluster.security import remove_credentials

        remove_credentials(self.credentials)
        os._exit(130)


def wait_interruptibly(proc: subprocess.Popen[bytes], poll: float = 0.5) -> int:
    """``proc.wait()`` that a Ctrl-C always interrupts.

    Never one blocking wait: the kernel may hand the terminal's SIGINT to another thread
    (the cluster's, the client's), and a main thread asleep in ``waitpid`` would not raise
    it until the process exited. A timed wait polls, and checks signals between polls."""
    while True:
        try:
            return proc.wait(timeout=poll)
        except subprocess.TimeoutExpired:
            continue


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


@contextlib.contextmanager
def _signals_raise_interrupt(*signums: int) -> Iterator[None]:
    """Turn these signals into KeyboardInterrupt (the path Ctrl-C takes) while inside."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpmlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="layer by layer top tokens for a prompt (logit lens)")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--address", default=None,
                   help="a Dask scheduler (tls://host:port); default: run in this process")

    p = sub.add_parser("prepare", help="convert the default model once into $TPMLAB_HOME "
                       "(setup runs it, so that a first notebook does not wait for it)")

    p = sub.add_parser("lab", help="a local Dask cluster with the default model, and JupyterLab")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--ip", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8888)
    p.add_argument("--notebook-dir", default=None)
    p.add_argument("--no-browser", action="store_true")

    for module in ("tpmlab.store.cli", "tpmlab.gateway.cli", "tpmlab.hub.config"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except (ImportError, AttributeError):
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        print(demo(args.prompt, args.model, args.top_k, args.address))
        return 0
    if args.command == "prepare":
        try:
            print(prepare())
        except (ModelNotFoundError, OSError) as e:  # no weights package, a home not writable
            print(f"tpmlab prepare: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "lab":
        return lab_command(args)
    handler = getattr(args, "func", None) or getattr(args, "handler", None)
    if handler is None:
        raise SystemExit(f"tpmlab: no handler for {args.command!r}")
    result = handler(args)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
