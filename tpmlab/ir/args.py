"""The grammar of a plan node's arguments, and the one walker over it.

An argument value (``Node.args``, ``Node.kwargs``) is one of

* a leaf: ``None``, a bool, int, float or str, or a marker that stands for one value:
  :class:`Ref` (another node's value), :class:`TensorRef`
  (a constant of the plan's tensor table), :class:`EllipsisArg` (``...``),
  :class:`DType` (a torch dtype);
* a container: a list, a dict with string keys, :class:`Tuple` (a tuple:
  JSON has only lists) or :class:`Slice` (its start, stop and step are
  argument values).

Everything that reads or rewrites arguments goes through the three walkers here:
:func:`leaves` (every leaf: references, checks), :func:`rebuild` (a copy with leaves
replaced: renaming for merged plans, or the *native* values an op receives: ``slice``,
``tuple``, ``Ellipsis``, ``torch.dtype``) and :func:`from_native` (the tracer's way in:
Python values to markers). The JSON form is the codec's (:mod:`tpmlab.ir.codec`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


# -- the markers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    """A reference to the value of another node."""

    id: int


@dataclass(frozen=True)
class TensorRef:
    """A constant tensor carried in the plan's tensor table."""

    name: str


@dataclass(frozen=True)
class Slice:
    start: Any = None
    stop: Any = None
    step: Any = None


@dataclass(frozen=True)
class Tuple:
    """A tuple (JSON has only lists; indexing needs the distinction)."""

    items: tuple


@dataclass(frozen=True)
class EllipsisArg:
    pass


@dataclass(frozen=True)
class DType:
    name: str


LEAF_MARKERS = (Ref, TensorRef, EllipsisArg, DType)
SCALARS = (bool, int, float, str)


def leaves(value: Any, *, key: Callable[[Any], None] | None = None) -> Iterator[Any]:
    """Every leaf of ``value``, depth first (a slice's parts and a tuple's items included).
    ``key`` is called with every dict key on the way (to check them). A Python tuple is
    walked like a list (merging rewrites what the tracer made before encoding)."""
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v, key=key)
    elif isinstance(value, Tuple):
        yield from leaves(value.items, key=key)
    elif isinstance(value, Slice):
        yield from leaves((value.start, value.stop, value.step), key=key)
    elif isinstance(value, dict):
        for k, v in value.items():
            if key is not None:
                key(k)
            yield from leaves(v, key=key)
    else:
        yield value


def refs(value: Any) -> list[int]:
    """Ids of the nodes ``value`` reads, in order."""
    return [v.id for v in leaves(value) if isinstance(v, Ref)]


def rebuild(value: Any, leaf: Callable[[Any], Any], *, native: bool = False) -> Any:
    """A copy of ``value`` with every leaf ``x`` replaced by ``leaf(x)``.

    ``native=True`` builds what an op receives: a :class:`Slice` becomes a ``slice``, a
    :class:`Tuple` a ``tuple``, :class:`EllipsisArg` ``...`` and :class:`DType` a
    ``torch.dtype`` (those two without calling ``leaf``)."""
    if isinstance(value, list):
        return [rebuild(v, leaf, native=native) for v in value]
    if isinstance(value, tuple):
        return tuple(rebuild(v, leaf, native=native) for v in value)
    if isinstance(value, dict):
        return {k: rebuild(v, leaf, native=native) for k, v in value.items()}
    if isinstance(value, Tuple):
        items = tuple(rebuild(v, leaf, native=native) for v in value.items)
        return items if native else Tuple(items)
    if isinstance(value, Slice):
        parts = [rebuild(v, leaf, native=native) for v in (value.start, value.stop, value.step)]
        return slice(*parts) if native else Slice(*parts)
    if native and isinstance(value, EllipsisArg):
        return Ellipsis
    if native and isinstance(value, DType):
        return getattr(torch, value.name)
    return leaf(value)


def from_native(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """The argument value for a Python value (the inverse of ``rebuild(..., native=True)``):
    ``slice``, ``tuple``, ``...`` and ``torch.dtype`` become markers, lists and dicts (keys
    made strings) are walked, and every other value ``x`` becomes ``leaf(x)`` (the tracer
    turns its proxies into :class:`Ref` and tensors into :class:`TensorRef` there)."""
    if isinstance(value, slice):
        return Slice(*(from_native(v, leaf) for v in (value.start, value.stop, value.step)))
    if value is Ellipsis:
        return EllipsisArg()
    if isinstance(value, torch.dtype):
        return DType(str(value).removeprefix("torch."))
    if isinstance(value, tuple):  # torch.Size too
        return Tuple(tuple(from_native(v, leaf) for v in value))
    if isinstance(value, list):
        return [from_native(v, leaf) for v in value]
    if isinstance(value, dict):
        return {str(k): from_native(v, leaf) for k, v in value.items()}
    return leaf(value)
