"""A request computes the same numbers whether it is a stage's first or a later one, and
whatever started the workers (:mod:`tpmlab.runtime.compute_threads`); and a stage's worker
allocates as a plain process does, whatever malloc thresholds the nanny gave it
(:mod:`tpmlab.runtime.host_malloc`).

A Dask nanny spawns its worker with ``OMP_NUM_THREADS=1`` (as ``dask worker`` on an HPC
allocation does, and as a nanny restarting a lost worker does): before a stage's thread
was given torch's thread count, its first trace summed with one thread and rounded
differently from every later trace and from the in-process engine.
"""

from __future__ import annotations

import logging

import pytest
import torch

distributed = pytest.importorskip("distributed")

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def spawned_lab():
    from distributed import Client, LocalCluster

    from tpmlab.cluster import DaskBackend
    from tpmlab.lab import Lab

    # plainly spawned workers (no forkserver): the nanny's OMP_NUM_THREADS=1 is in force
    # when each worker loads torch
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        envs = client.run(lambda: __import__("os").environ.get("OMP_NUM_THREADS"))
        assert set(envs.values()) == {"1"}, envs  # the condition this test is about
        trims = client.run(lambda: __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert set(trims.values()) == {"65536"}, trims  # and the one the malloc test is about
        lab = Lab(DaskBackend(client=client, timeout=180))
        yield lab
        lab.close()


def _logits(model):
    with model.trace(PROMPT):
        out = model.output.logits.save()
    return out.value


def test_first_request_on_spawned_stages_equals_later_ones_and_in_process(spawned_lab, ref_lab):
    staged = spawned_lab.model("tiny-llama", stages=2)
    first = _logits(staged)  # each stage thread's first ops
    later = [_logits(staged) for _ in range(2)]
    reference = _logits(ref_lab.model("tiny-llama"))
    for value in later:
        torch.testing.assert_close(value, first, atol=0, rtol=0)
    torch.testing.assert_close(first, reference, atol=0, rtol=0)


def _page_faults() -> int:
    """Minor page faults while allocating and freeing 2 MiB 200 times, as a forward's
    activations come and go: ≈ 100,000 with the nanny's fixed thresholds, few without."""
    import resource

    import numpy as np

    a = np.ones(1 << 18)
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        a = np.ones(1 << 18)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_stage_workers_allocate_as_a_plain_process_does(spawned_lab):
    client = spawned_lab.backend.client
    bare = client.run(_page_faults)
    staged = spawned_lab.model("tiny-llama", stages=2)
    _logits(staged)
    assert all(m["malloc_relaxed"] for m in spawned_lab.backend.memory("tiny-llama"))
    holders = [p.worker for p in spawned_lab.backend.deployment("tiny-llama").placements]
    after = client.run(_page_faults, workers=holders)
    assert len(after) == 2 and all(n < 2_000 for n in after.values()), after
    if not all(w in after for w in bare):  # a worker without a stage: still the nanny's
        assert max(bare.values()) > 50_000, bare
