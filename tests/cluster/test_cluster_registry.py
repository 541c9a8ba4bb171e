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


def actors_on_workers(client) -> int:
    return sum(client.run(lambda dask_worker: len(dask_worker.state.actors)).values())


def settle(client, n: int, seconds: float = 30) -> int:
    """Actors of released deployments go asynchronously: wait until ``n`` are left."""
    deadline = time.monotonic() + seconds
    while (count := actors_on_workers(client)) != n and time.monotonic() < deadline:
        time.sleep(0.2)
    return count


def steady_count(client, seconds: float = 30) -> int:
    """The actor count once it has stopped changing for a second (releases are asynchronous)."""
    deadline = time.monotonic() + seconds
    last, since = actors_on_workers(client), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        count = actors_on_workers(client)
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            break
    return last


def test_stages_hold_only_their_weights_and_second_client_attaches(lab, cluster, ref_lab):
    backend = lab.backend
    lab.undeploy(MODEL)
    base = steady_count(backend.client)  # actors of other (healed, released) deployments
    m = deploy(lab, MODEL, 3)
    mem = backend.memory(MODEL)
    total = sum(p.numel() * 4 for p in m.source.meta_model().parameters())
    for stage in mem:
        assert 0 < stage["stage_bytes"] < 0.6 * total, (stage, total)
    # the whole model is never in one worker: each worker's peak stays below the
    # whole model's weights on top of a stage-less worker's footprint
    print("per-stage memory (MB):", [(s["stage_bytes"] >> 20, s["rss"] >> 20, s["peak_rss"] >> 20)
                                     for s in mem])
    assert settle(backend.client, base + 3) == base + 3

    other = Lab(DaskBackend(cluster.scheduler_address, timeout=60))
    try:
        m2 = other.model(MODEL, stages=2)  # attaches: the existing 3 stages, no new load
        assert m2.info.n_stages == 3
        assert actors_on_workers(backend.client) == base + 3
        assert [f.key for f in other.backend.deployment(MODEL).futures] == \
            [f.key for f in backend.deployment(MODEL).futures]
        with m2.trace("Hello there") as _:
            a = m2.layers[29].output.save()
        with m.trace("Hello there"):
            b = m.layers[29].output.save()
        torch.testing.assert_close(a.value, b.value)
    finally:
        other.close()
    assert actors_on_workers(backend.client) == base + 3  # the attached client's close leaves them

    lab.undeploy(MODEL)
    assert settle(backend.client, base) == base
    assert not [k for k in backend.client.list_datasets() if str(k).startswith("tpmlab:")]
