"""Index bounds, checked on the live values before an indexing op runs.

Validation checks indices against the shapes it knows (the prompt pass, on meta
tensors); it cannot know the values of index tensors, nor the shapes of later
generation steps (the position axis is 1 there). An index out of range is an
``IndexError`` from torch on the CPU, and on a GPU a device-side assert that poisons
the worker's CUDA context for every later request. So the runner checks each
indexing op's indices first (:func:`check_bounds`) and refuses with a
:class:`~tpmlab.errors.IndexBoundsError` (a plan error, and an execution error) naming the index, the dimension and its size.

Checked: ``x[...]`` reads and writes (ints, integer and boolean tensors, integer lists,
slices' steps), ``select``, ``narrow``, ``index_select``/``index_add_``/``index_copy_``/
``index_fill_`` and ``gather``/``scatter_``/``scatter_add_``. Reading an integer tensor's
range costs one reduction (and on a GPU one wait for it).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import IndexBoundsError
from ..ir.plan import Node

_DIM_INDEX_OPS = frozenset({"index_select", "index_add_", "index_copy_", "index_fill_",
                            "gather", "scatter_", "scatter_add_"})


def check_bounds(node: Node, args: list, kwargs: dict) -> None:
    """Raise an :class:`IndexBoundsError` for ``node`` if the indices it is given (native
    arguments) fall outside the value they index."""
    op = node.op
    if op not in ("getitem", "setitem", "select", "narrow") and op not in _DIM_INDEX_OPS:
        return
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return  # lists, tuples, dicts and model outputs raise their own plain errors
    problem = None
    if op in ("getitem", "setitem") and len(args) >= 2:
        problem = _index_problem(tuple(x.shape), args[1])
    elif op in ("select", "narrow"):
        dim, start = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "index" if op == "select"
                                                          else "start")
        if isinstance(dim, int) and isinstance(start, int):
            problem = _dim_problem(tuple(x.shape), dim) or _int_problem(start, x.shape[dim], dim)
            length = _arg(args, kwargs, 3, "length")
            if problem is None and op == "narrow" and isinstance(length, int):
                size, begin = x.shape[dim], start % x.shape[dim] if start < 0 else start
                if length < 0 or begin + length > size:
                    problem = (f"narrow({dim}, {start}, {length}) reaches past dimension {dim} "
                               f"of size {size}")
    else:
        dim, index = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "index")
        if isinstance(dim, int) and isinstance(index, torch.Tensor):
            problem = _dim_problem(tuple(x.shape), dim) or _tensor_problem(index, x.shape[dim],
                                                                           dim % max(x.dim(), 1))
    if problem:
        raise IndexBoundsError(f"{op}: {problem}", node=node.id, op=node.op, line=node.line)


def _arg(args: list, kwargs: dict, pos: int, name: str) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name)


def _dim_problem(shape: tuple[int, ...], dim: int) -> str | None:
    n = max(len(shape), 1)
    if not -n <= dim < n:
        return f"dimension {dim} does not exist in a value of shape {list(shape)}"
    return None


def _int_problem(i: int, size: int, dim: int) -> str | None:
    if not -size <= i < size:
        return f"index {i} is out of bounds for dimension {dim} of size {size}"
    return None


def _tensor_problem(index: torch.Tensor, size: int, dim: int) -> str | None:
    if index.is_floating_point() or index.dtype == torch.bool or index.numel() == 0:
        return None
    lo, hi = int(index.min()), int(index.max())
    bad = hi if hi >= size else lo
    if lo < -size or hi >= size:
        return f"index {bad} is out of bounds for dimension {dim} of size {size}"
    return None


def _index_problem(shape: tuple[int, ...], index: Any) -> str | None:
    """The first index of ``x[index]`` outside ``shape``, walking the index's items over
    the dimensions they consume (``None`` adds one, ``...`` stands for the rest)."""
    items = index if isinstance(index, tuple) else (index,)

    def consumes(item: Any) -> int:
        if item is None or item is Ellipsis or isinstance(item, bool):
            return 0
        if isinstance(item, torch.Tensor) and item.dtype == torch.bool:
            return max(item.dim(), 1)
        return 1

    used = sum(consumes(i) for i in items)
    dim = 0
    for k, item in enumerate(items):
        if item is Ellipsis:
            dim = max(len(shape) - sum(consumes(i) for i in items[k + 1:]), dim)
            continue
        if item is None or isinstance(item, bool):
            continue
        if dim >= len(shape):
            return (f"too many indices for a value of shape {list(shape)}: {used} dimensions "
                    "indexed")
        size = shape[dim]
        if isinstance(item, int):
            problem = _int_problem(item, size, dim)
            if problem:
                return problem
        elif isinstance(item, slice):
            if isinstance(item.step, int) and item.step <= 0:
                return f"slice step {item.step} on dimension {dim}: steps must be positive"
        elif isinstance(item, torch.Tensor):
            if item.dtype == torch.bool:
                want = shape[dim:dim + max(item.dim(), 1)]
                if item.dim() and tuple(item.shape) != tuple(want):
                    return (f"a boolean mask of shape {list(item.shape)} does not match "
                            f"dimensions {dim}.. of shape {list(shape)}")
            else:
                problem = _tensor_problem(item, size, dim)
                if problem:
                    return problem
        elif isinstance(item, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in item):
            for v in item:
                problem = _int_problem(v, size, dim)
                if problem:
                    return problem
        dim += consumes(item)
    return None
