"""Validation of a plan against a model, before anything runs.

Checks, in order, each failing with one error that names the node and the
user's line: the schema and node graph (ids, references), the op whitelist,
module paths (with a suggestion), invokes (token ids inside the vocabulary) and
generation steps, the schedule (no backward flow, no write to a parameter, see
:mod:`tpmlab.ir.schedule`), and finally shapes and sizes, by running the plan's ops on
meta tensors whose shapes come from the model's event templates.

Validation itself allocates nothing and computes nothing of size: every tensor it
makes is on the meta device (factory ops get ``device="meta"``, constants become meta
tensors), Python-level arithmetic on plain numbers and lists is bounded before it runs,
and every value the plan computes is held to ``Limits.max_intermediate_bytes``.
Whatever a plan holds, validation ends in a :class:`~tpmlab.errors.PlanError`
subclass or a schedule, never in another exception.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LimitError, PathError, PlanError, SchemaError, ShapeError, UnknownOpError
from .args import LEAF_MARKERS, SCALARS, leaves, rebuild
from .codec import ALLOWED_DTYPES, INT_MAX, INT_MIN
from .model_info import ModelInfo, event_key
from .ops import OPS, WRITE_KEYWORDS
from .plan import (
    BACKWARD,
    CALL_MODULE,
    FROM_TRACE,
    GRAD,
    IO_KINDS,
    PARAM,
    POINT,
    SAVE,
    SET_POINT,
    STRUCTURAL_OPS,
    DType,
    Plan,
    Ref,
    TensorRef,
)
from .rows import check_row_ownership
from .schedule import Schedule, build_schedule


@dataclass(frozen=True)
class Limits:
    """Size limits a deployment enforces (a gateway sets its own, per tier)."""

    max_nodes: int = 20_000
    max_constant_bytes: int = 256 * 2**20
    max_saved_bytes: int = 4 * 2**30
    max_invokes: int = 256
    max_new_tokens: int = 4096
    max_tokens_per_row: int = 32_768
    max_intermediate_bytes: int = 16 * 2**30  # any one value a plan computes, saved or not
    max_autograd_bytes: int = 8 * 2**30  # what autograd keeps for a backward, per stage
    # remote saves (``.save(remote=True)``): bytes and values one owner may keep on one
    # stage's worker at once, over all their requests; 0 refuses remote saves
    max_remote_bytes: int = 8 * 2**30
    max_remote_values: int = 100_000

    @property
    def max_plan_bytes(self) -> int:
        """The largest plan payload accepted: its constants plus room for the graph."""
        return self.max_constant_bytes + 64 * 2**20


class _Unknown:
    """A value whose shape the validator cannot know; checks on it are skipped."""


UNKNOWN = _Unknown()


def inspect_plan(plan: Plan, info: ModelInfo, *, limits: Limits = Limits(),
                 meta_module: Callable[[str], torch.nn.Module | None] | None = None,
                 imports: dict[int, Any] | None = None, env: dict[int, Any] | None = None
                 ) -> tuple[Schedule, int]:
    """Every check of :func:`validate` but the saved-bytes limit; returns the schedule and the
    bytes the plan will save where shapes are known (a save of unknown size counts nothing
    here and is held to the run-time limit instead), for callers that price or limit saves
    themselves. ``imports``: the meta value of each ``from_trace`` node (a session's later
    trace, :mod:`tpmlab.ir.session`); ``env`` receives every node's meta value."""
    try:
        _check_structure(plan, info, limits)
        schedule = build_schedule(plan, info)
        check_row_ownership(plan, info, schedule)  # an invoke writes only its own rows
        return schedule, _check_shapes(plan, info, limits, meta_module, env, imports)
    except PlanError:
        raise
    except Exception as e:  # the boundary: whatever a plan holds, the answer is a PlanError
        raise SchemaError(f"{UNEXPECTED}: {type(e).__name__}: {_first_line(e)}") from e


