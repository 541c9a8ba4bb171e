"""What autograd keeps of a model's forward, measured once per request shape and reused.

Counting the bytes autograd keeps for a backward (:class:`~tpmlab.runtime.backward.Backprop`)
takes a Python call for every tensor it saves, twice (``saved_tensors_hooks``' pack and
unpack): about 900 tensors for a 32-layer Llama, 2.5-3 ms of a launch-bound request. What
the *model's own* ops save depends only on what the forward runs and on the shapes it runs
on: the plan's structure (its nodes, the points it tracks and writes, the kinds of its
inputs) and the shapes and dtypes of its tensors (the prompts' lengths), not on their
values. So an engine measures it once, with the hooks, for each :func:`shape_key`, and a
later request of the same key runs the model without them, counting that figure instead
(the plan's own nodes are still counted tensor by tensor).

The limit stays exact where it matters: a request takes the measured figure only while
that figure is at most half its limit (:data:`MARGIN`); nearer the limit it runs with the
hooks and fails, if it must, with the same :class:`~tpmlab.errors.LimitError` at the same
point. The margin covers a model whose ops' shapes depend on the data (a mixture of
experts' per-expert batches) by a factor of 2.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ..ir.args import TensorRef, rebuild
from ..ir.plan import Plan
from .plan_cache import derived

#: a measured figure stands for a request only while MARGIN x figure <= the request's limit
MARGIN = 2


def shape_key(plan: Plan) -> tuple[Any, ...]:
    """What the model's saved tensors depend on in ``plan``: everything but its tensors'
    values, their names (the codec names them by content) and the user's source lines.
    Computed once for a plan and the copies :class:`~tpmlab.runtime.plan_cache.PlanCache`
    hands out for its bytes (:func:`~tpmlab.runtime.plan_cache.derived`)."""
    memo = derived(plan)
    key = memo.get("shape_key")
    if key is None:
        order: dict[str, int] = {}  # each tensor by where it is first used

        def canonical(leaf: Any) -> Any:
            if isinstance(leaf, TensorRef):
                return ("tensor", order.setdefault(leaf.name, len(order)))
            return leaf

        invokes = tuple((inv.kind, tuple(order.setdefault(n, len(order)) for n in inv.tensors))
                        for inv in plan.invokes)
        nodes = tuple((n.id, n.op, repr(rebuild(n.args, canonical)),
                       repr(rebuild(n.kwargs, canonical)), n.path, n.io, n.invoke,
                       n.steps.start, n.steps.stop) for n in plan.nodes)
        for name in sorted(plan.tensors):  # any the plan does not use, after those it does
            order.setdefault(name, len(order))
        tensors = tuple(sorted((order[name], tuple(t.shape), str(t.dtype))
                               for name, t in plan.tensors.items()))
        key = memo["shape_key"] = (plan.model, plan.model_version, plan.mode, invokes, nodes,
                                   tensors)
    return key


class Footprints:
    """An engine's (or a stage's) measured bytes autograd kept for the model's own ops, by
    :func:`shape_key`; the ``size`` most recently used keys (thread-safe)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._bytes: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> int | None:
        with self._lock:
            nbytes = self._bytes.get(key)
            if nbytes is not None:
                self._bytes.move_to_end(key)
            return nbytes

    def record(self, key: tuple[Any, ...], nbytes: int) -> None:
        with self._lock:
            self._bytes[key] = nbytes
            self._bytes.move_to_end(key)
            while len(self._bytes) > self.size:
                self._bytes.popitem(last=False)

    def usable(self, key: tuple[Any, ...], max_bytes: int | None) -> int | None:
        """The measured figure for ``key`` if a request limited to ``max_bytes`` may run on
        it (see :data:`MARGIN`), else ``None`` (run with the hooks)."""
        nbytes = self.get(key)
        if nbytes is None or (max_bytes is not None and MARGIN * nbytes > max_bytes):
            return None
        return nbytes

    def __len__(self) -> int:
        return len(self._bytes)
