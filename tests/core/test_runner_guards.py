"""What validation cannot see, the runner checks before the op runs, with a plan error that
names the node: a plan never names a device, indices stay inside the value they index,
and plain (non-tensor) values are held to the size limit like tensors."""

from __future__ import annotations

import pytest
import torch

from tpmlab.errors import IndexBoundsError, LimitError, PlanError, UnknownOpError
from tpmlab.ir.codec import encode_plan
from tpmlab.ir.plan import DType, Invoke, Node, Plan, Ref, Slice, TensorRef, Tuple
from tpmlab.ir.validate import Limits, validate

MODEL = "tiny-llama"
LAYER = "model.layers.0"


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model(MODEL)


def _plan(model, *nodes: Node, tensors: dict | None = None) -> Plan:
    return Plan(model=model.name, model_version=model.info.version,
                invokes=[Invoke("tokens", ["ids"])],
                tensors={"ids": torch.tensor([1, 2, 3, 4]), **(tensors or {})},
                nodes=[Node(0, "point", path=LAYER, io="output", invoke=0), *nodes])


@pytest.mark.parametrize("node", [
    Node(1, "to", [Ref(0), "cuda:1"], line="x.py:1"),
    Node(1, "to", [Ref(0)], {"device": "cpu"}, line="x.py:1"),
    Node(1, "zeros", [3], {"device": "cuda:1"}, line="x.py:1"),
    Node(1, "new_zeros", [Ref(0), [2]], {"device": "cpu"}, line="x.py:1"),
    Node(1, "cuda", [Ref(0)], line="x.py:1"),
    Node(1, "cpu", [Ref(0)], line="x.py:1"),
], ids=["to-str", "to-device", "zeros-device", "new_zeros-device", "cuda", "cpu"])
def test_a_plan_cannot_name_a_device(model, node):
    with pytest.raises(UnknownOpError, match="a plan cannot name a device") as err:
        validate(_plan(model, node), model.info)
    assert err.value.node == 1 and err.value.line == "x.py:1"


def test_a_dtype_conversion_with_to_is_still_allowed(model):
    validate(_plan(model, Node(1, "to", [Ref(0), DType("float16")]), Node(2, "save", [Ref(1)])),
             model.info)


@pytest.mark.parametrize("index, message", [
    (torch.tensor([0, 7]), "index 7 is out of bounds for dimension 1 of size 4"),
    (torch.tensor([-5]), "index -5 is out of bounds for dimension 1 of size 4"),
])
def test_a_tensor_index_out_of_bounds_is_a_plan_error(local_lab, model, index, message):
    plan = _plan(model, Node(1, "getitem", [Ref(0), _index(TensorRef("i"))], line="x.py:2"),
                 Node(2, "save", [Ref(1)]), tensors={"i": index})
    with pytest.raises(IndexBoundsError, match=message) as err:
        local_lab.backend.run_values(MODEL, encode_plan(plan))
    assert err.value.node == 1 and err.value.line == "x.py:2"
    assert isinstance(err.value, PlanError)  # the plan's fault, named as such


def test_gather_and_index_select_out_of_bounds_are_plan_errors(local_lab, model):
    bad = torch.tensor([0, 9])
    for op, args in (("index_select", [Ref(0), 1, TensorRef("i")]),
                     ("gather", [Ref(0), 1, TensorRef("g")])):
        plan = _plan(model, Node(1, op, args, line="x.py:3"), Node(2, "save", [Ref(1)]),
                     tensors={"i": bad, "g": torch.full((1, 4, 64), 9)})
        with pytest.raises(IndexBoundsError, match="out of bounds for dimension 1 of size 4"):
            local_lab.backend.run_values(MODEL, encode_plan(plan))


def test_an_int_index_past_a_generation_steps_length_is_a_plan_error(model):
    """Validation sees the prompt pass ([1, 4, d]); at later steps the position axis is 1."""
    with pytest.raises(IndexBoundsError, match="index 3 is out of bounds for dimension 1 of size 1"):
        with model.generate(torch.tensor([1, 2, 3, 4]), max_new_tokens=2) as gen:
            with gen.all():
                model.layers[0].output[:, 3].save()


def test_a_plain_value_made_at_run_time_is_held_to_the_size_limit(local_lab, model):
    """``[0] * n`` with ``n`` computed from the data: validation cannot know n, the runner
    refuses before the list is made."""
    plan = _plan(model,
                 Node(1, "abs", [Ref(0)]), Node(2, "sum", [Ref(1)]),
                 Node(3, "mul", [Ref(2), 0.0]), Node(4, "add", [Ref(3), 100_000]),
                 Node(5, "long", [Ref(4)]), Node(6, "make_list", [0]),
                 Node(7, "mul", [Ref(6), Ref(5)], line="x.py:4"), Node(8, "save", [Ref(7)]))
    with pytest.raises(LimitError, match="over the limit of 10,000 bytes") as err:
        local_lab.backend.run_values(MODEL, encode_plan(plan),
                                     limits=Limits(max_intermediate_bytes=10_000))
    assert err.value.node == 7


def _index(t: TensorRef) -> Tuple:
    return Tuple((Slice(None, None, None), t))
