"""Per-request limits and measured node time on pipeline stages of a real Dask cluster:
each stage holds its own nodes to the request's limits, the bytes saved are bounded over
all stages, and every stage reports the time its plan nodes took."""

from __future__ import annotations

import pytest
import torch

from tests.plan_strategies import recording
from tpmlab.errors import LimitError
from tpmlab.ir.codec import decode_result, encode_plan
from tpmlab.ir.merge import merge_plans, split_values
from tpmlab.ir.validate import Limits

from .conftest import deploy

pytestmark = pytest.mark.slow
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def tiny(lab):
    model = deploy(lab, MODEL, 2)
    yield model
    lab.undeploy(MODEL)


def test_saved_bytes_are_limited_over_all_stages(tiny, lab):
    """A generation saving a layer of each stage at every step (sizes validation cannot know:
    it sizes the prompt pass only). Each stage's own saves stay under the request's limit,
    their sum does not: the bytes saved so far travel along the chain, so the stage that
    crosses the limit refuses."""
    last = tiny.adapter.n_layers - 1
    with recording(tiny, tiny.generate("The Eiffel Tower is in", max_new_tokens=3)) as gen:
        with gen.all():
            first = tiny.layers[0].output.save()
            tiny.layers[last].output.save()
    plan = gen.plan()
    stages = {tiny.info.stage_of(tiny.info.event_index(n.path, n.io))
              for n in plan.nodes if n.op == "point"}
    assert stages == {0, 1}
    blob = encode_plan(plan)
    values, _ = lab.backend.run_values(MODEL, blob)
    per_stage = sum(v.numel() * v.element_size() for v in values[first._node])
    over_total = Limits(max_saved_bytes=int(per_stage * 1.5))
    with pytest.raises(LimitError, match=f"over the limit of {int(per_stage * 1.5):,} bytes"):
        lab.backend.run_values(MODEL, blob, limits=over_total)
    with pytest.raises(LimitError):
        decode_result(lab.backend.run(MODEL, blob, limits=over_total))
    lab.backend.run_values(MODEL, blob, limits=Limits(max_saved_bytes=per_stage * 3))
    assert [s["requests"] + s["held"] for s in lab.backend.memory(MODEL)] == [0, 0]


def test_intermediate_bytes_are_limited_at_run_time(tiny, lab):
    with recording(tiny, tiny.generate("Hello", max_new_tokens=2)) as gen:
        with gen.step(1):  # a later step: its shapes are known only at run time
            tiny.layers[3].output.repeat(1, 1, 400).sum().save()
    blob = encode_plan(gen.plan())
    with pytest.raises(LimitError, match=r"made a value of 102,400 bytes, over the limit of "
                                         r"50,000 bytes for one value") as err:
        lab.backend.run_values(MODEL, blob, limits=Limits(max_intermediate_bytes=50_000))
    assert "test_cluster_limits.py" in err.value.line
    lab.backend.run_values(MODEL, blob)  # the engine's own limits allow it


def test_a_request_cannot_widen_the_stages_limits(lab):
    """Stages deployed with a 1,000-byte save limit keep it whatever a request asks."""
    from tpmlab.cluster import DaskBackend
    from tpmlab.lab import Lab

    strict = Lab(DaskBackend(client=lab.backend.client, limits=Limits(max_saved_bytes=1_000)))
    name = "tiny-gpt-neox"
    try:
        model = strict.model(name, stages=2)
        with recording(model, model.trace("Hello world")) as tr:
            model.output.logits.save()
        blob = encode_plan(tr.plan())
        with pytest.raises(LimitError, match="over the limit of 1,000 bytes"):
            strict.run_values(name, blob, limits=Limits(max_saved_bytes=10**15))
    finally:
        strict.undeploy(name)


def test_node_seconds_come_from_every_stage(tiny, lab):
    w = torch.randn(64, 64)
    with tiny.trace("Hello world") as tr:
        (tiny.layers[0].output @ w).sum().save()
        (tiny.layers[3].output @ w).sum().save()
    nodes = tr.plan().nodes
    stages = {tiny.info.stage_of(tiny.info.event_index(n.path, n.io))
              for n in nodes if n.op == "point"}
    assert stages == {0, 1}, "the plan computes on both stages"
    seconds = tr.result.meta["node_seconds"]
    assert set(seconds) == {n.id for n in nodes if n.op != "point"}
    assert all(isinstance(s, float) and s >= 0 for s in seconds.values())


def test_merged_node_seconds_split_per_user(tiny, lab):
    plans = []
    for prompt in ("Hello", "The Eiffel Tower"):
        with recording(tiny, tiny.trace(prompt)) as tr:
            tiny.layers[3].output.sum().save()
        plans.append(tr.plan())
    merged, mapping = merge_plans(plans)
    _, meta = lab.backend.run_values(MODEL, encode_plan(merged))
    for plan, part in zip(plans, split_values(meta["node_seconds"], mapping)):
        assert set(part) == {n.id for n in plan.nodes if n.op != "point"}
