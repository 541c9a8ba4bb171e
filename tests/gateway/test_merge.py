"""tpmlab.ir.merge: several plans as one batch, split back exactly."""

from __future__ import annotations

import pytest
import torch

from tpmlab.errors import SchemaError
from tpmlab.ir.codec import encode_plan
from tpmlab.ir.merge import can_merge, merge_plans, split_values
from tpmlab.ir.plan import Invoke, Node, Plan, Ref, TensorRef

from .conftest import MODEL


def _plan(ids, nodes, tensors=None, **kw):
    tensors = {"in0": torch.tensor(ids), **(tensors or {})}
    return Plan(model=MODEL, model_version="v", invokes=[Invoke("tokens", ["in0"])],
                nodes=nodes, tensors=tensors, **kw)


def test_merge_renumbers_nodes_shifts_invokes_and_renames_tensors():
    a = _plan([1, 2, 3], [Node(0, "point", path="model.layers.0", io="output", invoke=0),
                          Node(1, "save", [Ref(0)])])
    b = Plan(model=MODEL, model_version="v",
             invokes=[Invoke("tokens", ["x"]), Invoke("tokens", ["y"])],
             nodes=[Node(5, "point", path="model.layers.1", io="output", invoke=1),
                    Node(9, "add", [Ref(5), TensorRef("c")]), Node(12, "save", [Ref(9)])],
             tensors={"x": torch.tensor([4]), "y": torch.tensor([5, 6]), "c": torch.ones(1)})
    merged, mapping = merge_plans([a, b])
    assert [n.id for n in merged.nodes] == list(range(5))
    assert [len(i.tensors) for i in merged.invokes] == [1, 1, 1]
    assert merged.invokes[2].tensors == ["p1.y"] and merged.nodes[2].invoke == 2
    assert merged.nodes[3].args == [Ref(2), TensorRef("p1.c")]
    assert merged.nodes[4].args == [Ref(3)]
    assert set(merged.tensors) == {"p0.in0", "p1.x", "p1.y", "p1.c"}
    assert mapping.ids == [{0: 0, 1: 1}, {5: 2, 9: 3, 12: 4}]
    parts = split_values({1: "a-saved", 4: "b-saved"}, mapping)
    assert parts == [{1: "a-saved"}, {12: "b-saved"}]
    encode_plan(merged)  # a valid, encodable plan
    # the inputs are untouched (pure function)
    assert [n.id for n in b.nodes] == [5, 9, 12] and set(b.tensors) == {"x", "y", "c"}


def test_only_single_pass_traces_with_own_rows_merge():
    gen = _plan([1], [], mode="generate")
    assert not can_merge(gen)
    all_rows = _plan([1], [Node(0, "point", path="model.layers.0", io="output", invoke=None)])
    assert not can_merge(all_rows)
    ok = _plan([1], [Node(0, "point", path="model.layers.0", io="output", invoke=0)])
    assert can_merge(ok)
    with pytest.raises(SchemaError):
        merge_plans([ok, gen])
    embeds = Plan(model=MODEL, model_version="v", invokes=[Invoke("embeds", ["e"])], nodes=[],
                  tensors={"e": torch.zeros(2, 64)})
    with pytest.raises(SchemaError, match="not"):
        merge_plans([ok, embeds])  # tokens and embeddings cannot share a pass
    with pytest.raises(SchemaError):
        merge_plans([])


def test_merged_run_gives_each_plan_its_solo_tensors(engine_backend):
    """Different lengths (padding), reads, a write on one plan's rows: each part equals
    its solo run, and the write does not reach the other plan's rows."""
    import tpmlab

    lab = tpmlab.Lab(engine_backend)
    m = lab.model(MODEL)
    prompts = ["The Eiffel Tower is in", "Hello", "a b c d e f g h i j"]
    plans = []
    for i, p in enumerate(prompts):
        tr = m.trace(p)
        with tr:
            if i == 1:
                m.layers[0].output[:, -1] = 0.5
            h = m.layers[1].output.save()
            lg = m.output.logits[:, -1].save()
        plans.append((tr.plan(), h._node, lg._node))
    solo = [engine_backend.run_values(MODEL, encode_plan(p))[0] for p, _, _ in plans]
    merged, mapping = merge_plans([p for p, _, _ in plans])
    values, _ = engine_backend.run_values(MODEL, encode_plan(merged))
    parts = split_values(values, mapping)
    for (_, h, lg), alone, part in zip(plans, solo, parts):
        assert set(part) == set(alone)
        torch.testing.assert_close(part[h], alone[h], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(part[lg], alone[lg], atol=1e-4, rtol=1e-4)


def test_a_merged_pass_stops_early_only_if_every_plan_stops():
    nodes = [Node(0, "point", path="model.layers.0", io="output", invoke=0),
             Node(1, "save", [Ref(0)])]
    stop, full = _plan([1, 2], nodes, stop=True), _plan([3], nodes)
    assert merge_plans([stop, stop])[0].stop
    assert not merge_plans([stop, full])[0].stop
    from tpmlab.ir.codec import decode_plan

    assert decode_plan(encode_plan(stop)).stop and not decode_plan(encode_plan(full)).stop


def test_merge_budget_bounds_requests_rows_cells_and_fill():
    from tpmlab.ir.merge import MergeBudget

    group = MergeBudget(max_requests=3, max_rows=4, max_cells=40, min_fill=0.6).group([10])
    assert group.add([8])  # 2 rows x 10 = 20 cells, 18 real
    assert not group.add([2, 2])  # 4 rows x 10 = 40 cells, 22 real: fill 0.55 < 0.6 ...
    assert (group.requests, group.rows, group.real) == (2, 2, 18)  # ... refused left it as is
    assert group.add([10])  # 3 requests, 3 rows, 30 cells
    assert not group.add([1])  # a 4th request
    tall = MergeBudget(max_rows=2, max_cells=None, min_fill=0.0).group([5])
    assert tall.add([500]) and not tall.add([1])  # rows, and no cell bound
    sparse = MergeBudget(max_cells=None, min_fill=0.75).group([100])
    assert not sparse.add([1])  # 101 real tokens of 200 cells
    assert sparse.add([90])
