"""Which rows of the batch a module value belongs to, and the rule that an invoke writes
only its own (DESIGN.md contract 9).

A batch holds every invoke's rows (and, behind a gateway, every merged user's). The
shape template of an event (:attr:`ModelInfo.shapes`, measured by
:mod:`tpmlab.runtime.probe`) says, per tensor of the value, which dimension follows the
batch (``"B"``) and which the positions (``"T"``). An invoke's view of a value cuts the
``"B"`` dimension to its rows and, in the prompt pass, the ``"T"`` dimensions past its left
padding (:func:`tpmlab.runtime.batching.invoke_view`).

A tensor without a ``"B"`` dimension is *batch-shared*: one tensor that every row reads
(an ``[1, T, d]`` rotary table broadcast over the rows, say). It is read-only inside an
invoke: a write to it would change every other invoke's result, and expanding it per row
would hand the model a value of another shape than the one it made. The engine passes
per-row position ids, so the positional values of the supported families (rotary
``cos``/``sin``, learned position embeddings, position ids) are per row, not shared, and
writable; :func:`check_row_ownership` refuses a write to whatever else is shared, before
the plan runs, and the runner checks the same on the live value (:func:`shared_parts`).
"""

from __future__ import annotations

from typing import Any

from ..errors import PlanError
from .model_info import ModelInfo, event_key
from .ops import OPS
from .plan import POINT, SET_POINT, Node, Plan, Ref
from .schedule import Schedule

Path = tuple  # keys from an event's value down to one part of it: tuple indices, dict keys
WHOLE: Path = ()  # the whole value


class BatchSharedWriteError(PlanError):
    """A plan writes, inside an invoke, a value that all rows of the batch share."""


def tensor_dims(template: Any) -> list | None:
    """The dimension template of a tensor template (``["B", "T", 576]``), else ``None``."""
    if isinstance(template, dict) and isinstance(template.get("shape"), list):
        return template["shape"]
    return None


def subtemplate(template: Any, key: Any) -> Any:
    """The template of one item (tuple index or dict key) of a container template."""
    if not isinstance(template, dict):
        return None
    if "$tuple" in template and isinstance(key, int):
        items = template["$tuple"]
        return items[key] if -len(items) <= key < len(items) else None
    if "$dict" in template and isinstance(key, str):
        return template["$dict"].get(key)
    return None


def is_container(template: Any) -> bool:
    return isinstance(template, dict) and ("$tuple" in template or "$dict" in template)


def tensor_parts(template: Any, path: Path = WHOLE) -> list[tuple[Path, list]]:
    """``(path, dims)`` of every tensor template inside ``template``, depth first."""
    dims = tensor_dims(template)
    if dims is not None:
        return [(path, dims)]
    if isinstance(template, dict) and "$tuple" in template:
        return [p for i, t in enumerate(template["$tuple"]) for p in tensor_parts(t, path + (i,))]
    if isinstance(template, dict) and "$dict" in template:
        return [p for k, t in template["$dict"].items() for p in tensor_parts(t, path + (k,))]
    return []


def shared_parts(template: Any, path: Path | None = WHOLE) -> list[tuple[Path, list]]:
    """The batch-shared tensors (no ``"B"`` dimension) of ``template`` under ``path``
    (``None``: anywhere in it), with their dimension templates."""
    node = template
    for key in path or ():
        node = subtemplate(node, key)
    prefix = path or WHOLE
    return [(p, dims) for p, dims in tensor_parts(node, prefix) if "B" not in dims]


def event_template(info: ModelInfo, node: Node) -> Any:
    return info.shapes.get(event_key(node.path or "", node.io or "output"))


def written_parts(plan: Plan, info: ModelInfo, schedule: Schedule
                  ) -> dict[int, list[tuple[Node, Path | None]]]:
    """For each module point the plan writes: ``(writing node, part written)``, the part a
    path into the point's value, or ``None`` where the plan picks it in a way not followed
    here (it is then taken as the whole value).

    The alias analysis that decides *which point* a node writes is the schedule's
    (:attr:`Schedule.write_target`); this follows the container indexing from the point
    down to the written tensor (``output[0]``, ``output.logits``), through the event's
    template, so a write to one item of a tuple is not taken as a write to its others.
    """
    nodes = plan.nodes_by_id
    part: dict[int, Path | None] = {}  # node id -> which part of its point it aliases
    template_of: dict[int, Any] = {}  # node id -> template of the point it reads
    for node in plan.nodes:
        if node.op == POINT:
            part[node.id] = WHOLE
            template_of[node.id] = event_template(info, node)
            continue
        first = node.args[0] if node.args else None
        if not isinstance(first, Ref) or first.id not in part:
            continue
        base, template = part[first.id], template_of[first.id]
        spec = OPS.get(node.op)
        if not (spec and (spec.view or spec.mutates)) and node.id not in schedule.write_target:
            continue  # a new value, not a view of the point
        here = base
        if base is not None and node.op in ("getitem", "getattr") and len(node.args) == 2:
            key = node.args[1]
            inner = template
            for k in base:
                inner = subtemplate(inner, k)
            if is_container(inner):
                here = base + (key,) if isinstance(key, (int, str)) \
                    and subtemplate(inner, key) is not None else None
        part[node.id], template_of[node.id] = here, template
    out: dict[int, list[tuple[Node, Path | None]]] = {}
    for writer_id, point_id in schedule.write_target.items():
        writer = nodes[writer_id]
        if writer.op == SET_POINT:
            written = WHOLE
        else:
            first = writer.args[0] if writer.args else None
            written = part.get(first.id) if isinstance(first, Ref) else None
        out.setdefault(point_id, []).append((writer, written))
    return out


def check_row_ownership(plan: Plan, info: ModelInfo, schedule: Schedule) -> None:
    """Refuse a plan that writes, inside an invoke, a value shared by all rows of the batch.

    Raises :class:`BatchSharedWriteError` naming the writing node, its line, the module
    value and its shape template. Points that read the whole batch (``invoke=None``) may
    write anything: the batch is theirs.
    """
    nodes = plan.nodes_by_id
    for point_id, writes in written_parts(plan, info, schedule).items():
        point = nodes[point_id]
        if point.op != POINT or point.invoke is None:
            continue
        template = event_template(info, point)
        for writer, path in writes:
            shared = shared_parts(template, path)
            if shared:
                where, dims = shared[0]
                item = "".join(f"[{k!r}]" for k in where)
                raise BatchSharedWriteError(
                    f"{writer.describe()} writes {point.path or '<model>'}.{point.io}{item}, "
                    f"a value of shape {_fmt_dims(dims)} that all rows of the batch share: "
                    "inside an invoke it is read-only (write a copy, e.g. x = x.clone(), "
                    "or a per-row value)",
                    node=writer.id, op=writer.op, line=writer.line)


def _fmt_dims(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
