"""Each result carries the measured time of every plan node that is not a module point
(``meta["node_seconds"]``), so a gateway can charge each user of a merged batch for the
compute of their own plan."""

from __future__ import annotations

import pytest
import torch

from tests.plan_strategies import recording
from tpmlab.ir.codec import decode_result, encode_plan
from tpmlab.ir.merge import merge_plans, split_values

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model(MODEL)


def _computed(plan):
    return {n.id for n in plan.nodes if n.op != "point"}


def test_every_computed_node_is_timed_and_no_point(model):
    w = torch.randn(64, 64)
    with model.trace("Hello world") as tr:
        h = model.layers[1].output
        for _ in range(3):
            h = h @ w
        h.sum().save()
        model.unembed(model.final_norm(model.layers[2].output)).argmax(-1).save()
    seconds = tr.result.meta["node_seconds"]
    assert set(seconds) == _computed(tr.plan()) and len(seconds) >= 8
    assert all(isinstance(s, float) and s >= 0 for s in seconds.values())


def test_a_plan_without_nodes_times_nothing(model):
    with model.trace("Hello world") as tr:
        pass
    assert tr.result.meta["node_seconds"] == {}


def test_node_seconds_sum_over_generation_steps(local_lab, model):
    with recording(model, model.generate("Hello", max_new_tokens=3)) as gen:
        with gen.all():
            model.layers[1].output.sum().save()
    plan = gen.plan()
    values, meta = local_lab.backend.run_values(MODEL, encode_plan(plan))
    assert set(meta["node_seconds"]) == _computed(plan)
    # through the bytes path the node ids stay integers
    _, meta_bytes = decode_result(local_lab.backend.run(MODEL, encode_plan(plan)))
    assert set(meta_bytes["node_seconds"]) == _computed(plan)


def test_merged_node_seconds_split_back_per_user(local_lab, model):
    plans = []
    for prompt, n in (("Hello", 1), ("The Eiffel Tower is", 3)):
        with recording(model, model.trace(prompt)) as tr:
            h = model.layers[n].output
            (h * 2).sum().save()
        plans.append(tr.plan())
    merged, mapping = merge_plans(plans)
    _, meta = local_lab.backend.run_values(MODEL, encode_plan(merged))
    for plan, part in zip(plans, split_values(meta["node_seconds"], mapping)):
        assert set(part) == _computed(plan)
