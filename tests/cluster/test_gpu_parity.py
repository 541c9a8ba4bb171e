"""Contract 5 on GPUs: a model split into pipeline stages over Dask workers, one worker
per GPU (``CUDA_VISIBLE_DEVICES=i``, ``GPU=1``), gives the same tensors as the local
executor on ``cuda:0`` with the same weights: every layer's output and the logits, a
patch, a patch crossing stages with a lens on a saved value, and a greedy generation
with a per-step patch. Skipped without at least two CUDA devices."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs at least two CUDA devices"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@pytest.fixture(scope="module")
def gpu_lab():
    from distributed import Client

    from benchmarks.cluster_gpu import start_gpu_cluster
    from tpmlab.cluster import DaskBackend
    from tpmlab.lab import Lab

    n = min(torch.cuda.device_count(), 4)
    cluster = start_gpu_cluster(n)
    client = Client(cluster)
    lab = Lab(DaskBackend(client=client, timeout=300))
    yield lab, n
    lab.close()
    client.close()
    cluster.close()


@pytest.mark.parametrize("name,dtype", [("tiny-llama", "float32"),
                                        ("llama-3-8b-shape", "bfloat16")])
def test_stages_on_gpus_match_local_executor(gpu_lab, name, dtype):
    from benchmarks.cluster_gpu import parity

    lab, n = gpu_lab
    result = parity(lab, name, dtype, n, "cuda:0")
    assert result["stage_layers"][0][0] == 0 and len(result["stage_layers"]) == n
    assert result["pass"], result["checks"]
