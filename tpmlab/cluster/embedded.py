"""The cluster ``tpmlab.connect()`` starts when given no address: a Dask ``LocalCluster`` of
worker *processes* sized to this machine, reachable only by holders of its credentials.

* TLS with mutual certificate checks under credentials made for this cluster
  (:mod:`.security`), scheduler and workers on ``127.0.0.1``, the dashboard (if any) too.
* Worker processes never see SIGINT: a Ctrl-C in the terminal, or Jupyter interrupting
  the kernel (it signals the kernel's whole process group), stops the user's code, not
  the stages. The nanny stops its workers when the cluster closes, and a worker whose
  parent dies exits at once (distributed watches the parent).
* A script that would start the cluster at import time, outside
  ``if __name__ == "__main__":``, stops with one line saying so: worker processes are
  spawned, and spawning re-runs the main script in each of them.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed import LocalCluster
from distributed.security import Security

from .security import new_security
from .warm_start import WORKER_ENV, forked_workers

LOOPBACK = "127.0.0.1"


def default_workers() -> int:
    """One worker process per core, at least 2 (room for two stages) and at most 4."""
    return max(2, min(os.cpu_count() or 1, 4))


def start_local_cluster(n_workers: int | None = None, *, security: Security | None = None,
                        warm_start: bool = True, **options: Any) -> LocalCluster:
    """Start a LocalCluster of ``n_workers`` single-threaded processes (stage compute runs in
    its own thread and uses all cores: torch threads are the stage's ``threads``, default
    the machine's cores, since the stages of a request run one after another; the
    ``OMP_NUM_THREADS=1`` Dask puts in a worker's environment comes after torch loaded in
    the forkserver, and a stage sets its threads itself, in its compute thread too:
    :mod:`~tpmlab.runtime.compute_threads`); idle stages' OpenMP threads sleep
    after a short spin, :data:`~.warm_start.WORKER_ENV`),
    speaking TLS under ``security`` (default: :func:`~.security.new_security`, made for
    this cluster; ``cluster.security`` holds it). ``dashboard_address``: ``None`` (default)
    or a port, served on 127.0.0.1 (give a host to bind another interface).

    With CUDA devices present and dask-cuda installed, a ``LocalCUDACluster`` (one worker
    per GPU, each advertising ``GPU=1``) is started instead; without dask-cuda, one worker
    advertising all the GPUs (``GPU=n``, a stage per device).

    ``warm_start``: fork the workers from a server process that imported torch and
    transformers once (:mod:`.warm_start`) instead of spawning interpreters that each
    import them again.
    """
    refuse_unguarded_main()
    if options.setdefault("protocol", "tls://").rstrip(":/") != "tls":
        raise ValueError(f"the embedded cluster speaks TLS only, not {options['protocol']!r}")
    options["security"] = security or new_security()
    options.setdefault("host", LOOPBACK)
    options["dashboard_address"] = loopback_address(options.get("dashboard_address"))
    if options["dashboard_address"] is None:  # its plain HTTP routes: not on port 8787
        options["scheduler_kwargs"] = {"dashboard_address": f"{LOOPBACK}:0",
                                       **options.get("scheduler_kwargs", {})}
    options.setdefault("silence_logs", logging.ERROR)
    options["env"] = {**WORKER_ENV, **options.get("env", {})}
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch is a dependency
        gpus = 0
    with sigint_blocked(), forked_workers(options["env"], warm_start):  # see the module docstring
        if gpus and n_workers is None:
            try:
                from dask_cuda import LocalCUDACluster

                return LocalCUDACluster(resources={"GPU": 1}, **options)
            except ImportError:  # one worker holding every GPU, one stage per GPU
                return LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                    resources={"GPU": gpus}, **options)
        return LocalCluster(n_workers=n_workers or default_workers(), threads_per_worker=1,
                            processes=True, **options)


def loopback_address(address: str | int | None) -> str | None:
    """A dashboard address with no host (``":8787"``, ``8787``) bound to 127.0.0.1, where
    distributed would bind every interface; ``None`` and addresses with a host unchanged."""
    if address is None:
        return None
    text = str(address)
    host, _, port = text.rpartition(":") if ":" in text else ("", "", text)
    return f"{LOOPBACK}:{port or 0}" if not host else text


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while the cluster starts.

    The cluster's event-loop thread is created here and inherits the mask; so do the
    threads it starts to spawn worker processes (now and when a nanny restarts one), and
    so do those processes: the terminal's or Jupyter's SIGINT never reaches a worker. A
    SIGINT meant for this process stays pending (or goes to another thread) and is raised
    as usual once the cluster has started.
    """
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    # multiprocessing starts its resource tracker on the first spawn and then *unblocks*
    # SIGINT in the spawning thread: start it first, while nothing is blocked
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- scripts without a main guard -----------------------------------------------------------------
def refuse_unguarded_main() -> None:
    """Exit with one line (``SystemExit``) if the main script's top-level code is running
    this call outside an ``if __name__ == "__main__":`` block.

    Worker processes are started with multiprocessing's "spawn" (distributed's default),
    which runs the main script again in each of them; an unguarded ``tpmlab.connect()``
    would start a cluster from every worker, and distributed fails with "Nanny failed to
    start" and a long traceback. Notebooks, ``python -c`` and guarded scripts pass.
    """
    import dask

    if dask.config.get("distributed.worker.multiprocessing-method", "spawn") == "fork":
        return
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path:
        return
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>"
                                     and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None:  # the script's top level has finished: a later call is safe
        return
    try:
        tree = ast.parse(Path(path).read_text(), filename=path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return
    if not under_main_guard(tree, frame.f_lineno):
        raise SystemExit(
            f"tpmlab: {Path(path).name} line {frame.f_lineno} starts a Dask cluster while the "
            "script is imported, and its worker processes import the script again: put that "
            'code under `if __name__ == "__main__":`')


def under_main_guard(tree: ast.Module, lineno: int) -> bool:
    """Whether line ``lineno`` of a module lies in the body of an
    ``if __name__ == "__main__":`` block (either operand order)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            if node.body[0].lineno <= lineno <= (node.body[-1].end_lineno or lineno):
                return True
    return False


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1
