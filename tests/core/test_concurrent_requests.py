"""Threads sharing one in-process model each get exactly their own results."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

PROMPTS = ["The Eiffel Tower is located in the city of", "Hello there", "1 2 3 4",
           "A longer prompt about rivers and mountains", "x", "Paris is", "The cat sat", "Why"]


def _trace(model, prompt: str):
    with model.trace(prompt):
        h = model.layers[1].output.save()
        top = model.unembed.output[:, -1].argmax(-1).save()
    return h.value, top.value


def test_threads_sharing_a_model_get_the_results_of_running_alone(local_lab):
    model = local_lab.model("tiny-llama")
    alone = [_trace(model, p) for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _trace(model, p), PROMPTS * 3))
    for i, (h, top) in enumerate(together):
        want_h, want_top = alone[i % len(PROMPTS)]
        assert torch.equal(h, want_h) and torch.equal(top, want_top)
