"""How two versions' tensors differ."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_BLOCK = 1 << 22  # elements compared at a time, to bound the float64 temporaries (32 MiB)


@dataclass(frozen=True)
class TensorDiff:
    """One tensor that differs between versions ``a`` and ``b``.

    Attributes:
        name: the tensor's name.
        status: ``"changed"`` (same dtype and shape, other values), ``"added"`` (only in b),
            ``"removed"`` (only in a), or ``"reshaped"`` (dtype or shape differ).
        dtype_a / dtype_b, shape_a / shape_b: dtype names and shapes (``None`` where absent).
        max_abs: ``max |b - a|`` over elements, computed in float64 (``"changed"`` only).
        rel_fro: ``||b - a||_F / ||a||_F``; ``inf`` if ``a`` is all zeros (``"changed"`` only).
        changed_fraction: fraction of elements with ``b != a``, in [0, 1] (``"changed"`` only).
    """

    name: str
    status: str
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    max_abs: float | None = None
    rel_fro: float | None = None
    changed_fraction: float | None = None

    def __str__(self) -> str:
        if self.status == "changed":
            return (f"{self.name}: max|Δ|={self.max_abs:.3g} rel_fro={self.rel_fro:.3g} "
                    f"changed={100 * self.changed_fraction:.2f}%")
        if self.status == "added":
            return f"{self.name}: added {self.dtype_b}{list(self.shape_b)}"
        if self.status == "removed":
            return f"{self.name}: removed {self.dtype_a}{list(self.shape_a)}"
        return (f"{self.name}: {self.dtype_a}{list(self.shape_a)} -> "
                f"{self.dtype_b}{list(self.shape_b)}")


def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
    """The ``"changed"`` diff of two tensors of the same dtype and shape.

    Complex values are compared by modulus of the difference. NaN compares unequal to NaN.
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    wide = torch.complex128 if a.is_complex() else torch.float64
    max_abs, diff_sq, base_sq, n_changed = 0.0, 0.0, 0.0, 0
    for start in range(0, fa.numel(), _BLOCK):
        xa = fa[start : start + _BLOCK]
        xb = fb[start : start + _BLOCK]
        n_changed += int((xa != xb).sum())
        da, db = xa.to(wide), xb.to(wide)
        d = (db - da).abs()
        if d.numel():
            max_abs = max(max_abs, float(d.max()))
        diff_sq += float((d * d).sum())
        base_sq += float((da.abs() ** 2).sum())
    n = fa.numel()
    if base_sq > 0:
        rel = math.sqrt(diff_sq) / math.sqrt(base_sq)
    else:
        rel = 0.0 if diff_sq == 0 else math.inf
    return TensorDiff(
        name=name, status="changed",
        dtype_a=str(a.dtype).removeprefix("torch."), dtype_b=str(b.dtype).removeprefix("torch."),
        shape_a=tuple(a.shape), shape_b=tuple(b.shape),
        max_abs=max_abs, rel_fro=rel, changed_fraction=n_changed / n if n else 0.0,
    )
