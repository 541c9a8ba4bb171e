"""A stage's process sets glibc's malloc thresholds back for its forwards
(:mod:`tpmlab.runtime.host_malloc`).

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which switches glibc's
dynamic mmap threshold off: every allocation of 128 KiB or more becomes a fresh mapping
whose pages fault in anew. Counted here as minor page faults (no timing): 200 allocations
of 2 MiB fault ≈ 100,000 pages in such a process and none once the thresholds are set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

CHILD = r"""
import json, resource, sys
import numpy as np
from tpmlab.runtime import host_malloc

def faults():
    a = np.ones(1 << 18); del a  # warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        a = np.ones(1 << 18)  # 2 MiB, allocated and freed as a forward's activations are
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {"before": faults(), "relaxed": host_malloc.relax(), "again": host_malloc.relax()}
out["after"] = faults()
out["reported"] = host_malloc.relaxed()
print(json.dumps(out))
"""


def _child(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items()
            if k not in ("MALLOC_TRIM_THRESHOLD_", "TPMLAB_KEEP_MALLOC")}
    full.update(env)
    done = subprocess.run([sys.executable, "-c", CHILD], env=full, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_thresholds_a_nanny_fixed_are_set_back():
    out = _child(MALLOC_TRIM_THRESHOLD_="65536")  # as distributed's nanny starts a worker
    assert out["before"] > 50_000, out  # the condition: each 2 MiB array faults its pages
    assert out["relaxed"] and out["again"] and out["reported"], out
    assert out["after"] < 2_000, out


def test_a_plain_process_is_left_as_fast_as_it_was():
    out = _child()
    assert out["before"] < 2_000, out  # glibc's dynamic threshold: freed memory is reused
    assert out["relaxed"] and out["after"] < 2_000, out


def test_keep_malloc_leaves_the_workers_thresholds():
    out = _child(MALLOC_TRIM_THRESHOLD_="65536", TPMLAB_KEEP_MALLOC="1")
    assert not out["relaxed"] and not out["reported"], out
    assert out["after"] > 50_000, out
