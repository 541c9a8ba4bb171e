"""Freeing a released stage promptly on its worker.

A stage actor holds a handle on the next stage's actor and is referenced from its own
request state, so once Dask drops it from the worker it can sit in a reference cycle,
its weights and that handle alive, until Python's cyclic collector happens to run.
This worker plugin runs the collector right after a stage actor's key is released.
"""

from __future__ import annotations

import gc
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

STAGE_KEY_PREFIX = "tpmlab-stage"


class CollectReleasedStages(WorkerPlugin):
    """On each worker: collect garbage shortly after a stage actor is released."""

    name = "tpmlab-collect-released-stages"

    def setup(self, worker: Any) -> None:
        self._loop = worker.loop

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish in ("released", "forgotten") and str(key).startswith(STAGE_KEY_PREFIX):
            # after the transition completes and the worker has dropped the actor
            self._loop.call_later(0.1, gc.collect)


def install(client: Any) -> None:
    """Register the plugin on every worker, now and later (idempotent by name)."""
    client.register_plugin(CollectReleasedStages(), name=CollectReleasedStages.name)
