"""A GPU stage's saves copied from the device straight into shared-memory segments
registered with CUDA (:mod:`tpmlab.cluster.pinned_segments`) reach the notebook with exactly
the numbers of the pinned copy (registration switched off): two Dask workers sharing one
GPU, llama-3-8b-shape in bfloat16 in 2 stages, every layer's output of an 8x512 trace saved
(32 MiB each); atol 0. Skipped without CUDA."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NAME = "llama-3-8b-shape"
POOL_BYTES, FILL_THREADS = 512 << 20, 4  # the workers' defaults on a 16-core host


def _active(on: bool, dask_worker=None) -> None:
    from tpmlab.cluster import pinned_segments

    pinned_segments.ACTIVE = on


def _saves(model, ids: torch.Tensor) -> list[torch.Tensor]:
    with model.trace(ids):
        saved = [layer.output.save() for layer in model.layers]
    values = [s.value for s in saved]
    return [v[0] if isinstance(v, tuple) else v for v in values]


def _counts(lab) -> list[dict[str, int]]:
    return [m["handover"] for m in lab.backend.memory(NAME)]


def _settled(lab, seconds: float = 60.0) -> list[dict[str, int]]:
    """The stages' counts once their pools are filled (registered off the request's path)
    and no request holds a registered segment: the same two reads in a row."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        counts = _counts(lab)
        if counts == last and all(c["held"] == c["pooled"] + c["lent"] for c in counts):
            return counts
        last = counts
        time.sleep(0.5)
    return counts


def test_registered_segments_give_exactly_the_pinned_copy_numbers(gpu_lab):
    lab = gpu_lab
    client = lab.backend.client
    lab.undeploy(NAME)
    model = lab.model(NAME, stages=2, dtype="bfloat16")
    n_layers = model.adapter.n_layers
    ids = torch.randint(0, model.info.vocab_size, (8, 512),
                        generator=torch.Generator().manual_seed(0))
    got = {}
    try:
        client.run(_active, False)
        got["off"] = _saves(model, ids)
        got["off again"] = _saves(model, ids)  # the baseline: the GPU repeats itself
        client.run(_active, True)
        _settled(lab)  # the pool filled while off: unregistered segments
        _saves(model, ids)  # takes them; the pool makes registered ones now
        before = _settled(lab)
        pools = [m["recycling"] for m in lab.backend.memory(NAME)]
        got["on"] = _saves(model, ids)
        after = _settled(lab)
        pools += [m["recycling"] for m in lab.backend.memory(NAME)]
    finally:
        client.run(_active, True)
        lab.undeploy(NAME)
    for a, b in zip(got["off again"], got["off"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(got["on"]) == len(got["off"]) == n_layers
    for a, b in zip(got["on"], got["off"]):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    print("before the registered trace:", before, "after:", after)
    # each save found a registered segment of its size ready and went into it directly:
    # none fell back to a pinned copy
    assert sum(a["pinned"] - b["pinned"] for b, a in zip(before, after)) == n_layers
    for b, a in zip(before, after):
        assert b["pooled"] > 0 and a["unpinned"] == b["unpinned"]
        assert a["register_failed"] == a["unregister_failed"] == 0
        assert a["registered"] - a["unregistered"] == a["held"]
    for pool in pools:  # kept to its budget while segments came back during its fills
        assert pool["ready_bytes"] <= POOL_BYTES + FILL_THREADS * (32 << 20), pool
