"""Stage splitting and placement (no model weights needed)."""

from __future__ import annotations

import logging

import pytest
import torch

from tpmlab.cluster import DeploymentError, Placement, place_stages
from tpmlab.cluster.partition import part_bytes, split_layers, stage_keys


def test_split_is_contiguous_and_balanced():
    spans = split_layers([10] * 30, 40, 40, 3)
    assert spans[0].first == 0 and spans[-1].last == 29
    assert all(a.last + 1 == b.first for a, b in zip(spans, spans[1:]))
    # 380 bytes over 3 stages: the best contiguous split's largest stage holds 130
    assert max(s.nbytes for s in spans) == 130
    with pytest.raises(ValueError):
        split_layers([1, 1], 0, 0, 3)


def test_stage_keys_select_only_the_stage():
    from tpmlab.models import resolve

    src = resolve("tiny-llama")
    layers, first, last = part_bytes(src.meta_model(), src.adapter, torch.float32)
    spans = split_layers(layers, first, last, 2)
    names = [n for n, _ in src.meta_model().named_parameters(remove_duplicate=False)]
    picked = [[n for n in names if stage_keys(src.adapter, s)(n)] for s in spans]
    assert "model.embed_tokens.weight" in picked[0] and "lm_head.weight" in picked[1]
    assert not set(picked[0]) & set(picked[1])
    assert set(picked[0]) | set(picked[1]) == set(names)


def test_cpu_round_robin_and_gpu_one_stage_per_gpu():
    cpu = {"tcp://a": {"resources": {}}, "tcp://b": {"resources": {}}}
    assert place_stages(cpu, 3) == [Placement("tcp://a", "cpu"), Placement("tcp://b", "cpu"),
                                    Placement("tcp://a", "cpu")]
    gpus = {"tcp://a": {"resources": {"GPU": 2}}, "tcp://b": {"resources": {"GPU": 1}}}
    placements = place_stages(gpus, 3)
    assert sorted((s.worker, s.device) for s in placements) == [
        ("tcp://a", "cuda:0"), ("tcp://a", "cuda:1"), ("tcp://b", "cuda:0")]
    with pytest.raises(DeploymentError, match="one stage per GPU"):
        place_stages(gpus, 2, taken=[Placement("tcp://a", "cuda:0"), Placement("tcp://b", "cuda:0")])
    assert place_stages(gpus, 1, exclude=["tcp://a"]) == [Placement("tcp://b", "cuda:0")]


def test_fake_gpu_resource_on_a_cpu_cluster_gets_one_stage_per_worker():
    from distributed import Client, LocalCluster

    from tpmlab.cluster import DaskBackend

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
        backend = DaskBackend(client=client)
        placements = place_stages(backend.workers(), 2)
        # Ask the scheduler, as the backend does: ``cluster.scheduler_info`` is a copy that a
        # background task fills in as workers arrive, so on a busy machine it can lag behind.
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert sorted(s.worker for s in placements) == sorted(workers)
        assert {s.device for s in placements} == {"cuda:0"}
        with pytest.raises(DeploymentError, match="3 stages need 3 free GPUs"):
            backend.deploy("tiny-llama", stages=3)
