"""Worker processes that start with torch already imported.

A spawned worker is a fresh interpreter that imports distributed, torch and
transformers before it can load a stage: ≈ 3-4 s of CPU per worker, paid by every
worker at once on a machine with two cores. multiprocessing's *forkserver* imports
them once, in one server process, and forks each worker from it: a worker starts in
milliseconds with those modules shared copy-on-write, and since the server lives as
long as this process, a second cluster (a notebook run again, a test session) starts
at once as well.

* The server is started with the workers' environment: OpenMP reads ``OMP_*`` when
  torch's runtime is loaded, which now happens in the server. A later cluster asking for
  other such variables gets spawned workers.
* SIGINT stays blocked in the server and so in every worker forked from it (see
  :func:`~tpmlab.cluster.embedded.sigint_blocked`).
* The server never imports the main script; each worker does, as a spawned one would
  (multiprocessing prepares every child so), so scripts still need their main guard.
* Where the forkserver is missing (Windows, macOS's default) workers are spawned as before.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator, Mapping

from tpmlab.openmp_wait import SHORT_SPIN

#: imported once by the server, shared by every worker it forks
PRELOAD = ("distributed", "tpmlab.cluster.worker_preload")

#: the environment worker processes start with; OpenMP reads it when torch loads.
#: Stages of one request run one after another on shared cores, each with every core: an
#: idle stage's OpenMP threads must soon sleep, or they steal the cores the busy stage
#: computes on (GNU OpenMP, torch's on Linux, spins ≈ 300,000 times, milliseconds, before it
#: sleeps). A passive policy (``OMP_WAIT_POLICY=PASSIVE``: sleep at once) costs a wake-up
#: at every parallel region of a forward: 1.3-1.4x the stage's forward on this 2-core CPU.
#: A short spin keeps a forward's threads awake between its ops and lets them sleep
#: within about a millisecond of its end (benchmarks/README.md, CPU stages). libgomp
#: spins at all only while the process holds no more of its threads than cores (else 100
#: spins, whatever this says): so a stage runs every op, its loading included, on one
#: thread (:class:`~.actor.StageActor`).
WORKER_ENV = dict(SHORT_SPIN)
#: variables read when torch's libraries load, so fixed in a running server
LOAD_TIME_PREFIXES = ("OMP_", "KMP_", "MKL_", "GOMP_")
_server_env: dict[str, str] | None = None  # those the running server was started with


def available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def ensure_server(env: Mapping[str, str] = WORKER_ENV) -> bool:
    """Start the forkserver (if this process has none yet) with ``env`` on top of this
    process's environment and :data:`PRELOAD` imported. Returns at once: the server imports
    while this process goes on (the first worker forked waits for it). Returns whether
    workers can be forked from it."""
    global _server_env
    if not available():
        return False
    from multiprocessing import forkserver

    loaded = {k: str(v) for k, v in env.items() if k.startswith(LOAD_TIME_PREFIXES)}
    if _server_env is not None and forkserver._forkserver._forkserver_pid is not None:
        # variables read when torch loads are fixed in a running server: spawn if they differ
        return loaded == _server_env
    _server_env = loaded
    ctx = multiprocessing.get_context("forkserver")
    # never multiprocessing's default "__main__": the user's script must not run there
    preload = [m for m in getattr(forkserver._forkserver, "_preload_modules", None) or []
               if m != "__main__"]
    ctx.set_forkserver_preload(preload + [m for m in PRELOAD if m not in preload])
    with _environ(env):
        forkserver.ensure_running()
    return True


@contextlib.contextmanager
def forked_workers(env: Mapping[str, str] = WORKER_ENV, enabled: bool = True) -> Iterator[bool]:
    """Within the block, Nannies fork their workers from the preloaded forkserver.
    Yields whether they do (``False``: spawned as before)."""
    if not enabled or not ensure_server(env):
        yield False
        return
    import dask

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        yield True


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
