"""When each node runs: its *anchor*, the event of the pass after which all its inputs exist.

Every executor (in-process, pipeline stage) uses this one schedule, so a plan
means the same thing everywhere. The rules:

* a ``point`` runs at its own event;
* ``call_module`` runs at the module's own output event (so on a pipeline, on the
  stage that holds the module's weights), which must not come before its inputs;
* any other node runs as soon as its latest input exists (``START`` if none);
* a write (``set_point``, ``setitem``, in-place ops) must run at the event of the
  module value it writes to: if it needs a value from later in the pass, that is
  a :class:`~tpmlab.errors.BackwardFlowError` naming both points.

Across generation steps, a node may read a value made at a single earlier step
(it is kept); reading a value from a later step is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BackwardFlowError
from .model_info import START, ModelInfo
from .ops import OPS
from .plan import CALL_MODULE, PARAM, POINT, SET_POINT, Node, Plan


@dataclass
class Schedule:
    anchor: dict[int, int]  # node id -> event index (START for "before the pass")
    write_target: dict[int, int]  # mutating node id -> the point node whose value it changes
    by_event: dict[int, list[Node]]  # event index -> nodes anchored there, in plan order
    consumers: dict[int, list[int]]  # node id -> ids of nodes that read it

    def events_used(self) -> list[int]:
        return sorted(e for e in self.by_event if e != START)


def _point_event(node: Node, info: ModelInfo) -> int:
    idx = info.event_index(node.path or "", node.io or "output")
    if idx is None:
        from ..errors import PathError

        raise PathError(f"{node.path}.{node.io} does not happen in the forward pass",
                        node=node.id, op=node.op, line=node.line)
    return idx


def _event_name(info: ModelInfo, idx: int) -> str:
    if idx == START:
        return "the start of the pass"
    path, io = info.events[idx].rsplit(":", 1)
    return f"{path or '<model>'}.{io}"


def build_schedule(plan: Plan, info: ModelInfo) -> Schedule:
    nodes = plan.nodes_by_id
    anchor: dict[int, int] = {}
    source_of: dict[int, int] = {}  # node id -> the dep that fixed its anchor (for messages)
    write_target: dict[int, int] = {}
    alias_root: dict[int, int] = {}  # node id -> point node whose memory it shares
    consumers: dict[int, list[int]] = {}

    for node in plan.nodes:
        same_step_deps = []
        for dep_id in node.refs():
            dep = nodes[dep_id]
            consumers.setdefault(dep_id, []).append(node.id)
            if dep.steps == node.steps:
                same_step_deps.append(dep_id)
            elif dep.steps.single and dep.steps.start < node.steps.start:
                continue  # a value kept from an earlier generation step
            else:
                raise BackwardFlowError(
                    f"{node.describe()} at generation steps {_fmt_steps(node)} reads "
                    f"{dep.describe()} from steps {_fmt_steps(dep)}: a value can only come "
                    "from the same step or from one earlier step",
                    node=node.id, op=node.op, line=node.line)
        latest, latest_dep = START, None
        for dep_id in same_step_deps:
            if anchor[dep_id] > latest:
                latest, latest_dep = anchor[dep_id], dep_id
        if node.op == POINT:
            here = _point_event(node, info)
            anchor[node.id] = here
            alias_root[node.id] = node.id
            continue
        if node.op in (CALL_MODULE, PARAM):
            here = info.event_index(node.path or "", "output")
            if here is not None:
                if latest > here:
                    raise BackwardFlowError(
                        f"{node.describe()} applies {node.path} to a value made at "
                        f"{_event_name(info, latest)}, later in the pass than {node.path} "
                        "itself runs: values cannot flow backward",
                        node=node.id, op=node.op, line=node.line)
                latest, latest_dep = here, None
        anchor[node.id] = latest
        if latest_dep is not None:
            source_of[node.id] = latest_dep

        spec = OPS.get(node.op)
        first = node.args[0].id if node.args and hasattr(node.args[0], "id") else None
        if spec is not None and (spec.view or spec.mutates) and first in alias_root:
            alias_root[node.id] = alias_root[first]
        target = None
        if node.op == SET_POINT and first is not None:
            target = first
        elif spec is not None and spec.mutates and first in alias_root:
            target = alias_root[first]
        if target is not None:
            write_target[node.id] = target
            t_anchor = anchor[target]
            if nodes[target].steps == node.steps and anchor[node.id] > t_anchor:
                culprit = _latest_input(node.id, anchor, source_of, nodes)
                raise BackwardFlowError(
                    f"{node.describe()} writes {_event_name(info, t_anchor)} but needs "
                    f"{_event_name(info, anchor[node.id])}"
                    + (f" ({culprit})" if culprit else "")
                    + ", which comes later in the pass: values cannot flow backward",
                    node=node.id, op=node.op, line=node.line)

    by_event: dict[int, list[Node]] = {}
    for node in plan.nodes:
        by_event.setdefault(anchor[node.id], []).append(node)
    return Schedule(anchor=anchor, write_target=write_target, by_event=by_event,
                    consumers=consumers)


def _latest_input(node_id: int, anchor: dict[int, int], source_of: dict[int, int],
                  nodes: dict[int, Node]) -> str | None:
    """Follow the chain of latest inputs back to the point that set the anchor."""
    seen = node_id
    while seen in source_of:
        seen = source_of[seen]
    node = nodes[seen]
    if node.op == POINT and seen != node_id:
        return f"read by {node.describe()}" + (f" at {node.line}" if node.line else "")
    return None


def _fmt_steps(node: Node) -> str:
    s = node.steps
    return f"{s.start}" if s.single else f"{s.start}..{'end' if s.stop is None else s.stop - 1}"
