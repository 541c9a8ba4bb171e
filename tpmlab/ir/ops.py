"""The op whitelist: the only tensor operations a plan may contain.

Each op is a name, the function that runs it, and the facts about memory that the
one data-flow analysis (:func:`tpmlab.ir.schedule.build_schedule`) needs to know
which values may share memory with a module value or a parameter, and so which
ops write them:

``mutates``
    writes into its first argument in place and returns it (``setitem``, ``iadd``,
    ``zero_``).
``view``
    returns a view of its first argument: shares its memory, allocates nothing.
``may_alias``
    may return one of its arguments itself or a view of it, else a copy
    (``float()`` of a float tensor, ``contiguous()``, ``reshape``, ``+x``, ``einsum``).
``holds``
    returns a container of its arguments (``make_list``): the items keep their memory.
``joins``
    on lists, tuples or dicts builds a container of their items (``+``, ``*``, ``|``).
``many``
    returns a tuple of views of its first argument (``unbind``, ``split``).
``factory``
    makes a new tensor from plain numbers and takes ``device=`` (``zeros``).

Ops never write through keywords: :data:`WRITE_KEYWORDS` (``out=``, ``inplace=``)
are refused by validation, and functions that take them positionally are wrapped.

Adding an op is adding one line here; nothing else in tpmlab names tensor ops.
Every name is registered once (a second registration is an error at import): a
Python operator, its reflected form (``1 - h``), and the tensor method of the same
name (``h.sub(x, alpha=2)``) all record the one op, whose function accepts the
operands in either order and the method's keywords.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from ..errors import TpmlabError


class DuplicateOpError(TpmlabError, ValueError):
    """Two ops were registered under one name (the later one would silently replace the first)."""


@dataclass(frozen=True)
class OpSpec:
    name: str
    fn: Callable[..., Any]
    mutates: bool = False
    view: bool = False
    may_alias: bool = False
    holds: bool = False
    joins: bool = False
    many: bool = False
    factory: bool = False

    @property
    def aliases_first(self) -> bool:
        """Whether the result may share memory with the first argument."""
        return self.mutates or self.view or self.may_alias


# Keywords through which a torch function writes into a tensor it is given: never allowed
# in a plan, since writes must be ops that the data-flow analysis can see.
WRITE_KEYWORDS = frozenset({"out", "inplace"})


def _setitem(x: torch.Tensor, index: Any, value: Any, /) -> torch.Tensor:
    x[index] = value
    return x


def _add(a: Any, b: Any, *, alpha: Any = None) -> Any:
    """``a + b``, or ``a + alpha * b`` in one kernel as ``Tensor.add(b, alpha=)`` computes it."""
    return operator.add(a, b) if alpha is None else torch.add(a, b, alpha=alpha)


def _sub(a: Any, b: Any, *, alpha: Any = None) -> Any:
    """``a - b``, or ``a - alpha * b`` as ``Tensor.sub(b, alpha=)`` computes it."""
    return operator.sub(a, b) if alpha is None else torch.sub(a, b, alpha=alpha)


def _div(a: Any, b: Any, *, rounding_mode: str | None = None) -> Any:
    """``torch.div``: true division, or rounded ("trunc", "floor") as ``Tensor.div`` offers."""
    return torch.div(a, b, rounding_mode=rounding_mode)


def _method(name: str) -> Callable[..., Any]:
    def call(x: Any, /, *args: Any, **kwargs: Any) -> Any:
        return getattr(x, name)(*args, **kwargs)

    call.__name__ = name
    call.is_method = True  # type: ignore[attr-defined]
    return call


# Attributes a plan may read with ``getattr``: fields of model outputs and a few
# tensor properties. Anything else (dunders, methods, module internals) is refused.
SAFE_TENSOR_ATTRS = frozenset({"T", "mT", "shape", "ndim", "dtype", "real", "imag", "values", "indices"})


def named_fields(x: Any) -> tuple[str, ...] | None:
    """Field names of a named tuple or a torch structseq (``topk`` -> values, indices)."""
    if not isinstance(x, tuple):
        return None
    return getattr(x, "_fields", None) or getattr(type(x), "__match_args__", None) or None


def _getattr(x: Any, name: str, /) -> Any:
    if isinstance(x, dict):  # ModelOutput is a dict: read the field, never an attribute
        if name not in x:
            raise AttributeError(f"the value has no field {name!r}; it has {sorted(x.keys())}")
        return x[name]
    fields = named_fields(x)
    if fields:  # named tuples and torch structseqs (topk, max, sort)
        if name not in fields:
            raise AttributeError(f"the value has no field {name!r}; it has {list(fields)}")
        return getattr(x, name)
    if name in SAFE_TENSOR_ATTRS and isinstance(x, torch.Tensor):
        return getattr(x, name)
    raise AttributeError(f"reading attribute {name!r} of a {type(x).__name__} is not allowed")


def _silu(x: torch.Tensor, /) -> torch.Tensor:
    """``F.silu`` without its ``inplace`` argument (a write validation could not see)."""
    return F.silu(x)


def _normalize(x: torch.Tensor, /, p: float = 2.0, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize`` without its ``out`` argument."""
    return F.normalize(x, p, dim, eps)


