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

Which module value an op writes is decided here, by data flow, once for validation,
tiers and the runners: every node's value gets the set of module values (``point``
nodes) and parameters (``param`` nodes) whose memory it *may* share, from the
aliasing facts of the op table (:mod:`tpmlab.ir.ops`). The analysis is
conservative: an op that may return its input or a view of it passes the input's
aliases on, a container holds the aliases of its items, and a module without
parameters of its own (dropout, an activation) may hand back its argument. An op
that mutates a value aliasing a module value is a write of that value; one whose
target may alias a parameter is refused, since deployed weights are read-only to
plans (copy it with ``.clone()`` first).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import BackwardFlowError, PlanError
from .args import refs as _refs
from .gradients import GradientSchedule, analyze_gradients
from .model_info import START, ModelInfo, event_key
from .ops import OPS
from .plan import CALL_MODULE, PARAM, POINT, SAVE, SET_POINT, Node, Plan, Ref, Tuple

NO_ALIAS: frozenset[int] = frozenset()


@dataclass
class Schedule:
    anchor: dict[int, int]  # node id -> event index (START for "before the pass")
    writes: dict[int, frozenset[int]]  # writing node id -> the point nodes whose values it may change
    aliases: dict[int, frozenset[int]]  # node id -> point/param nodes whose memory its value may share
    by_event: dict[int, list[Node]]  # event index -> nodes anchored there, in plan order
    consumers: dict[int, list[int]]  # node id -> ids of nodes that read it
    gradients: GradientSchedule | None = None  # the backward pass, if the plan has one

    def events_used(self) -> list[int]:
        return sorted(e for e in self.by_event if e != START)

    def stop_point(self) -> tuple[int, int]:
        """Where a stopping plan (``tracer.stop()``) ends its run, as in nnsight, right after
        the last value it asks for: ``(step, event)``, the latest generation step a node
        runs at and, at that step, the latest event with nodes (``START``: that step's pass
        does not run at all). A trace's step is 0. Nodes that run at every step to the end
        (a persistent edit's) do not place the stop: they run until it."""
        nodes = [n for at_event in self.by_event.values() for n in at_event
                 if n.steps.stop is not None]
        step = stop_step(nodes)
        return step, max((self.anchor[n.id] for n in nodes if n.steps.contains(step)),
                         default=START)

    @property
    def write_target(self) -> dict[int, int]:
        """Writing node id -> the first point node it may change (all of them: :attr:`writes`)."""
        return {n: min(targets) for n, targets in self.writes.items()}


def stop_step(nodes: Iterable[Node]) -> int:
    """The generation step a stopping plan ends in (:meth:`Schedule.stop_point`): the latest
    step a node runs at, over the nodes that do not run at every step to the end; 0 if none."""
    return max((n.steps.stop - 1 for n in nodes if n.steps.stop is not None), default=0)


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
    consumers: dict[int, list[int]] = {}
    flow = _AliasFlow(plan, info)

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
        flow.add(node)
        if node.op == POINT:
            anchor[node.id] = _point_event(node, info)
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

        for target in sorted(flow.writes.get(node.id, NO_ALIAS)):
            t_anchor = anchor[target]
            if nodes[target].steps == node.steps and anchor[node.id] > t_anchor:
                culprit = _latest_input(node.id, anchor, source_of, nodes)
                raise BackwardFlowError(
                    f"{node.describe()} writes {_event_name(info, t_anchor)} but needs "
                    f"{_event_name(info, anchor[node.id])}"
                    + (f" ({culprit})" if culprit else "")
                    + ", which comes later in the pass: values cannot flow backward"
                    + ("" if target in flow.direct_writes.get(node.id, ()) else
                       " (the value written may share memory with the module value: "
                       "write into a .clone() to change a copy)"),
                    node=node.id, op=node.op, line=node.line)

    gradients = analyze_gradients(plan, info, anchor, flow.writes)
    backward_only = set() if gradients is None else {*gradients.phase, gradients.backward}
    by_event: dict[int, list[Node]] = {}
    for node in plan.nodes:
        if node.id not in backward_only:  # those run in the backward pass
            by_event.setdefault(anchor[node.id], []).append(node)
    return Schedule(anchor=anchor, writes=flow.writes, aliases=flow.aliases, by_event=by_event,
                    consumers=consumers, gradients=gradients)