def infer_values(plan: Plan, info: ModelInfo, *, limits: Limits = Limits(),
                 meta_module: Callable[[str], torch.nn.Module | None] | None = None
                 ) -> dict[int, Any]:
    """Every check of :func:`validate`, and each node's value as a meta tensor (shape and
    dtype, no data; :data:`UNKNOWN` where it cannot be known before running): a dry run."""
    env: dict[int, Any] = {}
    _check_structure(plan, info, limits)
    check_row_ownership(plan, info, build_schedule(plan, info))
    _check_shapes(plan, info, limits, meta_module, env)
    return env


UNEXPECTED = "the plan could not be validated (an unexpected failure of the validator)"


def validate(plan: Plan, info: ModelInfo, *, limits: Limits = Limits(),
             meta_module: Callable[[str], torch.nn.Module | None] | None = None,
             imports: dict[int, Any] | None = None, env: dict[int, Any] | None = None
             ) -> Schedule:
    """Check ``plan`` against ``info``; return its :class:`Schedule` or raise a :class:`PlanError`.
    ``imports``/``env``: as for :func:`inspect_plan`."""
    schedule, saved = inspect_plan(plan, info, limits=limits, meta_module=meta_module,
                                   imports=imports, env=env)
    if saved > limits.max_saved_bytes:
        raise LimitError(f"the plan saves {saved:,} bytes, over the limit of "
                         f"{limits.max_saved_bytes:,} bytes")
    return schedule


