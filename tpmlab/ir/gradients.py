"""Gradients in a plan: one ``backward`` node, ``grad`` values, and when each runs.

A plan back-propagates at most one scalar, ``loss.backward()``, after its forward
pass. A ``grad`` node is the gradient of the loss with respect to

* a module point's value (``model.layers[3].output.grad``): known when the backward
  pass reaches that point's event, on the stage that owns it;
* a parameter read with ``param(name)`` (``.param("weight").grad``): returned, never
  applied to the deployed weight; known when the stage's backward is done;
* a constant the notebook sent, or a row of ``inputs_embeds`` (``tr.grad(tensor)``):
  summed over every stage that uses it, known when the whole backward is done.

Every node that reads a gradient (directly or through other nodes) is in the
*backward phase*: it runs during the backward pass, at the event of the latest
gradient it needs (the smallest event index, since the pass runs in reverse), or
after the stage's backward if it needs a parameter's or a constant's gradient
(*late*). A backward-phase node may read any forward value and may write into the
gradient of its own event (``h.grad[:, 0] = 0``, ``h.grad = h.grad * 2``): that
changes what flows on to earlier layers. It may not write forward values, apply a
module, or feed another backward. Each rule broken is a plan error naming the node
and the user's line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BackwardFlowError, PlanError, SchemaError
from .model_info import START, ModelInfo, event_key
from .ops import OPS
from .plan import BACKWARD, CALL_MODULE, GRAD, PARAM, POINT, SET_POINT, Node, Plan, Ref, TensorRef


@dataclass
class GradientSchedule:
    """What the runners need to run a plan's backward pass (see the module docstring)."""

    backward: int  # the backward node's id
    loss: int  # the node it back-propagates
    phase: frozenset[int]  # nodes that run in the backward pass
    late: frozenset[int]  # of those, the ones that run after a stage's backward
    event_of: dict[int, int]  # backward-phase node -> the event it waits for (START: the end)
    tracked: dict[int, list[int]]  # event -> grad nodes of points at that event
    written: frozenset[int]  # events whose gradient a node changes
    params: dict[int, tuple[str, str]]  # grad node -> (module path, parameter name)
    constants: dict[int, str]  # grad node -> plan tensor (a constant or an inputs_embeds row)
    by_event: dict[int, list[Node]] = field(default_factory=dict)  # non-late nodes per event
    late_nodes: list[Node] = field(default_factory=list)  # late nodes in plan order

    @property
    def embeds(self) -> bool:
        """Whether a gradient with respect to the input embeddings is asked for."""
        return bool(self.constants)

    def describe(self) -> dict[str, int]:
        return {"points": sum(len(v) for v in self.tracked.values()),
                "params": len(self.params), "constants": len(self.constants)}


def _where(node: Node) -> dict:
    return {"node": node.id, "op": node.op, "line": node.line}


def _at(node: Node) -> str:
    return f"{node.describe()}" + (f" at {node.line}" if node.line else "")


