"""A session: several plans sent as one request, run in order on the engine.

A later plan reads a value of an earlier one through a ``from_trace`` node (args:
``[trace index, save node id]``); the earlier plan makes that value with a save marked
``keep=True``. A kept value stays on the engine for the rest of the request and never comes
back to the notebook; only ordinary saves do. The engine drops kept values when the
request ends, fails or passes its deadline.

On the wire a session is one safetensors file (no pickle) holding each plan's own blob
(:func:`~tpmlab.ir.codec.encode_plan`) as a ``uint8`` tensor, in order. It is validated
as a whole (:func:`check_session`) before any plan runs: every cross-trace reference
names an earlier trace's kept save, and its shape flows into the later plan's validation
like any value's. Where the answer travels as bytes (behind a gateway) it is the same kind
of envelope holding each trace's result blob (:func:`~tpmlab.ir.codec.encode_result`), in
order (:func:`encode_session_result`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import LimitError, SchemaError
from .codec import decode_plan, decode_result, encode_plan
from .model_info import ModelInfo
from .plan import FROM_TRACE, SAVE, Plan
from .validate import UNKNOWN, Limits, validate

T = TypeVar("T")

SESSION_SCHEMA = 1
MAX_TRACES = 64  # traces in one session request


PLANS, RESULTS = "tpmlab_session", "tpmlab_session_result"  # the envelopes' metadata keys


def encode_session(plans: list[Plan]) -> bytes:
    """The session envelope: each plan's blob, in order."""
    return _envelope([encode_plan(p) for p in plans], PLANS)


def encode_session_result(results: list[bytes]) -> bytes:
    """The answer to a session sent as bytes: each trace's result blob, in order."""
    return _envelope(results, RESULTS)


def decode_session_result(blob: bytes) -> list[tuple[dict[int, Any], dict[str, Any]]]:
    """Each trace's saved values and metadata, in order, from :func:`encode_session_result`."""
    return [decode_result(b) for b in _open(blob, RESULTS, "session result")]


def is_session(blob: bytes) -> bool:
    """Whether ``blob`` is a session envelope (not one plan)."""
    return _kind(blob) == PLANS


def decode_session(blob: bytes, *, max_bytes: int | None = None) -> list[Plan]:
    """The plans of a session envelope; each plan is held to ``max_bytes`` as a request's
    plan is. Raises :class:`SchemaError` on anything malformed."""
    return [decode_plan(b, max_bytes=max_bytes) for b in split_session(blob, max_bytes=max_bytes)]


def split_session(blob: bytes, *, max_bytes: int | None = None) -> list[bytes]:
    """Each trace's plan blob, in order, not yet decoded."""
    if max_bytes is not None and len(blob) > max_bytes * MAX_TRACES:
        raise LimitError(f"a session of {len(blob):,} bytes is over the limit")
    return _open(blob, PLANS, "session")


def _envelope(blobs: list[bytes], key: str) -> bytes:
    flat = {f"plan{k}": torch.frombuffer(bytearray(b), dtype=torch.uint8)
            for k, b in enumerate(blobs)}
    doc = {"session": SESSION_SCHEMA, "traces": len(blobs)}
    return st_save(flat, metadata={key: json.dumps(doc)})


def _kind(blob: bytes) -> str | None:
    """Which envelope ``blob`` is (:data:`PLANS` or :data:`RESULTS`), or None."""
    try:
        header_len = int.from_bytes(bytes(blob[:8]), "little")
        header = json.loads(bytes(blob[8:8 + header_len]))
        meta = header.get("__metadata__") or {}
    except Exception:  # noqa: BLE001 - anything else is not an envelope
        return None
    return next((k for k in (PLANS, RESULTS) if k in meta), None)