class _AliasFlow:
    """The may-alias analysis, one node at a time in plan order (see the module docstring).

    ``aliases[n]``: the point and param nodes whose memory node ``n``'s value may share;
    ``writes[n]``: the point nodes a writing node may change (``set_point``: its point);
    ``direct_writes[n]``: those it changes through views alone (no "may" on the way).
    """

    def __init__(self, plan: Plan, info: ModelInfo) -> None:
        self.plan, self.info = plan, info
        self.aliases: dict[int, frozenset[int]] = {}
        self.writes: dict[int, frozenset[int]] = {}
        self.direct_writes: dict[int, frozenset[int]] = {}
        self._container: set[int] = set()  # nodes whose value may be a list/tuple/dict
        self._direct: dict[int, frozenset[int]] = {}  # aliases through views and writes only
        self._set_at: dict[str, frozenset[int]] = {}  # event key -> aliases of values set there

    def _union(self, ids: Iterable[int], table: dict[int, frozenset[int]] | None = None
               ) -> frozenset[int]:
        table = self.aliases if table is None else table
        out: frozenset[int] = NO_ALIAS
        for i in ids:
            out |= table.get(i, NO_ALIAS)
        return out

    def _is_container(self, value: Any) -> bool:
        if isinstance(value, Ref):
            return value.id in self._container
        return isinstance(value, (list, tuple, dict, Tuple))

    def add(self, node: Node) -> None:
        op, args = node.op, node.args
        first = _refs(args[0]) if args else node.refs()  # the value an op writes or views
        every = node.refs()
        spec = OPS.get(op)
        aliases, direct, container = NO_ALIAS, NO_ALIAS, False
        if op == POINT:
            key = event_key(node.path or "", node.io or "output")
            aliases = direct = frozenset({node.id}) | self._set_at.get(key, NO_ALIAS)
            template = self.info.shapes.get(key)
            container = not (isinstance(template, dict) and "shape" in template)
        elif op == PARAM:
            aliases = direct = frozenset({node.id})
        elif op == SET_POINT:
            value = _refs(args[1]) if len(args) > 1 else []
            aliases = self._union(value)
            self._refuse_param(node, aliases, "sets a module value to")
            key = event_key(node.path or "", node.io or "output")
            self._set_at[key] = self._set_at.get(key, NO_ALIAS) | aliases
            self.writes[node.id] = self.direct_writes[node.id] = \
                frozenset(i for i in self._union(first) if self.plan.node(i).op == POINT)
            container = any(self._is_container(v) for v in args[1:2])
        elif op == SAVE:
            aliases, direct = self._union(every), self._union(every, self._direct)
            container = any(self._is_container(a) for a in args)
        elif op == CALL_MODULE:
            # a module with weights computes a new value; one without (dropout, identity,
            # an activation) may hand back its argument
            if not self.info.holds_parameters(node.path or ""):
                aliases = self._union(every)
            container = True
        elif spec is not None:
            if spec.view or spec.mutates:
                aliases |= self._union(first)
                direct |= self._union(first, self._direct)
            if spec.may_alias or spec.holds:
                aliases |= self._union(every)
            joined = spec.joins and any(self._is_container(a) for a in [*args, *node.kwargs.values()])
            if joined:
                aliases |= self._union(every)
            container = spec.holds or spec.many or joined or (
                spec.aliases_first and bool(args) and self._is_container(args[0]))
            if spec.mutates:
                targets = self._union(first)
                self._refuse_param(node, targets, "writes into")
                self.writes[node.id] = frozenset(
                    i for i in targets if self.plan.node(i).op == POINT)
                self.direct_writes[node.id] = self._union(first, self._direct)
        self.aliases[node.id] = aliases
        self._direct[node.id] = direct
        if container:
            self._container.add(node.id)
        if not self.writes.get(node.id, True):
            del self.writes[node.id]

    def _refuse_param(self, node: Node, targets: frozenset[int], verb: str) -> None:
        params = sorted(i for i in targets if self.plan.node(i).op == PARAM)
        if params:
            param = self.plan.node(params[0])
            name = f"{param.path}.{param.args[0]}".lstrip(".")
            raise PlanError(
                f"{node.describe()} {verb} the parameter {name} (read by node {param.id}"
                + (f" at {param.line}" if param.line and param.line != node.line else "")
                + "): deployed weights are read-only to plans; compute with a copy instead, "
                "e.g. .clone()",
                node=node.id, op=node.op, line=node.line)


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
