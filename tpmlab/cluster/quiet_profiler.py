"""Dask's sampling profiler stays off on a worker while it holds a stage.

Every Dask worker samples the stacks of all its threads every 10 ms
(``distributed.worker.profile``) for the dashboard's profile page. Each sample needs the
GIL: the event loop asks for it, and after the 5 ms switch interval the stage's thread,
which holds it while it launches kernels or runs ops, must hand it over, wait while the
stacks are walked and then get it back. A stage's forward is exactly such a thread: on one
H200 (llama-3-8b-shape bf16, 1x128, two stage workers) the two stage forwards took
41.8 / 34.7 ms with the profiler and 36.7 / 30.8 ms without it, and the whole trace
52.4 / 46.6 ms against 44.6 / 43.2 ms (`benchmarks/README.md`, fixed cost).

So a worker pauses the profiler when a stage actor lands on it and starts it again when
its last stage is released. ``TPMLAB_DASK_PROFILE=1`` in a worker's environment keeps it
sampling (to look at a stage in the dashboard's profile page).
"""

from __future__ import annotations

import os
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .cleanup import STAGE_KEY_PREFIX


class PauseProfilerWhileStaged(WorkerPlugin):
    """On each worker: Dask's profiler off while a stage actor is held here."""

    name = "tpmlab-pause-profiler-while-staged"
    idempotent = True  # registered at every deploy: the first one on a worker stays

    def setup(self, worker: Any) -> None:
        self._worker = worker
        self._paused = False  # by this plugin (a profiler switched off by config stays off)
        # stages already here (a worker that joined, a plugin registered after a deploy)
        self._stages = {str(k) for k in worker.state.actors
                        if str(k).startswith(STAGE_KEY_PREFIX)}
        self._apply()

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if not str(key).startswith(STAGE_KEY_PREFIX):
            return
        if finish == "memory":
            self._stages.add(str(key))
        elif finish in ("released", "forgotten", "error"):
            self._stages.discard(str(key))
        self._worker.loop.add_callback(self._apply)

    def teardown(self, worker: Any) -> None:  # unregistered: leave the profiler as it was
        self._stages.clear()
        self._apply()

    def _apply(self) -> None:
        profiler = self._worker.periodic_callbacks.get("profile")
        if profiler is None or os.environ.get("TPMLAB_DASK_PROFILE") == "1":
            return
        if self._stages and profiler.is_running():
            profiler.stop()
            self._paused = True
        elif not self._stages and self._paused:
            profiler.start()
            self._paused = False


def paused(dask_worker: Any) -> bool | None:
    """Whether this worker's profiler is paused (``None``: the worker has none); for
    ``client.run``."""
    profiler = dask_worker.periodic_callbacks.get("profile")
    return None if profiler is None else not profiler.is_running()


def install(client: Any) -> None:
    """Register the plugin on every worker, now and later."""
    client.register_plugin(PauseProfilerWhileStaged(), name=PauseProfilerWhileStaged.name)