def _random_like(draw: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.randn_like``-style op drawing from a generator seeded with ``seed`` (recorded
    in the plan, so the same plan draws the same numbers on any engine of one device type)."""
    def fn(x: torch.Tensor, /, *, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or x.dtype
        if x.device.type == "meta":
            return torch.empty(x.shape, dtype=dtype, device="meta")
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        return draw(x.shape, generator=gen, dtype=dtype, device=x.device)

    fn.__name__ = f"{draw.__name__}_like"
    return fn


def _size(x: torch.Tensor, dim: int | None = None, /) -> Any:
    return tuple(x.shape) if dim is None else x.shape[dim]


_OPS: list[OpSpec] = [
    # indexing and attributes
    OpSpec("getitem", operator.getitem, view=True),
    OpSpec("setitem", _setitem, mutates=True),
    OpSpec("getattr", _getattr, view=True),
    OpSpec("size", _size),
    # arithmetic: the operator functions, so that either operand may be a Python number
    OpSpec("add", _add, joins=True),  # on lists and tuples: a container of their items
    OpSpec("sub", _sub),
    OpSpec("div", _div),
    *(OpSpec(n, getattr(operator, n), joins=n in ("mul", "or_")) for n in (
        "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg",
        "abs", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "invert")),
    OpSpec("pos", operator.pos, may_alias=True),  # +x is x
    *(OpSpec(n, getattr(operator, n), mutates=True, joins=n in ("iadd", "imul")) for n in (
        "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow")),
    # reshaping (views share memory with their input)
    *(OpSpec(n, _method(n), view=True) for n in (
        "view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "narrow", "select",
        "t", "movedim", "diagonal")),
    *(OpSpec(n, _method(n), view=True, many=True) for n in ("unbind", "split", "chunk")),
    # a view when they can, else a copy; conversions that return the tensor itself when it
    # already has the dtype / device / layout asked for
    *(OpSpec(n, _method(n), may_alias=True) for n in (
        "reshape", "flatten", "unflatten", "contiguous", "detach", "float", "half", "bfloat16",
        "double", "long", "int", "bool", "to", "type_as")),
    # tensor methods without side effects
    *(OpSpec(n, _method(n)) for n in (
        "clone", "softmax", "log_softmax", "topk", "argmax", "argmin", "max",
        "min", "norm", "sum", "mean", "std", "var", "prod", "exp", "log", "log1p", "sqrt",
        "rsqrt", "square", "tanh", "sigmoid", "relu", "sin", "cos", "clamp", "sign",
        "cumsum", "sort", "argsort", "gather", "index_select", "masked_fill", "where",
        "logsumexp", "amax", "amin", "all", "any", "numel", "dim", "repeat", "flip", "roll",
        "nan_to_num", "isnan", "isfinite", "round", "floor", "ceil",
        "reciprocal", "outer", "dot", "bmm", "mm",
        "new_zeros", "new_ones", "new_full", "zeros_like",
        "count_nonzero", "median", "kthvalue", "mode", "tril", "triu")),
    # in-place methods
    *(OpSpec(n, _method(n), mutates=True) for n in (
        "add_", "sub_", "mul_", "div_", "copy_", "clamp_", "masked_fill_", "index_add_",
        "scatter_", "scatter_add_", "index_copy_", "index_fill_", "zero_", "fill_")),
    # functions of several tensors
    OpSpec("cat", torch.cat),
    OpSpec("stack", torch.stack),
    OpSpec("einsum", torch.einsum, may_alias=True),  # "ij->ji" is a view of its operand
    OpSpec("torch_where", torch.where),
    OpSpec("zeros", torch.zeros, factory=True),
    OpSpec("ones", torch.ones, factory=True),
    OpSpec("full", torch.full, factory=True),
    OpSpec("arange", torch.arange, factory=True),
    OpSpec("ones_like", torch.ones_like),
    OpSpec("zeros_like_fn", torch.zeros_like),
    OpSpec("full_like", torch.full_like),
    OpSpec("tensor", torch.tensor, factory=True),
    OpSpec("vector_norm", torch.linalg.vector_norm),
    OpSpec("cosine_similarity", F.cosine_similarity),
    OpSpec("normalize", _normalize),
    OpSpec("kl_div", F.kl_div),
    OpSpec("cross_entropy", F.cross_entropy),
    OpSpec("gelu", F.gelu),
    OpSpec("silu", _silu),
    OpSpec("layer_norm", F.layer_norm),
    OpSpec("linear", F.linear),  # x @ weight.T + bias: what nn.Linear computes
    # random values from a seeded generator (the tracer gives each node its seed)
    OpSpec("randn_like", _random_like(torch.randn)),
    OpSpec("rand_like", _random_like(torch.rand)),
    OpSpec("one_hot", F.one_hot),
    # containers: build a tuple/list value from node values (e.g. for cat)
    OpSpec("make_list", lambda *items: list(items), holds=True),
    OpSpec("make_tuple", lambda *items: tuple(items), holds=True),
]


def build_table(specs: Iterable[OpSpec]) -> dict[str, OpSpec]:
    """The op table by name; a name registered twice raises :class:`DuplicateOpError`."""
    table: dict[str, OpSpec] = {}
    for spec in specs:
        if spec.name in table:
            raise DuplicateOpError(f"op {spec.name!r} is registered twice: {table[spec.name].fn!r} "
                                   f"and {spec.fn!r}; give one of them another name")
        table[spec.name] = spec
    return table


OPS: dict[str, OpSpec] = build_table(_OPS)

# Ops that are not method calls but that a proxy also offers as the tensor methods of the same
# name (``h.sub(x, alpha=2)``, ``h.abs()``): for a tensor first operand both compute the same.
OPERATOR_METHODS = frozenset({
    "add", "sub", "mul", "div", "pow", "matmul", "neg", "abs", "eq", "ne", "lt", "le", "gt", "ge"})

# Ops that draw random numbers: each node carries its generator's ``seed`` keyword.
RANDOM_OPS = frozenset({"randn_like", "rand_like"})

# torch functions a proxy may be passed to (via __torch_function__), mapped to ops.
TORCH_FUNCTIONS: dict[Callable[..., Any], str] = {
    torch.cat: "cat", torch.concat: "cat", torch.stack: "stack", torch.einsum: "einsum",
    torch.where: "torch_where", torch.softmax: "softmax", torch.log_softmax: "log_softmax",
    F.softmax: "softmax", F.log_softmax: "log_softmax", torch.topk: "topk",
    torch.argmax: "argmax", torch.argmin: "argmin", torch.matmul: "matmul", torch.sum: "sum",
    torch.mean: "mean", torch.norm: "norm", torch.linalg.vector_norm: "vector_norm",
    torch.exp: "exp", torch.log: "log", torch.sqrt: "sqrt", torch.tanh: "tanh",
    torch.sigmoid: "sigmoid", torch.relu: "relu", F.relu: "relu", torch.transpose: "transpose",
    torch.reshape: "reshape", torch.flatten: "flatten", torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze", torch.permute: "permute", torch.clamp: "clamp",
    torch.gather: "gather", torch.cumsum: "cumsum", torch.sort: "sort",
    torch.argsort: "argsort", torch.logsumexp: "logsumexp", torch.max: "max", torch.min: "min",
    torch.abs: "abs", torch.zeros_like: "zeros_like_fn", torch.ones_like: "ones_like",
    torch.full_like: "full_like", torch.outer: "outer", torch.bmm: "bmm", torch.mm: "mm",
    F.cosine_similarity: "cosine_similarity", F.normalize: "normalize", F.kl_div: "kl_div",
    F.cross_entropy: "cross_entropy", F.gelu: "gelu", F.silu: "silu",
    F.layer_norm: "layer_norm", F.linear: "linear", F.one_hot: "one_hot", torch.index_select: "index_select",
    torch.masked_fill: "masked_fill", torch.amax: "amax", torch.amin: "amin",
    torch.square: "square", torch.rsqrt: "rsqrt", torch.flip: "flip", torch.roll: "roll",
    torch.randn_like: "randn_like", torch.rand_like: "rand_like",
    torch.tril: "tril", torch.triu: "triu", torch.dot: "dot", torch.median: "median",
    torch.add: "add", torch.sub: "sub", torch.subtract: "sub", torch.mul: "mul",
    torch.multiply: "mul", torch.div: "div", torch.divide: "div", torch.true_divide: "truediv",
    torch.floor_divide: "floordiv", torch.remainder: "mod", torch.pow: "pow", torch.neg: "neg",
    torch.eq: "eq", torch.ne: "ne", torch.lt: "lt", torch.le: "le", torch.gt: "gt", torch.ge: "ge",
    # A real tensor left of an operator (``w @ h``, ``t - h``) runs the tensor's own dunder,
    # which hands torch's __torch_function__ protocol these functions instead of calling the
    # proxy's reflected dunder.
    torch.Tensor.add: "add", torch.Tensor.sub: "sub", torch.Tensor.mul: "mul",
    torch.Tensor.div: "div", torch.Tensor.__floordiv__: "floordiv",
    torch.Tensor.remainder: "mod", torch.Tensor.__pow__: "pow", torch.Tensor.matmul: "matmul",
    torch.Tensor.__and__: "and_", torch.Tensor.__or__: "or_", torch.Tensor.__xor__: "xor",
    torch.Tensor.eq: "eq", torch.Tensor.ne: "ne", torch.Tensor.lt: "lt", torch.Tensor.le: "le",
    torch.Tensor.gt: "gt", torch.Tensor.ge: "ge",
}

# Python operators on proxies -> ops (reflected forms swap their operands).
BINARY_DUNDERS = {
    "__add__": "add", "__sub__": "sub", "__mul__": "mul", "__truediv__": "truediv",
    "__floordiv__": "floordiv", "__mod__": "mod", "__pow__": "pow", "__matmul__": "matmul",
    "__eq__": "eq", "__ne__": "ne", "__lt__": "lt", "__le__": "le", "__gt__": "gt",
    "__ge__": "ge", "__and__": "and_", "__or__": "or_", "__xor__": "xor",
}
REFLECTED_DUNDERS = {
    "__radd__": "add", "__rsub__": "sub", "__rmul__": "mul", "__rtruediv__": "truediv",
    "__rfloordiv__": "floordiv", "__rmod__": "mod", "__rpow__": "pow", "__rmatmul__": "matmul",
    "__rand__": "and_", "__ror__": "or_", "__rxor__": "xor",
}
INPLACE_DUNDERS = {
    "__iadd__": "iadd", "__isub__": "isub", "__imul__": "imul", "__itruediv__": "itruediv",
    "__ifloordiv__": "ifloordiv", "__imod__": "imod", "__ipow__": "ipow",
}
UNARY_DUNDERS = {"__neg__": "neg", "__pos__": "pos", "__abs__": "abs", "__invert__": "invert"}

# Methods callable on a proxy as ``proxy.name(...)``: every op that runs as a method.
METHOD_OPS = (frozenset(n for n, s in OPS.items() if getattr(s.fn, "is_method", False))
              | OPERATOR_METHODS | {"size"})


def lookup(name: str) -> OpSpec | None:
    return OPS.get(name)
