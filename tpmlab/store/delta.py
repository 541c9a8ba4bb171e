"""Low-rank deltas: a tensor stored as ``W' = W + U @ V^T`` over a base tensor ``W``.

For a 2-D base ``W`` of shape ``[out, in]``, ``U`` is ``[out, r]`` and ``V`` is
``[in, r]`` (a rank-one ROME-style edit has ``r = 1``). Only ``U``, ``V`` and a
reference to ``W``'s stored entry are kept, so an edit of a 576x1536 matrix costs
``(576 + 1536) * r`` values instead of 884,736.

Exact definition of the reconstruction (``apply_low_rank``), which is what loading
returns bit for bit on every platform::

    D  = outer(U0, V0) + outer(U1, V1) + ...   # Uk = float32(U[:, k]), left to right
    W' = cast_to_dtype(W)(float32(W) + D)                            # round to nearest even

Each element is a sequence of correctly rounded IEEE float32 multiplies and adds in a
fixed order, so the result does not depend on BLAS, thread count or CPU. For ``r = 1``
it equals ``(W.float() + U.float() @ V.float().T).to(W.dtype)`` exactly; for ``r > 1``
a BLAS matmul may sum in another order, so use ``apply_low_rank`` to compute the
dense reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import StoreInputError


@dataclass(frozen=True)
class LowRankDelta:
    """Factors of ``W' = W + U @ V^T``: ``u`` is ``[out, r]``, ``v`` is ``[in, r]``.

    1-D factors are taken as rank one (``[out]`` and ``[in]``).
    """

    u: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        u, v = self.u, self.v
        if u.dim() == 1:
            u = u[:, None]
        if v.dim() == 1:
            v = v[:, None]
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
            raise StoreInputError(
                f"low-rank factors must be U [out, r] and V [in, r]; got U {tuple(self.u.shape)}, "
                f"V {tuple(self.v.shape)}"
            )
        if not (u.is_floating_point() and v.is_floating_point()):
            raise TypeError(f"low-rank factors must be floating point, got {u.dtype} and {v.dtype}")
        object.__setattr__(self, "u", u.detach().cpu().contiguous())
        object.__setattr__(self, "v", v.detach().cpu().contiguous())

    @property
    def rank(self) -> int:
        """The number of columns ``r`` of the factors."""
        return int(self.u.shape[1])

    def check_base(self, name: str, base_shape: tuple[int, ...], base_dtype: torch.dtype) -> None:
        """Raise :class:`StoreInputError` (a ``ValueError``) unless this delta fits a base tensor of that shape and dtype."""
        if len(base_shape) != 2:
            raise StoreInputError(f"low-rank delta for {name!r} needs a 2-D base, got shape {base_shape}")
        if not base_dtype.is_floating_point:
            raise StoreInputError(f"low-rank delta for {name!r} needs a floating-point base, got {base_dtype}")
        want = ((base_shape[0], self.rank), (base_shape[1], self.rank))
        if (tuple(self.u.shape), tuple(self.v.shape)) != want:
            raise StoreInputError(
                f"low-rank delta for {name!r}: base is {base_shape}, so U must be {want[0]} and "
                f"V {want[1]}; got U {tuple(self.u.shape)}, V {tuple(self.v.shape)}"
            )


def as_delta(value: LowRankDelta | tuple[torch.Tensor, torch.Tensor]) -> LowRankDelta:
    """A ``LowRankDelta`` from itself or a ``(u, v)`` pair."""
    if isinstance(value, LowRankDelta):
        return value
    u, v = value
    return LowRankDelta(u, v)


def apply_low_rank(base: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``W + U @ V^T`` computed as the module docstring defines, on CPU, in ``base.dtype``."""
    base = base.detach().cpu()
    u = u.detach().cpu().float()
    v = v.detach().cpu().float()
    if u.dim() == 1:
        u, v = u[:, None], v[:, None]
    if u.shape[1] == 0:
        return base.clone()
    d = torch.outer(u[:, 0], v[:, 0])  # not 0 + outer: keeps the sign of -0.0 like a matmul
    for k in range(1, u.shape[1]):
        d.add_(torch.outer(u[:, k], v[:, k]))
    return (base.float() + d).to(base.dtype)
