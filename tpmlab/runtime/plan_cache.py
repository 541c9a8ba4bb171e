"""What an engine learns from a plan's bytes, kept for the next request with the same bytes.

A researcher's loop sends the same plan again and again (a sweep over prompts changes the
prompt, but a dashboard or a benchmark repeats whole requests); decoding and validating it
again costs 0.3-2.5 ms on the request's critical path. :class:`PlanCache` keys the decoded
plan, its schedule (the validation's result) and its digest by the SHA-256 of the bytes plus
everything the validation depends on (the limits, the model and its version), so a repeated
request skips both and gets exactly what a fresh one would: a plan whose tensors are its own
copies (a plan may write into the values it carries), the same schedule, or the same error.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from ..ir.plan import Plan

SIZE = 32  # entries kept per engine: the plans of a notebook's working set


class PlanCache:
    """A small LRU of ``key -> (plan, derived)``."""

    def __init__(self, size: int = SIZE, max_blob: int = 8 << 20) -> None:
        self.size = size
        self.max_blob = max_blob  # larger plans (big constants) are not kept: memory, not speed
        self.hits = 0
        self._entries: OrderedDict[tuple, Any] = OrderedDict()

    def clear(self) -> None:
        self._entries.clear()

    def get(self, blob: bytes, context: Hashable,
            make: Callable[[], tuple[Plan, Any]]) -> tuple[Plan, Any]:
        """``make()``'s result for these bytes in this ``context``, computed once; the plan
        comes back with its own copies of the tensors, so no run changes what the next one
        gets. A plan ``make`` refuses is not kept (its error is raised each time)."""
        if len(blob) > self.max_blob:
            return make()
        key = (hashlib.sha256(blob).digest(), context)
        hit = self._entries.get(key)
        if hit is None:
            hit = self._entries[key] = make()
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
            self.hits += 1
        plan, derived = hit
        return own_tensors(plan), derived


def own_tensors(plan: Plan) -> Plan:
    """``plan`` with copies of its tensors (its nodes, read-only at run time, are shared, and
    so is what was derived from them and the tensors' shapes: :func:`derived`)."""
    copy = dataclasses.replace(plan, tensors={k: v.clone() for k, v in plan.tensors.items()})
    copy.__dict__[_DERIVED] = derived(plan)
    return copy


_DERIVED = "_derived"


def derived(plan: Plan) -> dict[str, Any]:
    """Facts computed from ``plan``'s nodes and its tensors' shapes (not their values),
    shared by the copies :class:`PlanCache` hands out, so each is computed once for a
    repeated plan (:func:`~tpmlab.runtime.footprints.shape_key`)."""
    return plan.__dict__.setdefault(_DERIVED, {})
