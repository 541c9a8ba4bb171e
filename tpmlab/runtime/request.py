"""The request contract: what every engine does with one plan, written once.

An engine (a whole model in this process, the first stage of a Dask pipeline, a
gateway in front of either) takes a request as plan bytes plus the caller's limits,
and answers saved values plus metadata. This module owns each step of that:

* :func:`decode`: the plan bytes under the request's limits (the engine's own,
  tightened by the caller's, :func:`~tpmlab.runtime.limits.request_limits`);
* :func:`admit`: the one validation of a request (the plan is for this model, then
  :func:`~tpmlab.ir.validate.validate`), done by the engine that drives it;
* :func:`follow`: what a later pipeline stage does with a plan another stage
  admitted: its schedule, no second validation;
* :func:`result_meta`: the result's metadata (contract 7: model version, plan digest,
  tpmlab version; timings);
* :func:`plan_digest` and :data:`GENERATED`, the result key of generated tokens.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from .._version import __version__
from ..errors import PlanError, SchemaError
from ..ir.codec import decode_plan, plan_to_doc
from ..ir.model_info import ModelInfo
from ..ir.plan import SAVE, Plan
from ..ir.schedule import Schedule, build_schedule
from ..ir.validate import Limits, validate
from .limits import request_limits

GENERATED = -1  # result key of the generated token ids (one 1-D tensor per row)


def plan_digest(plan: Plan) -> str:
    """A digest of what the plan does: its graph and constants, not the user's line numbers."""
    doc, tensors = plan_to_doc(plan)
    for node in doc["nodes"]:
        node.pop("line", None)
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def decode(blob: bytes, engine: Limits, caller: Limits | None = None) -> tuple[Plan, Limits]:
    """The plan in ``blob`` and the limits its request runs under (``engine``'s own,
    tightened field by field by the ``caller``'s); a plan larger than they allow is refused
    before it is parsed."""
    limits = request_limits(engine, caller)
    return decode_plan(blob, max_bytes=limits.max_plan_bytes), limits


def admit(plan: Plan, *, model: str, info: ModelInfo, limits: Limits,
          meta_module: Callable[[str], torch.nn.Module | None] | None = None) -> Schedule:
    """Validate a request once, where it enters the engine: a :class:`PlanError` naming the
    problem, or the plan's :class:`~tpmlab.ir.schedule.Schedule`."""
    if plan.model != model:
        raise PlanError(f"the plan is for model {plan.model!r}, this engine holds {model!r}")
    for node in plan.nodes:
        if node.op == SAVE and node.kwargs.get("keep"):
            raise SchemaError(f"{node.describe()} keeps a value for a later trace of a "
                              "session: send the traces together, as one session",
                              node=node.id, op=node.op, line=node.line)
    return validate(plan, info, limits=limits, meta_module=meta_module)


def follow(plan: Plan, info: ModelInfo) -> Schedule:
    """The schedule of a plan that the engine's first stage admits (a later stage decodes the
    plan while the first one validates it, and runs only once the first one ran)."""
    return build_schedule(plan, info)


def result_meta(plan: Plan, *, model: str, info: ModelInfo, started: float,
                node_seconds: dict[int, float], device: Any, digest: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """A result's metadata: what reproduces it (``model_version``, ``plan_digest``: ``digest``
    if the engine has it already, ``tpmlab_version``), ``compute_seconds`` since ``started``
    (:func:`time.perf_counter`), ``node_seconds`` (each plan node's own time) and where it
    ran; ``extra`` adds fields."""
    return {"model": model, "model_version": info.version,
            "plan_digest": digest or plan_digest(plan),
            "tpmlab_version": __version__, "compute_seconds": time.perf_counter() - started,
            "node_seconds": node_seconds, "device": str(device), **extra}
