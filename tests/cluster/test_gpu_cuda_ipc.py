"""Stages on GPUs hand hidden states and gradients over through CUDA IPC
(:mod:`tpmlab.cluster.cuda_ipc`) with exactly the numbers of the ordinary path (device ->
host -> Dask -> host -> device): two Dask workers sharing one GPU (or on two), a model in
2 stages, with IPC switched off, off again (the GPU's own run-to-run baseline) and on;
outputs, gradients and generated tokens compared with atol 0. Skipped without CUDA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PROMPTS = ["The Eiffel Tower is located in the city of", "Hello"]


def _switch(on: bool, dask_worker=None) -> None:
    os.environ["TPMLAB_CUDA_IPC"] = "1" if on else "0"


def _run(model) -> list[torch.Tensor]:
    from tests.core.grad_helpers import metric

    torch.manual_seed(0)
    v = (torch.randn(model.d_model) * 0.1).to(getattr(torch, model.info.dtype))
    n = model.adapter.n_layers
    with model.trace(PROMPTS[0]):
        model.layers[n // 2].output[:, -1] *= 1.5
        logits = model.output.logits.save()
    with model.trace(PROMPTS) as tr:
        model.layers[0].output += v
        model.layers[n - 1].output += v
        layers = [layer.output for layer in model.layers]
        metric(model.output.logits).backward()
        grads = [h.grad.save() for h in layers]
        v_grad = tr.grad(v).save()
    with model.generate(PROMPTS, max_new_tokens=4) as gen:
        with gen.all():
            h = model.layers[n - 1].output.save()
    return [logits.value, *[g.value for g in grads], v_grad.value, *h.value,
            *gen.output_ids]


@pytest.mark.parametrize("name,dtype", [("tiny-llama", "float32"),
                                        ("llama-3-8b-shape", "bfloat16")])
def test_cuda_ipc_gives_exactly_the_ordinary_numbers(gpu_lab, name, dtype):
    lab = gpu_lab
    client = lab.backend.client
    got = {}
    try:
        for label, on in (("off", False), ("off again", False), ("on", True)):
            client.run(_switch, on)
            lab.undeploy(name)
            model = lab.model(name, stages=2, dtype=dtype)
            before = [s["ipc"] for s in lab.backend.memory(name)]
            assert before[0]["next"]["active"] is on and before[1]["prev"]["active"] is on
            got[label] = _run(model)
            mem = lab.backend.memory(name)
            assert [s["ipc_held"] for s in mem] == [0, 0]
            ipc = [s["ipc"] for s in mem]
            if on:  # the hidden states went forward and the gradient back in device memory
                assert ipc[0]["next"]["sent"] > 0 and ipc[1]["in"]["received"] > 0
                assert ipc[1]["prev"]["sent"] > 0 and ipc[0]["in"]["received"] > 0
                assert ipc[0]["next"]["refused"] == ipc[1]["prev"]["refused"] == 0
            else:
                assert ipc[0]["next"]["sent"] == ipc[1]["prev"]["sent"] == 0
    finally:
        client.run(_switch, True)
        lab.undeploy(name)
    for a, b in zip(got["off again"], got["off"]):  # the baseline: the GPU repeats itself
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(got["on"]) == len(got["off"])
    for a, b in zip(got["on"], got["off"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
