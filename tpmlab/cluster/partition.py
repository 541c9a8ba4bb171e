"""Splitting a model's layers into contiguous pipeline stages balanced by parameter bytes.

Stage 0 also holds the embedding (and position embedding), the last stage the final
norm and the unembedding; each stage's weight keys are what :meth:`ModelSource.load`
materializes on that stage's worker, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..models import Adapter


@dataclass(frozen=True)
class StageSpan:
    """Stage ``index`` of ``n_stages`` runs decoder layers ``first..last`` (inclusive)."""

    index: int
    n_stages: int
    first: int
    last: int
    nbytes: int  # parameter bytes the stage materializes

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1


def _owner(name: str, adapter: Adapter) -> tuple[str, int | None]:
    """Which part a state-dict name belongs to: ("layer", i), ("first", None) or ("last", None)."""
    prefix = adapter.layers + "."
    if name.startswith(prefix):
        return "layer", int(name[len(prefix):].split(".", 1)[0])
    for path in (adapter.final_norm, adapter.unembed):
        if name == path or name.startswith(path + "."):
            return "last", None
    return "first", None  # embeddings and anything outside the layers


def stage_keys(adapter: Adapter, span: StageSpan) -> Callable[[str], bool]:
    """The predicate on state-dict names that selects exactly ``span``'s weights."""

    def keep(name: str) -> bool:
        part, layer = _owner(name, adapter)
        if part == "layer":
            return span.first <= layer <= span.last
        return span.is_first if part == "first" else span.is_last

    return keep


def part_bytes(model: nn.Module, adapter: Adapter, dtype: torch.dtype) -> tuple[list[int], int, int]:
    """Bytes per decoder layer, of the first-stage extras and of the last-stage extras.

    ``model`` is a weightless (meta) tree; tied tensors count once per stage that holds them.
    """
    size = torch.empty((), dtype=dtype).element_size()
    layers = [0] * adapter.n_layers
    first = last = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        n = p.numel() * (size if p.is_floating_point() else p.element_size())
        part, layer = _owner(name, adapter)
        if part == "layer":
            layers[layer] += n
        elif part == "first":
            first += n
        else:
            last += n
    return layers, first, last


def split_layers(layer_bytes: list[int], first_extra: int, last_extra: int,
                 n_stages: int) -> list[StageSpan]:
    """Contiguous split of the layers into ``n_stages`` non-empty stages that minimizes the
    largest stage's bytes (dynamic programming over cut points)."""
    n = len(layer_bytes)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} layers into {n_stages} stages (need 1..{n})")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def cost(stage: int, lo: int, hi: int) -> int:  # layers lo..hi-1 on `stage`
        c = prefix[hi] - prefix[lo]
        if stage == 0:
            c += first_extra
        if stage == n_stages - 1:
            c += last_extra
        return c

    inf = float("inf")
    # best[s][i]: smallest max-cost placing the first i layers on stages 0..s-1
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                if best[s - 1][j] == inf:
                    continue
                v = max(best[s - 1][j], cost(s - 1, j, i))
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    bounds = []
    i = n
    for s in range(n_stages, 0, -1):
        j = cut[s][i]
        bounds.append((j, i))
        i = j
    bounds.reverse()
    return [StageSpan(index=s, n_stages=n_stages, first=lo, last=hi - 1, nbytes=cost(s, lo, hi))
            for s, (lo, hi) in enumerate(bounds)]