def analyze_gradients(plan: Plan, info: ModelInfo, anchor: dict[int, int],
                      writes: dict[int, frozenset[int]]) -> GradientSchedule | None:
    """The backward phase of ``plan`` (``None`` for a forward-only plan). ``anchor`` and
    ``writes`` come from the forward schedule; backward-phase anchors are set here."""
    backwards = [n for n in plan.nodes if n.op == BACKWARD]
    grads = [n for n in plan.nodes if n.op == GRAD]
    if not backwards:
        if grads:
            g = grads[0]
            raise PlanError(f"{g.describe()} reads a gradient, but the plan has no backward: "
                            "call loss.backward() on a scalar first", **_where(g))
        return None
    if len(backwards) > 1:
        b = backwards[1]
        raise PlanError(f"{b.describe()} is a second backward (the first is {_at(backwards[0])}): "
                        "a trace back-propagates one scalar; add the losses into one",
                        **_where(b))
    back = backwards[0]
    if plan.mode != "trace":
        raise PlanError("backward runs in a trace, not while generating: use model.trace(...)",
                        **_where(back))
    if len(back.args) != 1 or not isinstance(back.args[0], Ref) or back.kwargs:
        raise SchemaError("backward takes one value, the scalar to back-propagate", **_where(back))
    nodes = plan.nodes_by_id
    invoke_rows = {name: inv.kind for inv in plan.invokes for name in inv.tensors}

    phase: set[int] = set()
    late: set[int] = set()
    event_of: dict[int, int] = {}
    tracked: dict[int, list[int]] = {}
    params: dict[int, tuple[str, str]] = {}
    constants: dict[int, str] = {}
    grad_root: dict[int, int] = {}  # node -> the grad node whose memory its value shares
    written: set[int] = set()

    for node in plan.nodes:
        where = _where(node)
        if node.op == GRAD:
            if node.id < back.id:
                raise PlanError(f"{node.describe()} reads a gradient before the backward "
                                f"({_at(back)}): gradients exist only after loss.backward()",
                                **where)
            event_of[node.id] = _grad_target(node, plan, info, anchor, invoke_rows, tracked,
                                             params, constants, late)
            phase.add(node.id)
            grad_root[node.id] = node.id
            continue
        deps = [d for d in node.refs() if d in phase]
        if node.op == BACKWARD:
            if deps:
                raise PlanError(f"{node.describe()} back-propagates a value made from gradients "
                                f"({_at(nodes[deps[0]])}): gradients of gradients are not "
                                "supported", **where)
            continue
        if not deps:
            continue
        if node.op in (CALL_MODULE, PARAM, SET_POINT) or writes.get(node.id):
            what = ("applies a module to" if node.op in (CALL_MODULE, PARAM)
                    else "writes into the forward pass")
            raise PlanError(f"{node.describe()} {what} a value made from gradients "
                            f"({_at(nodes[deps[0]])}); gradients flow only into saves and into "
                            "other gradients", **where)
        phase.add(node.id)
        event_of[node.id] = min(event_of[d] for d in deps)
        if any(d in late for d in deps):
            late.add(node.id)
        spec = OPS.get(node.op)
        first = node.args[0] if node.args else None
        root = grad_root.get(first.id) if isinstance(first, Ref) else None
        if spec is not None and root is not None and (spec.view or spec.mutates):
            grad_root[node.id] = root
        if spec is not None and spec.mutates:
            written.add(event_of[node.id])
            if root is not None and root not in params and root not in constants:
                target = event_of[root]
                if node.id in late or event_of[node.id] != target:
                    need = min((d for d in deps if event_of[d] != target),
                               key=lambda d: event_of[d], default=deps[0])
                    raise BackwardFlowError(
                        f"{node.describe()} writes the gradient at {_event_name(info, target)} "
                        f"but needs {_at(nodes[need])}, which the backward pass reaches later: "
                        "a gradient can only be changed with values known at its own point",
                        **where)
    for node_id in phase:
        anchor[node_id] = event_of[node_id]
    out = GradientSchedule(backward=back.id, loss=back.args[0].id, phase=frozenset(phase),
                           late=frozenset(late), event_of=event_of, tracked=tracked,
                           written=frozenset(written), params=params, constants=constants)
    for node in plan.nodes:
        if node.id in late:
            out.late_nodes.append(node)
        elif node.id in phase:
            out.by_event.setdefault(event_of[node.id], []).append(node)
    return out


def _grad_target(node: Node, plan: Plan, info: ModelInfo, anchor: dict[int, int],
                 invoke_rows: dict[str, str], tracked: dict[int, list[int]],
                 params: dict[int, tuple[str, str]], constants: dict[int, str],
                 late: set[int]) -> int:
    """Check what a grad node differentiates with respect to; return its event."""
    where = _where(node)
    target = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if isinstance(target, TensorRef):
        kind = invoke_rows.get(target.name)
        if kind == "tokens":
            raise PlanError(f"{node.describe()} asks for the gradient of token ids, which have "
                            "none: read the embedding's, e.g. model.embed.output.grad", **where)
        if not plan.tensors[target.name].is_floating_point():
            raise PlanError(f"{node.describe()} asks for the gradient of an integer constant; "
                            "only floating tensors have gradients", **where)
        constants[node.id] = target.name
        late.add(node.id)
        return START
    if not isinstance(target, Ref):
        raise SchemaError("grad takes one value: a module point, a parameter or a constant",
                          **where)
    of = plan.nodes_by_id[target.id]
    if of.op == PARAM:
        params[node.id] = (of.path or "", of.args[0])
        late.add(node.id)
        return anchor[of.id]
    if of.op != POINT:
        raise PlanError(f"{node.describe()} asks for the gradient of {of.describe()}: gradients "
                        "are read at module points (.output.grad, .input.grad), parameters "
                        "(.param(name).grad) and constants (tr.grad(tensor))", **where)
    if not of.steps.single or of.steps.start != 0:
        raise PlanError(f"{node.describe()}: gradients exist in a trace's pass only", **where)
    template = info.shapes.get(event_key(of.path or "", of.io or "output"))
    if not (isinstance(template, dict) and "shape" in template):
        raise PlanError(f"{node.describe()}: {of.path or '<model>'}.{of.io} is not one tensor, so "
                        "it has no single gradient; take the gradient of a module whose "
                        f"{of.io} is a tensor (a decoder layer, an attention or MLP block)",
                        **where)
    event = anchor[of.id]
    tracked.setdefault(event, []).append(node.id)
    return event


def _event_name(info: ModelInfo, idx: int) -> str:
    if idx == START:
        return "the inputs"
    path, io = info.events[idx].rsplit(":", 1)
    return f"{path or '<model>'}.{io}"
