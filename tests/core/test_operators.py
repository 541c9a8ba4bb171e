"""Python operators, their reflected forms and tensor-method forms on traced values give
the same tensors as eager torch on the same values, and the op table has one entry per name."""

from __future__ import annotations

import operator

import pytest
import torch

from tpmlab.ir import ops as irops

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def model(local_lab):
    # The ops do not depend on the architecture: one tiny model is enough.
    return local_lab.model("tiny-llama")


def _positive(h):
    """A strictly positive float value (for division, modulo and powers)."""
    return h.abs() + 0.5


def _mask(h):
    return h > 0


def _ints(h):
    return (h * 4).long()


W = torch.linspace(-1, 1, 12).reshape(3, 4)  # a constant left operand: ``W @ x[0, :4]``

# name -> (what the traced value becomes first, the expression on it). Each expression runs
# once on a proxy inside a trace and once on the eager tensor that the same trace saved.
REFLECTED = {
    "__radd__": (None, lambda x: 2 + x),
    "__rsub__": (None, lambda x: 1 - x),
    "__rsub__ float": (None, lambda x: 0.25 - x),
    "__rmul__": (None, lambda x: 3 * x),
    "__rtruediv__": (_positive, lambda x: 1 / x),
    "__rfloordiv__": (_positive, lambda x: 2 // x),
    "__rpow__": (None, lambda x: 2 ** x),
    "__rmod__": (_positive, lambda x: 1.5 % x),
    "__rand__ bool": (_mask, lambda x: True & x),
    "__ror__ bool": (_mask, lambda x: False | x),
    "__rxor__ bool": (_mask, lambda x: True ^ x),
    "__rand__ int": (_ints, lambda x: 6 & x),
    "__ror__ int": (_ints, lambda x: 5 | x),
    "__rxor__ int": (_ints, lambda x: 3 ^ x),
}
UNARY = {
    "__neg__": (None, operator.neg),
    "__pos__": (None, operator.pos),
    "__abs__": (None, abs),
    "__invert__ bool": (_mask, operator.invert),
    "__invert__ int": (_ints, operator.invert),
}
FORWARD = {
    "__add__": (None, lambda x: x + 2),
    "__sub__": (None, lambda x: x - 1),
    "__mul__": (None, lambda x: x * 3),
    "__truediv__": (None, lambda x: x / 4),
    "__floordiv__": (None, lambda x: x // 0.5),
    "__mod__": (None, lambda x: x % 0.5),
    "__pow__": (_positive, lambda x: x ** 1.5),
    "__matmul__": (None, lambda x: x[0] @ x[0, :3].T),
    "comparisons": (None, lambda x: (x < 0) ^ (x <= 0.1) ^ (x > 0.2) ^ (x >= 0.3) ^ (x == x)
                    ^ (x != 0)),
}
# Tensor methods whose names are also operators: one op each, with the method's keywords.
METHODS = {
    "add alpha": (None, lambda x: x.add(x[:, :1], alpha=2)),
    "sub alpha": (None, lambda x: x.sub(1, alpha=0.5)),
    "mul": (None, lambda x: x.mul(x)),
    "pow": (None, lambda x: x.pow(2)),
    "div rounding_mode": (None, lambda x: x.div(0.3, rounding_mode="floor")),
    "eq ne lt le gt ge": (None, lambda x: x.eq(x).int() + x.ne(0).int() + x.lt(0).int()
                          + x.le(0).int() + x.gt(0).int() + x.ge(0).int()),
    "abs": (None, lambda x: x.abs()),
    "neg": (None, lambda x: x.neg()),
    "matmul": (None, lambda x: x[0].matmul(x[0].T)),
}
# A real tensor on the left of an operator reaches the traced value through torch's
# __torch_function__ protocol (the tensor's own dunder runs first), not the reflected dunder.
TENSOR_LEFT = {
    "tensor + x": (None, lambda x: torch.tensor([1.0]) + x),
    "tensor - x": (None, lambda x: torch.tensor([1.0]) - x),
    "tensor * x": (None, lambda x: torch.tensor([3.0]) * x),
    "tensor / x": (_positive, lambda x: torch.tensor([1.0]) / x),
    "tensor // x": (_positive, lambda x: torch.tensor([2.0]) // x),
    "tensor % x": (_positive, lambda x: torch.tensor([1.5]) % x),
    "tensor ** x": (None, lambda x: torch.tensor([2.0]) ** x),
    "tensor @ x": (None, lambda x: W @ x[0, :4]),
    "tensor & x": (_mask, lambda x: torch.tensor([True]) & x),
    "tensor | x": (_ints, lambda x: torch.tensor([5]) | x),
    "tensor ^ x": (_ints, lambda x: torch.tensor([3]) ^ x),
    "tensor < x": (None, lambda x: torch.tensor([0.0]) < x),
    "tensor == x": (None, lambda x: torch.tensor([0.0]) == x),
    "tensor.sub(x, alpha=)": (None, lambda x: torch.tensor([1.0]).sub(x, alpha=2)),
    "torch.sub(1, x)": (None, lambda x: torch.sub(1, x)),
    "torch.add(x, 1, alpha=)": (None, lambda x: torch.add(x, 1, alpha=3)),
    "torch.mul, pow, div": (_positive, lambda x: torch.div(torch.pow(torch.mul(x, 2), 2), 3)),
}
CASES = {**REFLECTED, **UNARY, **FORWARD, **METHODS, **TENSOR_LEFT}


def _check(model, prepare, expr):
    with model.trace(PROMPT):
        x = model.layers[0].output
        if prepare is not None:
            x = prepare(x)
        x = x.save()
        y = expr(x).save()
    expected = expr(x.value)
    assert y.value.dtype == expected.dtype
    torch.testing.assert_close(y.value, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_operator_matches_eager(model, case):
    prepare, expr = CASES[case]
    _check(model, prepare, expr)


def test_reflected_dunder_called_directly_swaps_operands(model):
    """``Proxy.__rmatmul__`` and ``__rsub__`` as Python calls them when the left operand
    gives up (returns NotImplemented)."""
    with model.trace(PROMPT):
        x = model.layers[0].output[0, :4].save()
        y = x.__rmatmul__(W).save()
        z = x.__rsub__(1).save()
    torch.testing.assert_close(y.value, W @ x.value)
    torch.testing.assert_close(z.value, 1 - x.value)


def test_reflected_operator_records_operands_in_order(model):
    with model.trace(PROMPT) as tr:
        x = model.layers[0].output
        (1 - x).save()
    plan = tr.plan()
    sub = next(n for n in plan.nodes if n.op == "sub")
    assert sub.args[0] == 1 and sub.kwargs == {}


def test_every_dunder_and_method_names_a_registered_op():
    for table in (irops.BINARY_DUNDERS, irops.REFLECTED_DUNDERS, irops.INPLACE_DUNDERS,
                  irops.UNARY_DUNDERS):
        for dunder, name in table.items():
            assert name in irops.OPS, f"{dunder} maps to unregistered op {name!r}"
    for name in irops.METHOD_OPS:
        assert name in irops.OPS, name
    for func, name in irops.TORCH_FUNCTIONS.items():
        assert name in irops.OPS, f"{func} maps to unregistered op {name!r}"


def test_registration_refuses_a_duplicate_name():
    specs = [irops.OpSpec("neg", operator.neg), irops.OpSpec("neg", lambda x: -x)]
    with pytest.raises(irops.DuplicateOpError, match="'neg'.*twice"):
        irops.build_table(specs)


def test_operator_ops_run_on_python_numbers():
    """The operator form works for any operands, not only when the first is a tensor."""
    assert irops.OPS["sub"].fn(1, torch.tensor(3.0)).item() == -2.0
    assert irops.OPS["sub"].fn(5, 2) == 3
    assert irops.OPS["pow"].fn(2, torch.tensor(3.0)).item() == 8.0
    assert irops.OPS["abs"].fn(-3) == 3
    torch.testing.assert_close(irops.OPS["add"].fn(torch.ones(2), torch.ones(2), alpha=3),
                               torch.full((2,), 4.0))


def test_a_zero_dimensional_constant_is_a_plan_constant(local_lab):
    """A 0-d tensor (``torch.tensor(2.0)``) is an ordinary constant: the plan's digest and
    the run take it like any other tensor."""
    model = local_lab.model("tiny-llama")
    with model.trace(torch.tensor([1, 2, 3])):
        h = model.layers[0].output
        scaled = (h * torch.tensor(2.0)).save()
        plain_h = h.save()
    torch.testing.assert_close(scaled.value, plain_h.value * 2.0)