def _check_structure(plan: Plan, info: ModelInfo, limits: Limits) -> None:
    if plan.model_version and info.version and plan.model_version != info.version:
        raise SchemaError(f"the plan was made for model version {plan.model_version}, "
                          f"but the deployment holds {info.version}")
    if len(plan.nodes) > limits.max_nodes:
        raise LimitError(f"the plan has {len(plan.nodes)} nodes, over the limit of {limits.max_nodes}")
    const_bytes = sum(t.numel() * t.element_size() for t in plan.tensors.values())
    if const_bytes > limits.max_constant_bytes:
        raise LimitError(f"the plan carries {const_bytes:,} bytes of tensors, over the limit of "
                         f"{limits.max_constant_bytes:,}")
    if plan.mode not in ("trace", "generate"):
        raise SchemaError(f"plan mode {plan.mode!r} is not 'trace' or 'generate'")
    if not plan.invokes:
        raise SchemaError("the plan has no inputs: give a prompt to trace() or use tr.invoke(...)")
    if len(plan.invokes) > limits.max_invokes:
        raise LimitError(f"{len(plan.invokes)} invokes, over the limit of {limits.max_invokes}")
    kinds = {i.kind for i in plan.invokes}
    if len(kinds) > 1:
        raise SchemaError("all invokes of one trace must give the same kind of input "
                          "(token ids or inputs_embeds), not both")
    for k, inv in enumerate(plan.invokes):
        if inv.kind not in ("tokens", "embeds"):
            raise SchemaError(f"invoke {k}: kind {inv.kind!r} is not 'tokens' or 'embeds'")
        if not inv.tensors:
            raise SchemaError(f"invoke {k} has no rows")
        for name in inv.tensors:
            t = plan.tensors.get(name)
            if t is None:
                raise SchemaError(f"invoke {k} names tensor {name!r}, which the plan does not carry")
            if inv.kind == "tokens":
                _check_token_ids(t, k, info)
            if inv.kind == "embeds" and (t.dim() != 2 or not t.is_floating_point()):
                raise SchemaError(f"inputs_embeds rows must be floating [pos, d_model], got "
                                  f"{t.dtype} {tuple(t.shape)}")
            if t.shape[0] == 0:
                raise SchemaError("an invoke has an empty input")
            if t.shape[0] > limits.max_tokens_per_row:
                raise LimitError(f"an input of {t.shape[0]} positions exceeds the limit of "
                                 f"{limits.max_tokens_per_row}")
    if plan.mode == "generate":
        if plan.generate is None or plan.generate.max_new_tokens < 1:
            raise SchemaError("generation needs max_new_tokens >= 1")
        if plan.generate.max_new_tokens > limits.max_new_tokens:
            raise LimitError(f"max_new_tokens={plan.generate.max_new_tokens} exceeds the limit "
                             f"of {limits.max_new_tokens}")
        _check_sampling(plan, info.vocab_size)
    n_steps = plan_steps(plan)

    seen: set[int] = set()
    for node in plan.nodes:
        where = {"node": node.id, "op": node.op, "line": node.line}
        if not isinstance(node.id, int) or not 0 <= node.id <= INT_MAX:
            raise SchemaError(f"node id {node.id!r} must be a non-negative integer", **where)
        if node.id in seen:
            raise SchemaError(f"duplicate node id {node.id}", **where)
        _check_no_device(node, where)
        if node.op not in STRUCTURAL_OPS and node.op not in OPS:
            close = difflib.get_close_matches(node.op, list(OPS), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownOpError(f"op {node.op!r} is not allowed{hint}", **where)
        for ref in node.refs():
            if ref not in seen:
                raise SchemaError(f"node {node.id} reads node {ref}, which does not come before it",
                                  **where)
        _check_args(node.args, plan, where)
        _check_args(node.kwargs, plan, where)
        written = WRITE_KEYWORDS & set(node.kwargs)
        if written:
            raise UnknownOpError(f"keyword {sorted(written)[0]}= is not allowed: a plan writes "
                                 "only with assignment and in-place ops (x[...] = v, x.add_(v))",
                                 **where)
        if node.op in (POINT, SET_POINT, CALL_MODULE, PARAM):
            if node.path is None or not info.has_module(node.path):
                close = difflib.get_close_matches(node.path or "", info.modules, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise PathError(f"the model has no module {node.path!r}{hint}", **where)
        if node.op == POINT:
            if node.io not in IO_KINDS:
                raise SchemaError(f"io must be one of {IO_KINDS}, got {node.io!r}", **where)
            if info.event_index(node.path, node.io) is None:
                raise PathError(f"{node.path or '<model>'}.{node.io} does not happen in the "
                                "forward pass (the module is never called)", **where)
            if node.invoke is not None and not 0 <= node.invoke < len(plan.invokes):
                raise SchemaError(f"invoke {node.invoke} does not exist", **where)
        if node.op == SET_POINT:
            if len(node.args) != 2 or not isinstance(node.args[0], Ref) \
                    or plan.nodes_by_id[node.args[0].id].op != POINT:
                raise SchemaError("set_point needs [point, value]", **where)
            point = plan.nodes_by_id[node.args[0].id]
            if (node.path, node.io) != (point.path, point.io):
                raise SchemaError(f"set_point names {node.path}.{node.io} but its point is "
                                  f"{point.path}.{point.io}", **where)
        if node.op == PARAM:
            name = node.args[0] if len(node.args) == 1 else None
            if not isinstance(name, str) or f"{node.path}.{name}".lstrip(".") not in info.params:
                raise PathError(f"module {node.path!r} has no parameter {name!r}", **where)
        if node.op == SAVE:
            _check_save(node, limits, where)
        if node.op == FROM_TRACE and not (len(node.args) == 2 and not node.kwargs and all(
                isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= INT_MAX
                for a in node.args)):
            raise SchemaError("from_trace takes [trace index, save node id]", **where)
        if node.op == "getattr":
            name = node.args[1] if len(node.args) == 2 else None
            if not isinstance(name, str) or name.startswith("_"):
                raise UnknownOpError(f"reading attribute {name!r} is not allowed", **where)
        if not isinstance(node.steps.start, int) or not (
                node.steps.stop is None or isinstance(node.steps.stop, int)):
            raise SchemaError("generation steps must be integers", **where)
        if node.steps.start < 0 or node.steps.start >= n_steps or (
                node.steps.stop is not None and node.steps.stop <= node.steps.start):
            raise SchemaError(f"generation steps {node.steps.start}..{node.steps.stop} are outside "
                              f"0..{n_steps - 1}", **where)
        seen.add(node.id)


def _check_save(node: Any, limits: Limits, where: dict) -> None:
    """A save takes one value and, optionally, ``remote`` (a bool): a remote save stays on its
    stage's worker, which the request's limits may refuse (``max_remote_bytes`` 0)."""
    if len(node.args) != 1:
        raise SchemaError("save takes one value", **where)
    extra = set(node.kwargs) - {"remote", "keep"}
    if extra or not all(isinstance(node.kwargs.get(k, False), bool) for k in ("remote", "keep")):
        raise SchemaError("save takes only the keyword remote= (True or False; in a session "
                          f"also keep=), got {sorted(node.kwargs)}", **where)
    if node.kwargs.get("remote") and node.kwargs.get("keep"):
        raise SchemaError("a save is either remote or kept for a later trace, not both", **where)
    if node.kwargs.get("keep") and not node.steps.single:
        raise SchemaError("a value kept for a later trace of a session is made at one "
                          f"generation step, not {node.steps.start}..{node.steps.stop}: "
                          "index a step", **where)
    if node.kwargs.get("remote") and limits.max_remote_bytes <= 0:
        raise LimitError("remote saves are not kept here (max_remote_bytes is 0 for this "
                         "request, as for a gateway's query tier): use .save() and reduce the "
                         "value inside the trace, or ask for a tier that keeps remote values",
                         **where)


def _check_token_ids(t: torch.Tensor, invoke: int, info: ModelInfo) -> None:
    """Token ids: a 1-D integer tensor, each id a row of the input embedding (an index
    outside it is a device-side assert on a GPU, which poisons the worker's CUDA context)."""
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
        raise SchemaError(f"token ids must be 1-D integer tensors, got {t.dtype} {tuple(t.shape)}")
    if info.vocab_size is None or t.numel() == 0:
        return
    bad = ((t < 0) | (t >= info.vocab_size)).nonzero()
    if len(bad):
        pos = int(bad[0, 0])
        raise SchemaError(f"invoke {invoke}: token id {int(t[pos])} at position {pos} is outside "
                          f"the vocabulary (0 <= id < {info.vocab_size})")


DEVICE_METHODS = frozenset({"cuda", "cpu"})  # tensor methods that name a device


def _check_no_device(node: Any, where: dict) -> None:
    """A plan never names a device: its values live on the device of the stage that holds
    their module (factory ops make theirs there), which the plan cannot know or choose."""
    named = None
    if node.op in DEVICE_METHODS:
        named = f".{node.op}()"
    elif "device" in node.kwargs:
        named = "device="
    elif node.op == "to" and any(isinstance(a, str) for a in node.args[1:]):
        named = f".to({next(a for a in node.args[1:] if isinstance(a, str))!r})"
    if named:
        raise UnknownOpError(f"a plan cannot name a device ({named}): every value stays on the "
                             "device of the stage that computes it; convert dtypes with "
                             ".to(dtype) and move results by saving them", **where)


# stop strings of one generation: preparing them scans the vocabulary (32 of 256 characters
# take ~5 s of a CPU; these bounds well under 1 s)
MAX_STOP_STRINGS, MAX_STOP_CHARS = 8, 32
MAX_EOS_IDS = 64


def _check_sampling(plan: Plan, vocab: int | None) -> None:
    """Generation options a sampler can take (their types are the codec's business)."""
    g = plan.generate
    for name, ok, want in (
            ("temperature", g.temperature is None or (math.isfinite(g.temperature)
                                                      and g.temperature > 0), "a number > 0"),
            ("top_k", g.top_k is None or 0 <= g.top_k <= INT_MAX, "an integer >= 0"),
            ("top_p", g.top_p is None or 0 < g.top_p <= 1, "a number in (0, 1]"),
            ("seed", g.seed is None or 0 <= g.seed <= INT_MAX, "an integer in [0, 2**63)"),
            ("repetition_penalty", g.repetition_penalty is None or (
                math.isfinite(g.repetition_penalty) and g.repetition_penalty > 0), "a number > 0"),
            ("stop", g.stop is None or (len(g.stop) <= MAX_STOP_STRINGS and all(
                0 < len(s) <= MAX_STOP_CHARS for s in g.stop)),
             f"at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters"),
            ("eos_token_id", g.eos_token_id is None or (
                len(g.eos_token_id) <= MAX_EOS_IDS and all(
                    0 <= t < (vocab or INT_MAX) for t in g.eos_token_id)),
             f"at most {MAX_EOS_IDS} token ids of the vocabulary")):
        if not ok:
            raise SchemaError(f"generation option {name}={getattr(g, name)!r} must be {want}")


def _check_args(value: Any, plan: Plan, where: dict) -> None:
    def key(k: Any) -> None:
        if not isinstance(k, str) or k.startswith("_"):
            raise SchemaError(f"keyword {k!r} is not allowed", **where)

    for leaf in leaves(value, key=key):
        if isinstance(leaf, int) and not isinstance(leaf, bool) and not INT_MIN <= leaf <= INT_MAX:
            raise SchemaError(f"integer {leaf} is outside the 64-bit range", **where)
        if isinstance(leaf, DType) and leaf.name not in ALLOWED_DTYPES:
            raise SchemaError(f"dtype {leaf.name!r} is not allowed; use one of "
                              f"{sorted(ALLOWED_DTYPES)}", **where)
        if isinstance(leaf, TensorRef) and leaf.name not in plan.tensors:
            raise SchemaError(f"reference to unknown tensor {leaf.name!r}", **where)
        if not (leaf is None or isinstance(leaf, (*SCALARS, *LEAF_MARKERS))):
            raise SchemaError(f"argument of type {type(leaf).__name__} is not allowed", **where)


# -- shapes on the meta device -------------------------------------------------------------------

def _meta_from_template(template: Any, rows: int, length: int, dtype: torch.dtype) -> Any:
    if template is None:
        return None
    if isinstance(template, dict) and "$tuple" in template:
        return tuple(_meta_from_template(t, rows, length, dtype) for t in template["$tuple"])
    if isinstance(template, dict) and "$dict" in template:
        return {k: _meta_from_template(t, rows, length, dtype)
                for k, t in template["$dict"].items()}
    if isinstance(template, dict) and "shape" in template:
        dims = []
        for d in template["shape"]:
            if d == "B":
                dims.append(rows)
            elif d == "T":
                dims.append(length)
            elif isinstance(d, int):
                dims.append(d)
            else:
                return UNKNOWN
        return torch.empty(dims, dtype=getattr(torch, template.get("dtype", "float32")),
                           device="meta")
    return UNKNOWN


def contains_unknown(value: Any) -> bool:
    """Whether ``value`` is, or holds, a value validation cannot know (:data:`UNKNOWN`)."""
    if value is UNKNOWN:
        return True
    if isinstance(value, slice):
        return any(v is UNKNOWN for v in (value.start, value.stop, value.step))
    if isinstance(value, (list, tuple)):
        return any(contains_unknown(v) for v in value)
    if isinstance(value, dict):
        return any(contains_unknown(v) for v in value.values())
    return False


def value_nbytes(value: Any, scalar_bytes: int = 8) -> int:
    """Bytes of the tensors in a (nested) value; each non-tensor counts ``scalar_bytes``."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(value_nbytes(v, scalar_bytes) for v in value)
    if isinstance(value, dict):
        return sum(value_nbytes(v, scalar_bytes) for v in value.values())
    return scalar_bytes


def _materialize(value: Any, env: dict[int, Any], plan: Plan) -> Any:
    """The native arguments of an op on the meta device (constants as meta tensors)."""
    def leaf(x: Any) -> Any:
        if isinstance(x, Ref):
            return env[x.id]
        if isinstance(x, TensorRef):
            t = plan.tensors[x.name]
            return torch.empty(t.shape, dtype=t.dtype, device="meta")
        return x

    return rebuild(value, leaf, native=True)


def _invoke_shape(plan: Plan, invoke: int | None) -> tuple[int, int]:
    """Rows and positions one invoke sees (``None``: the whole padded batch)."""
    def rows_len(inv):
        lens = [plan.tensors[n].shape[0] for n in inv.tensors]
        return len(lens), max(lens)
    if invoke is None:
        sizes = [rows_len(i) for i in plan.invokes]
        return sum(r for r, _ in sizes), max(t for _, t in sizes)
    return rows_len(plan.invokes[invoke])


def _signature(value: Any) -> Any:
    """A hashable description of meta arguments (shapes and dtypes), or None if there is none."""
    if isinstance(value, torch.Tensor):
        return ("t", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        parts = tuple(_signature(v) for v in value)
        return None if any(p is None for p in parts) else (type(value).__name__, parts)
    if isinstance(value, dict):
        parts = tuple((k, _signature(v)) for k, v in value.items())
        return None if any(p[1] is None for p in parts) else ("d", parts)
    if isinstance(value, slice):
        return ("s", _signature(value.start), _signature(value.stop), _signature(value.step))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)) or value is Ellipsis:
        return ("v", value)
    return None


def _check_shapes(plan: Plan, info: ModelInfo, limits: Limits,
                  meta_module: Callable[[str], torch.nn.Module | None] | None,
                  env: dict[int, Any] | None = None,
                  imports: dict[int, Any] | None = None) -> int:
    """Propagate meta tensors through the plan (into ``env``: node id -> meta value, or
    :data:`UNKNOWN`); return the bytes it saves.

    Every value an op makes is held to ``limits.max_intermediate_bytes`` (views and
    values written in place share memory and count nothing). Results of ops that
    always make a new value are memoized by the shapes they see: a lens over every
    layer repeats the same few shape computations dozens of times."""
    env = {} if env is None else env
    memo: dict[Any, Any] = {}
    dtype = getattr(torch, info.dtype, torch.float32)
    saved = remote = 0
    for node in plan.nodes:
        where = {"node": node.id, "op": node.op, "line": node.line}
        prefill_only = node.steps.single and node.steps.start == 0
        if node.op == POINT:
            if not prefill_only:
                env[node.id] = UNKNOWN
                continue
            rows, length = _invoke_shape(plan, node.invoke)
            template = info.shapes.get(event_key(node.path, node.io))
            env[node.id] = _meta_from_template(template, rows, length, dtype) \
                if template is not None else UNKNOWN
            continue
        if node.op == FROM_TRACE:
            if imports is None or node.id not in imports:
                raise SchemaError(f"{node.describe()} reads a value of another trace: send "
                                  "the traces together, as one session", **where)
            env[node.id] = imports[node.id]
            continue
        args = _materialize(node.args, env, plan)
        kwargs = _materialize(node.kwargs, env, plan)
        if contains_unknown(args) or contains_unknown(kwargs):
            env[node.id] = UNKNOWN  # a save of unknown size is left to the run-time limit
            continue
        if node.op == GRAD:  # shaped like what it differentiates
            env[node.id] = args[0]
            continue
        if node.op == BACKWARD:
            loss = args[0]
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 \
                    or not loss.is_floating_point():
                what = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                        else type(loss).__name__)
                raise ShapeError(f"backward needs a floating scalar, got {what}: reduce it first "
                                 "(e.g. .sum() or .mean())", **where)
            env[node.id] = None
            continue
        if node.op == SAVE:
            value = args[0]
            steps = save_steps(plan, node)
            if node.kwargs.get("remote"):  # kept on the stage: held to the owner's limits there
                if not isinstance(value, torch.Tensor):
                    raise ShapeError("a remote save keeps one tensor, not a "
                                     f"{type(value).__name__}: save its parts", **where)
                remote += value_nbytes(value) * steps
                if remote > limits.max_remote_bytes:
                    raise LimitError(f"the plan keeps {remote:,} bytes of remote saves, over "
                                     f"the limit of {limits.max_remote_bytes:,} bytes",
                                     **where)
            else:
                saved += value_nbytes(value) * steps
            env[node.id] = value
            continue
        if node.op == SET_POINT:
            target, value = args
            if isinstance(target, torch.Tensor) and isinstance(value, torch.Tensor) \
                    and tuple(target.shape) != tuple(value.shape):
                raise ShapeError(f"{node.path}.{node.io} has shape {tuple(target.shape)} but the "
                                 f"value written to it has shape {tuple(value.shape)}", **where)
            env[node.id] = value
            continue
        if node.op == PARAM:
            shape, pdtype = info.params[f"{node.path}.{args[0]}".lstrip(".")]
            env[node.id] = torch.empty(shape, dtype=getattr(torch, pdtype), device="meta")
            continue
        spec = OPS.get(node.op)
        if node.op == CALL_MODULE:
            module = meta_module(node.path) if meta_module else None
            if module is None:
                env[node.id] = UNKNOWN
                continue
            _check_embedding_ids(module, node, plan, where)
            fn, pure = module, True
        else:
            fn = spec.fn
            pure = not (spec.mutates or spec.view or spec.may_alias or spec.holds)
            if spec.factory or "device" in kwargs:
                kwargs["device"] = "meta"  # validation never allocates: shapes only
            kwargs.pop("pin_memory", None)
            if not _has_tensor(args) and not _has_tensor(kwargs):
                check_plain_operands(node.op, args, limits.max_intermediate_bytes, where)
        key = (node.op, node.path, _signature(args), _signature(kwargs)) if pure else None
        if key is not None and None not in key[2:] and key in memo:
            env[node.id] = memo[key]
        else:
            try:
                env[node.id] = fn(*args, **kwargs)
            except PlanError:
                raise
            except Exception as e:
                if node.op == CALL_MODULE or _meta_unsupported(e):
                    env[node.id] = UNKNOWN  # left to the run-time checks
                    continue
                what = "the value written does not fit" if spec.mutates else f"{node.op} failed"
                raise ShapeError(f"{what}: {type(e).__name__}: {_first_line(e)}",
                                 **where) from None
            if key is not None and None not in key[2:]:
                memo[key] = env[node.id]
        _check_value(env[node.id], (args, kwargs), limits, where)
    return saved


def plan_steps(plan: Plan) -> int:
    """Forward passes a plan may run: ``max_new_tokens`` for a generation, 1 for a trace."""
    return plan.generate.max_new_tokens if plan.mode == "generate" and plan.generate else 1


def save_steps(plan: Plan, node: Any) -> int:
    """Values a save node makes: one per generation step it saves at (1 for a trace)."""
    return (node.steps.stop or plan_steps(plan)) - node.steps.start


def remote_saves(plan: Plan, env: dict[int, Any],
                 nbytes_of: Callable[[torch.Tensor], int] = value_nbytes
                 ) -> tuple[int | None, int]:
    """The bytes (``nbytes_of`` each meta value) and the number of values a plan's remote
    saves keep (``env``: the meta values :func:`inspect_plan` put there); bytes ``None``
    when some save's size is not known before the plan runs."""
    nbytes: int | None = 0
    count = 0
    for node in plan.nodes:
        if node.op == SAVE and node.kwargs.get("remote"):
            steps = save_steps(plan, node)
            count += steps
            value = env.get(node.id, UNKNOWN)
            if nbytes is not None and isinstance(value, torch.Tensor):
                nbytes += nbytes_of(value) * steps
            else:
                nbytes = None
    return nbytes, count


def _meta_unsupported(e: Exception) -> bool:
    """Whether an op failed only because meta tensors carry no data (``nonzero``, ``.item()``...)."""
    msg = str(e)
    if isinstance(e, (NotImplementedError, TypeError)):
        return "meta" in msg
    return isinstance(e, (RuntimeError, IndexError, ValueError)) and "meta" in msg \
        and "shape" not in msg


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in leaves(value))


_SEQUENCES = (list, tuple, str)


def check_plain_operands(op: str, args: list, limit: int, where: dict) -> None:
    """Bound Python-level arithmetic on plain values *before* it runs: ``[0] * 2**40``,
    ``"x" * 2**40``, ``a + a`` doubled, ``10 ** 10**9`` or ``"%099999999d" % 1`` would
    take the validator's memory or time (and the runner's: there a count may come from the
    data, ``[0] * t`` with ``t`` a 0-d integer tensor)."""
    if len(args) != 2:
        return
    a, b = (_plain_int(v) for v in args)
    size = 0
    if op in ("mul", "imul"):
        seq, n = (a, b) if isinstance(a, _SEQUENCES) else (b, a)
        if isinstance(seq, _SEQUENCES) and isinstance(n, int):
            size = len(seq) * max(n, 0) * (1 if isinstance(seq, str) else 8)
    elif op in ("add", "iadd") and isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        size = (len(a) + len(b)) * (1 if isinstance(a, str) else 8)
    elif op in ("pow", "ipow") and isinstance(a, int) and isinstance(b, int) and abs(a) > 1 \
            and (abs(a).bit_length() - 1) * b > 64:
        raise ShapeError(f"{a} ** {b} is outside the 64-bit range", **where)
    elif op in ("mod", "imod") and isinstance(a, str):
        raise ShapeError("string formatting is not allowed in a plan", **where)
    if size > limit:
        raise LimitError(f"{op} would make a value of {size:,} bytes, over the limit of "
                         f"{limit:,} bytes for any one value", **where)


def _plain_int(value: Any) -> Any:
    """A 0-d integer tensor with data as the int it holds (Python uses it as one in ``[0] * t``)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_meta and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        return int(value)
    return value


def _storage_ids(value: Any, out: set[int]) -> set[int]:
    if isinstance(value, torch.Tensor):
        try:
            out.add(value.untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            pass
    elif isinstance(value, (list, tuple)):
        for v in value:
            _storage_ids(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _storage_ids(v, out)
    return out


def new_nbytes(value: Any, shared: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """Bytes a value takes beyond the storages in ``shared`` (its inputs'): views and
    values written in place count nothing; Python containers 8 bytes an item."""
    if isinstance(value, torch.Tensor):
        if _storage_ids(value, set()) & shared:
            return 0
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return 8 * len(value) + sum(new_nbytes(v, shared) for v in value)
    if isinstance(value, dict):
        return 8 * len(value) + sum(new_nbytes(v, shared) for v in value.values())
    if isinstance(value, str):
        return len(value)
    return 0


def _check_value(value: Any, inputs: Any, limits: Limits, where: dict) -> None:
    """What an op made: plain numbers in range, and no more new bytes than the limit."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
        raise ShapeError("the result is outside the 64-bit integer range", **where)
    if isinstance(value, complex):
        raise ShapeError("the result is a complex number, which plans do not support", **where)
    nbytes = new_nbytes(value, _storage_ids(inputs, set()))
    if nbytes > limits.max_intermediate_bytes:
        raise LimitError(f"{where['op']} makes a value of {nbytes:,} bytes, over the limit of "
                         f"{limits.max_intermediate_bytes:,} bytes for any one value", **where)


def _check_embedding_ids(module: torch.nn.Module, node: Any, plan: Plan, where: dict) -> None:
    """Constant indices given to an embedding must be rows of it (see :func:`_check_token_ids`)."""
    if not isinstance(module, torch.nn.Embedding):
        return
    for arg in [*node.args, *node.kwargs.values()]:
        t = plan.tensors.get(arg.name) if isinstance(arg, TensorRef) else None
        if t is not None and not t.is_floating_point() and t.numel() and (
                int(t.min()) < 0 or int(t.max()) >= module.num_embeddings):
            raise SchemaError(f"{node.path} has {module.num_embeddings} rows; the ids given to it "
                              f"range over {int(t.min())}..{int(t.max())}", **where)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
