"""Every op of a stage runs on the stage's own thread, its loading included.

OpenMP keeps a team of threads for each thread that ever ran a parallel op. Once a process
holds more of them than it has cores, libgomp stops spinning between parallel regions, and a
forward's threads sleep and wake at every op: a 2-stage CPU trace took 1.3x the in-process
one while the Dask thread that had loaded each stage kept a team of its own
(benchmarks/README.md, "CPU stages"). So a stage loads on the thread it computes on.
"""

from __future__ import annotations

import pytest

from .conftest import deploy

pytest.importorskip("distributed")


def _record(dask_worker=None):
    """Record, in this worker, the thread each of a stage model's steps runs on."""
    import threading

    from tpmlab.cluster import stage

    seen: list[tuple[str, str]] = []
    cls = stage.StageModel
    originals = {name: cls.__dict__[name] for name in ("__init__", "probe", "forward")}
    for name, original in originals.items():

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            seen.append((_name, threading.current_thread().name))
            return _original(self, *args, **kwargs)

        setattr(cls, name, wrapped)
    stage._test_record = (seen, originals)


def _recorded(dask_worker=None):
    """What :func:`_record` saw; the class as it was."""
    from tpmlab.cluster import stage

    seen, originals = stage.__dict__.pop("_test_record", ([], {}))
    for name, original in originals.items():
        setattr(stage.StageModel, name, original)
    return seen


def test_a_stage_loads_and_computes_on_its_own_thread(lab, backend):
    client = backend.client
    client.run(_record)
    try:
        model = deploy(lab, "tiny-llama", 2)
        with model.trace("The Eiffel Tower is in"):
            out = model.unembed.output.save()
    finally:
        seen = [step for steps in client.run(_recorded).values() for step in steps]
    assert out.value.shape[0] == 1
    steps = {name for name, _ in seen}
    assert {"__init__", "probe", "forward"} <= steps, seen
    assert all(thread.startswith("tpmlab-stage") for _, thread in seen), seen
