"""Deployments are shared through the scheduler; stages hold only their own weights;
undeploy frees the workers."""

from __future__ import annotations

import time

import pytest
import torch

from tpmlab.cluster import DaskBackend
from tpmlab.lab import Lab

from .conftest import deploy

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


def actor_keys(client) -> set[str]:
    """Keys of the actors alive on the workers."""
    found = client.run(lambda dask_worker: [str(k) for k in dask_worker.state.actors])
    return {k for keys in found.values() for k in keys}


def settle(client, present: set[str], absent: set[str] = frozenset(), seconds: float = 30) -> set:
    """Actors come and go asynchronously: wait until ``present`` are up and ``absent`` gone."""
    deadline = time.monotonic() + seconds
    while True:
        keys = actor_keys(client)
        if (present <= keys and not (absent & keys)) or time.monotonic() > deadline:
            return keys
        time.sleep(0.2)


def test_stages_hold_only_their_weights_and_second_client_attaches(lab, cluster, ref_lab):
    backend = lab.backend
    lab.undeploy(MODEL)
    m = deploy(lab, MODEL, 3)
    mine = {str(f.key) for f in backend.deployment(MODEL).futures}
    assert len(mine) == 3
    mem = backend.memory(MODEL)
    total = sum(p.numel() * 4 for p in m.source.meta_model().parameters())
    for stage in mem:
        assert 0 < stage["stage_bytes"] < 0.6 * total, (stage, total)
    # the whole model is never in one worker: each worker's peak stays below the
    # whole model's weights on top of a stage-less worker's footprint
    print("per-stage memory (MB):", [(s["stage_bytes"] >> 20, s["rss"] >> 20, s["peak_rss"] >> 20)
                                     for s in mem])
    assert mine <= settle(backend.client, mine)

    other = Lab(DaskBackend(cluster.scheduler_address, timeout=60))
    try:
        before = actor_keys(backend.client)
        m2 = other.model(MODEL, stages=2)  # attaches: the existing 3 stages, no new load
        assert m2.info.n_stages == 3
        assert actor_keys(backend.client) - before == set()  # no new actor was created
        assert {str(f.key) for f in other.backend.deployment(MODEL).futures} == mine
        with m2.trace("Hello there") as _:
            a = m2.layers[29].output.save()
        with m.trace("Hello there"):
            b = m.layers[29].output.save()
        torch.testing.assert_close(a.value, b.value)
    finally:
        other.close()
    assert mine <= actor_keys(backend.client)  # the attached client's close leaves them

    lab.undeploy(MODEL)
    assert not mine & settle(backend.client, set(), absent=mine)
    assert not [k for k in backend.client.list_datasets() if str(k).startswith("tpmlab:")]


def test_deployments_are_listed_probed_and_removed_as_typed_records(backend):
    """What the sidebar reads: the published record, each stage's answer, and removal."""
    from tpmlab.cluster import deployments

    backend.undeploy("tiny-llama")
    backend.deploy("tiny-llama", stages=2)
    try:
        dep = backend.deployment("tiny-llama")
        records = [r for r in deployments.list_deployments(backend.client)
                   if r.name == "tiny-llama"]
        assert [r.key for r in records] == [dep.key]
        record = records[0]
        assert record.placements == dep.placements and record.spans == dep.spans
        assert [f.key for f in record.futures] == [f.key for f in dep.futures]
        probes = deployments.probe(backend.client, record, timeout=30)
        assert [p.status for p in probes] == ["answered", "answered"]
        assert all(p.requests == 0 and p.rss > 0 for p in probes)
        assert deployments.remove(backend.client, "tiny-llama") == [dep.key]
        assert deployments.lookup(backend.client, dep.key) is None
        assert deployments.remove(backend.client, "tiny-llama") == []
    finally:
        backend.undeploy("tiny-llama")


def test_a_dtype_no_model_loads_in_is_refused_before_anything_deploys(backend):
    with pytest.raises(TypeError, match="cannot be loaded in dtype 'int8'"):
        backend.deploy("tiny-gpt2", stages=2, dtype="int8")
    assert "tiny-gpt2" not in backend.deployments
    assert not [k for k in actor_keys(backend.client) if "gpt2" in k]