def _open(blob: bytes, key: str, what: str) -> list[bytes]:
    """The blobs of envelope ``blob`` of kind ``key``, in order (:class:`SchemaError` on
    anything malformed, naming ``what`` it should have been)."""
    if _kind(blob) != key:
        raise SchemaError(f"the payload is not a tpmlab {what}")
    try:
        tensors = st_load(bytes(blob))
        header_len = int.from_bytes(bytes(blob[:8]), "little")
        doc = json.loads(json.loads(bytes(blob[8:8 + header_len]))["__metadata__"][key])
        n = doc["traces"]
    except Exception as e:  # noqa: BLE001 - a malformed payload, never a crash
        raise SchemaError(f"the {what} payload is malformed: {type(e).__name__}") from None
    if doc.get("session") != SESSION_SCHEMA:
        raise SchemaError(f"session schema {doc.get('session')!r} is not supported "
                          f"(this engine speaks {SESSION_SCHEMA})")
    if not isinstance(n, int) or not 1 <= n <= MAX_TRACES:
        raise LimitError(f"a session holds 1 to {MAX_TRACES} traces, got {n!r}")
    if set(tensors) != {f"plan{k}" for k in range(n)} or any(
            t.dtype != torch.uint8 or t.dim() != 1 for t in tensors.values()):
        raise SchemaError(f"the {what} payload does not hold its traces' blobs")
    return [tensors[f"plan{k}"].numpy().tobytes() for k in range(n)]


def kept(plan: Plan) -> list[int]:
    """Ids of the plan's saves kept for later traces."""
    return [n.id for n in plan.nodes if n.op == SAVE and n.kwargs.get("keep")]


def imports_of(plans: list[Plan], k: int) -> dict[int, tuple[int, int]]:
    """Trace ``k``'s ``from_trace`` nodes: ``{node id: (trace, save node id)}``, each checked
    to name a kept save of an earlier trace (:class:`SchemaError` naming node and line)."""
    out = {}
    for node in plans[k].nodes:
        if node.op != FROM_TRACE:
            continue
        where = {"node": node.id, "op": node.op, "line": node.line}
        if len(node.args) != 2 or not all(type(a) is int and a >= 0 for a in node.args):
            raise SchemaError("from_trace takes [trace index, save node id]", **where)
        trace, save = node.args
        if not 0 <= trace < k:
            raise SchemaError(f"{node.describe()} of trace {k} reads a value of trace {trace}: "
                              "a trace reads only values of traces before it in the session",
                              **where)
        source = plans[trace].nodes_by_id.get(save)
        if source is None or source.op != SAVE or not source.kwargs.get("keep"):
            raise SchemaError(f"{node.describe()} of trace {k} reads node {save} of trace "
                              f"{trace}, which is not a value that trace keeps (a save with "
                              "keep=True)", **where)
        out[node.id] = (trace, save)
    return out


def check_session(plans: list[Plan], info: ModelInfo, *, model: str, limits: Limits,
                  meta_module: Callable[[str], torch.nn.Module | None] | None = None,
                  check: Callable[..., T] = validate) -> list[T]:
    """Validate every plan of a session, in order (each plan's ``from_trace`` values shaped
    like the kept saves they read); their schedules, or the first :class:`PlanError`.
    ``check``: what validates one plan, called as :func:`~tpmlab.ir.validate.validate` is
    (a gateway's also sizes the saves); what it returns is returned per plan."""
    if not plans:
        raise SchemaError("a session needs at least one trace")
    metas: dict[tuple[int, int], Any] = {}
    checked = []
    for k, plan in enumerate(plans):
        if plan.model != model:
            raise SchemaError(f"trace {k} of the session is for model {plan.model!r}, this "
                              f"engine holds {model!r}")
        imports = {i: metas.get(src, UNKNOWN) for i, src in imports_of(plans, k).items()}
        env: dict[int, Any] = {}
        checked.append(check(plan, info, limits=limits, meta_module=meta_module,
                             imports=imports, env=env))
        metas.update({(k, i): env.get(i, UNKNOWN) for i in kept(plan)})
    return checked
