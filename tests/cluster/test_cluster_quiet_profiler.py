"""Dask's sampling profiler is paused on a worker while it holds a stage, and runs again
once the worker's last stage is gone (:mod:`tpmlab.cluster.quiet_profiler`)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from .conftest import deploy

distributed = pytest.importorskip("distributed")


def _paused(backend) -> dict[str, bool | None]:
    from tpmlab.cluster import quiet_profiler

    return backend.client.run(quiet_profiler.paused)


def _wait_for(check, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.1)


def test_profiler_paused_on_stage_workers_only_and_back_after_undeploy(lab, backend):
    model = deploy(lab, "tiny-llama", 2)
    staged = set(model.info.stage_workers)
    assert len(staged) == 2
    _wait_for(lambda: all(_paused(backend)[w] for w in staged), "stage workers still profiled")
    states = _paused(backend)
    assert all(states[w] is False for w in states if w not in staged), states  # the others
    with model.trace("Hello"):  # stages work with it paused
        out = model.output.logits[:, -1].argmax(-1).save()
    assert out.value.shape == (1,)
    lab.undeploy("tiny-llama")
    _wait_for(lambda: not any(_paused(backend).values()), "profiler not started again")


class _Callback:
    def __init__(self, running: bool = True) -> None:
        self.running = running

    def is_running(self) -> bool:
        return self.running

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


def _worker(actors=(), running: bool = True):
    return SimpleNamespace(periodic_callbacks={"profile": _Callback(running)},
                           state=SimpleNamespace(actors={k: None for k in actors}),
                           loop=SimpleNamespace(add_callback=lambda fn: fn()))


def test_two_stages_on_one_worker_and_the_opt_out(monkeypatch):
    from tpmlab.cluster.quiet_profiler import PauseProfilerWhileStaged

    worker = _worker(actors=["tpmlab-stage0-m-1"])  # a stage already here at registration
    plugin = PauseProfilerWhileStaged()
    plugin.setup(worker)
    profile = worker.periodic_callbacks["profile"]
    assert not profile.running
    plugin.transition("tpmlab-stage1-m-1", "executing", "memory")
    plugin.transition("tpmlab-stage0-m-1", "memory", "released")
    assert not profile.running  # one stage left
    plugin.transition("other-task", "memory", "released")
    assert not profile.running
    plugin.transition("tpmlab-stage1-m-1", "memory", "forgotten")
    assert profile.running

    off = _worker(running=False)  # switched off by the worker's config: stays off
    plugin = PauseProfilerWhileStaged()
    plugin.setup(off)
    plugin.transition("tpmlab-stage0-m-1", "executing", "memory")
    plugin.transition("tpmlab-stage0-m-1", "memory", "released")
    assert not off.periodic_callbacks["profile"].running

    monkeypatch.setenv("TPMLAB_DASK_PROFILE", "1")  # kept sampling on request
    kept = _worker()
    plugin = PauseProfilerWhileStaged()
    plugin.setup(kept)
    plugin.transition("tpmlab-stage0-m-1", "executing", "memory")
    assert kept.periodic_callbacks["profile"].running
