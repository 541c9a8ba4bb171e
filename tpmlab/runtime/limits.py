"""The limits one request runs under: the engine's own, tightened by the caller's.

A gateway passes each user's tier limits with the request (``limits=`` of
:meth:`~tpmlab.runtime.backend.Backend.run`); the engine validates the plan with them
and holds the run to them (:class:`~tpmlab.runtime.runner.PlanRunner`). A request
can only tighten the engine's limits, never widen them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..ir.validate import Limits


def request_limits(engine: Limits, request: Limits | None) -> Limits:
    """The field-by-field minimum of the engine's limits and the request's (``None``: the
    engine's)."""
    if request is None or request == engine:
        return engine
    return Limits(**{f.name: min(getattr(engine, f.name), getattr(request, f.name))
                     for f in dataclasses.fields(Limits)})


# How the limits of several plans combine for one merged run: what adds up across plans is
# summed, bounds on one value the strictest of them; the rest (per row, per generation) were
# checked for each plan when it was admitted, so the largest does.
_SUMMED = ("max_nodes", "max_constant_bytes", "max_saved_bytes", "max_invokes")
_STRICTEST = ("max_intermediate_bytes",)


def merged_limits(parts: list[Limits]) -> Limits:
    """The :class:`Limits` a merged run of plans admitted under ``parts`` runs with."""
    values = {}
    for f in dataclasses.fields(Limits):
        got = [getattr(p, f.name) for p in parts]
        values[f.name] = sum(got) if f.name in _SUMMED else \
            min(got) if f.name in _STRICTEST else max(got)
    return Limits(**values)


def limits_to_wire(limits: Limits | None) -> dict[str, int] | None:
    """Plain ``{field: value}`` for a message between processes."""
    return None if limits is None else dataclasses.asdict(limits)


def limits_from_wire(data: dict[str, Any] | None) -> Limits | None:
    """The :class:`Limits` of :func:`limits_to_wire`; unknown fields are refused."""
    if data is None:
        return None
    names = {f.name for f in dataclasses.fields(Limits)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)}; known: {sorted(names)}")
    return Limits(**data)
