"""The run-time guard that keeps deployed weights read-only to plans.

Validation refuses every write to a parameter that it can see
(:mod:`tpmlab.ir.schedule`); this guard catches any it cannot (a path the analysis
missed, a module that writes its input in place). PyTorch bumps a tensor's version
counter on every in-place write, through views and ``detach()`` too, and under
``inference_mode`` as well. The guard records the counter of every parameter and
buffer of a model (or of a pipeline stage) once; after each request it compares
them, a list comprehension over a few hundred integers (see ``benchmarks/weight_guard.py``:
well under a millisecond per request on the default model). If one moved, it copies the
changed tensors back from the model's source, reading only those tensors (no second copy
of the weights is kept), counts the restore and fails the request with
:class:`~tpmlab.errors.WeightsChangedError`.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Any

import torch
from torch import nn

from ..errors import WeightsChangedError

_VERSION = attrgetter("_version")  # a tensor's version counter: every in-place write bumps it


class WeightGuard:
    """Version counters of ``model``'s real parameters and buffers, and how to restore them.

    ``source`` is the :class:`~tpmlab.models.sources.ModelSource` the weights were loaded
    from; ``dtype`` the floating dtype they were loaded in. ``restores`` counts the
    requests that changed a weight (each was failed, the weights restored).
    """

    def __init__(self, model: nn.Module, source: Any, *, dtype: torch.dtype) -> None:
        from ..models.materialize import tie_groups  # import tpmlab stays light

        self.source, self.dtype = source, dtype
        canonical = tie_groups(model)
        seen: set[int] = set()
        self._tensors: list[torch.Tensor] = []
        self._names: list[str] = []
        named = chain(model.named_parameters(remove_duplicate=False),
                      model.named_buffers(remove_duplicate=False))
        for name, t in named:
            # meta tensors are held by other stages; inference tensors have no version counter
            if t.is_meta or t.is_inference() or id(t) in seen:
                continue
            seen.add(id(t))
            self._tensors.append(t)
            self._names.append(canonical.get(name, name))
        self._versions = [t._version for t in self._tensors]
        self._damaged: list[int] = []  # tensors a failed restore left changed
        self.restores = 0

    def __len__(self) -> int:
        return len(self._tensors)

    def changed(self) -> list[str]:
        """Names of the tensors written since the counters were recorded."""
        return [self._names[i] for i in self._moved()]

    def _moved(self) -> list[int]:
        if list(map(_VERSION, self._tensors)) == self._versions:  # the cheap common case
            return []
        return [i for i, (t, v) in enumerate(zip(self._tensors, self._versions))
                if t._version != v]

    def ready(self) -> None:
        """Before a request: raise if an earlier restore failed and still fails."""
        if self._damaged:
            self._restore(self._damaged)

    def check(self) -> None:
        """After a request: if a weight changed, restore it and raise WeightsChangedError."""
        moved = self._moved()
        if not moved:
            return
        self.restores += 1
        names = [self._names[i] for i in moved]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        self._restore(moved)
        raise WeightsChangedError(
            f"the request wrote into deployed weights ({shown}): it failed, and the weights "
            "were restored from the model's source; deployed weights are read-only to plans")

    def _restore(self, indices: list[int]) -> None:
        names = {self._names[i] for i in indices}
        try:
            fresh = self.source.load(dtype=self.dtype, device="cpu", keys=names.__contains__).model
            with torch.no_grad():
                for i in indices:
                    name = self._names[i]
                    self._tensors[i].copy_(_tensor(fresh, name))
        except Exception as e:
            self._damaged = sorted(set(self._damaged) | set(indices))
            raise WeightsChangedError(
                f"deployed weights were changed and could not be restored from the model's "
                f"source ({type(e).__name__}: {e}); every request fails until they are: "
                "deploy the model again") from e
        self._damaged = []
        for i in indices:  # the copy bumped them too
            self._versions[i] = self._tensors[i]._version


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]
