"""Values as they travel between stages and back to the client.

Tensors move to host memory (the next stage may be on another device or host) and
travel as numpy arrays: Dask pickles those with out-of-band buffers (no copy), while a
torch tensor inside a message falls back to plain pickling, about 0.2 GB/s. ``bfloat16``
and other dtypes numpy lacks travel as same-sized integer views. Containers (dicts, tuples, lists,
Hugging Face ``ModelOutput``) are kept with their type.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..ir.dtypes import INTEGER_VIEWS as _VIEWS


class _Viewed:
    """A tensor of a dtype numpy lacks, as an integer view of the same bytes."""

    __slots__ = ("dtype", "data")

    def __init__(self, dtype: str, data: torch.Tensor) -> None:
        self.dtype, self.data = dtype, data

    def __reduce__(self):
        return (_Viewed, (self.dtype, self.data))


class _Typed:
    """A mapping container (``ModelOutput``) with its class."""

    __slots__ = ("cls", "items")

    def __init__(self, cls: type, items: dict) -> None:
        self.cls, self.items = cls, items

    def __reduce__(self):
        return (_Typed, (self.cls, self.items))


def to_wire(value: Any) -> Any:
    """A host-memory, Dask-serializable form of ``value``."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype in _VIEWS:
            return _Viewed(str(t.dtype).removeprefix("torch."), t.view(_VIEWS[t.dtype]).numpy())
        return t.numpy()
    if isinstance(value, dict):
        items = {k: to_wire(v) for k, v in value.items()}
        return items if type(value) is dict else _Typed(type(value), items)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(to_wire(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_wire(v) for v in value)
    return value


def from_wire(value: Any, device: torch.device | str | None = None) -> Any:
    """The inverse of :func:`to_wire`; tensors go to ``device`` (stay on host if ``None``)."""
    if isinstance(value, _Viewed):
        t = _tensor(value.data).view(getattr(torch, value.dtype))
        return t.to(device, non_blocking=True) if device is not None else t
    if isinstance(value, np.ndarray):
        t = _tensor(value)
        return t.to(device, non_blocking=True) if device is not None else t
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if device is not None else value
    if isinstance(value, _Typed):
        items = {k: from_wire(v, device) for k, v in value.items.items()}
        try:
            return value.cls(**items)
        except TypeError:
            return items
    if isinstance(value, dict):
        return {k: from_wire(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(from_wire(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(from_wire(v, device) for v in value)
    return value


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a received array; a read-only buffer is copied, since plans may write
    into the values they receive."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())
