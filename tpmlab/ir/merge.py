"""Merging several plans into one batch, and splitting its result back.

Several users' traces of the same model version can run in one forward pass:
each plan's invokes become consecutive invokes of the merged plan, its nodes are
renumbered after the previous plans' nodes, and its constant tensors are renamed
``p{k}.{name}``. After the run, :func:`split_values` gives every plan its saved values
(and its nodes' measured ``node_seconds``) keyed by its own node ids.

Each plan reads and writes only its own rows (DESIGN.md contract 9): an invoke's
module points are views of its rows, and values that all rows share are read-only
inside an invoke (:mod:`tpmlab.ir.rows`). So no plan's nodes can change another's
result: a plan's values from a merged run are bit for bit those of the same batch in
which the other plans do nothing. Against the plan run alone they agree to float
rounding: the kernels' summation order depends on the batch's shape (rows, padded
length), not on other rows' values.

Only ``"trace"`` plans merge (a generation decides its length per batch), all of the
same input kind (token ids or ``inputs_embeds``), and only plans whose every module
point names its invoke: a point with ``invoke=None`` reads the whole batch, which
would include other plans' rows. :func:`can_merge` says whether a plan qualifies.
How far one pass may grow is a :class:`MergeBudget`, the one rule both the in-process
pass queue (:mod:`tpmlab.runtime.shared_passes`) and the gateway's batches apply.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import SchemaError
from .args import rebuild
from .plan import BACKWARD, GRAD, POINT, Invoke, Node, Plan, Ref, TensorRef


@dataclass(frozen=True)
class MergeMap:
    """How the merged plan's node ids map back to each part: ``ids[k][old] = new``."""

    ids: list[dict[int, int]]

    def owner(self) -> dict[int, tuple[int, int]]:
        """``new id -> (part, old id)``."""
        return {new: (k, old) for k, part in enumerate(self.ids) for old, new in part.items()}


def can_merge(plan: Plan) -> bool:
    """Whether ``plan`` may share a forward pass with other plans."""
    if plan.mode != "trace" or plan.generate is not None or not plan.invokes:
        return False
    for node in plan.nodes:
        if node.op == POINT and node.invoke is None:
            return False
        if node.steps.start != 0 or node.steps.stop != 1:
            return False
        if node.op in (BACKWARD, GRAD):  # a backward runs alone: its gradients are its own
            return False
    return True


@dataclass(frozen=True)
class MergeBudget:
    """How far one shared forward pass may grow: requests, rows, padded cells (rows x the
    longest row: what bounds the pass's activation memory) and fill (real tokens / padded
    cells: what bounds the padding computed for nothing). ``None`` / 0: no bound."""

    max_requests: int = 32
    max_rows: int = 64
    max_cells: int | None = 16_384
    min_fill: float = 0.75

    def group(self, lengths: list[int]) -> MergeGroup:
        """A pass that starts with one request whose rows have these lengths."""
        return MergeGroup(self, lengths)


class MergeGroup:
    """The requests a pass has taken so far, against its :class:`MergeBudget`."""

    def __init__(self, budget: MergeBudget, lengths: list[int]) -> None:
        self.budget = budget
        self.requests = 1
        self.rows, self.longest, self.real = len(lengths), max(lengths, default=0), sum(lengths)

    def add(self, lengths: list[int]) -> bool:
        """Take a request with rows of these lengths if the budget allows (else nothing
        changes): whether it was taken."""
        b = self.budget
        rows, longest = self.rows + len(lengths), max(self.longest, *lengths, 0)
        real = self.real + sum(lengths)
        if self.requests + 1 > b.max_requests or rows > b.max_rows \
                or (b.max_cells is not None and rows * longest > b.max_cells) \
                or real < b.min_fill * rows * longest:
            return False
        self.requests += 1
        self.rows, self.longest, self.real = rows, longest, real
        return True


def row_lengths(plan: Plan) -> list[int]:
    """The length of each row of ``plan``'s batch (its invokes' prompts, in order)."""
    return [int(plan.tensors[t].shape[0]) for inv in plan.invokes for t in inv.tensors]


def merge_key(plan: Plan) -> tuple[str, str, str]:
    """Plans merge only with plans of the same key: model, model version, input kind."""
    return (plan.model, plan.model_version, plan.invokes[0].kind if plan.invokes else "")


def merge_plans(plans: list[Plan]) -> tuple[Plan, MergeMap]:
    """One plan that runs every plan of ``plans`` on its own rows of one batch.

    Raises :class:`SchemaError` if the plans cannot share a pass (see :func:`can_merge`,
    :func:`merge_key`)."""
    if not plans:
        raise SchemaError("nothing to merge")
    key = merge_key(plans[0])
    for k, plan in enumerate(plans):
        if not can_merge(plan):
            raise SchemaError(f"plan {k} cannot share a forward pass (generation, multi-step "
                              "nodes, or a point that reads all rows)")
        if merge_key(plan) != key:
            raise SchemaError(f"plan {k} is for {merge_key(plan)}, not {key}")
    invokes: list[Invoke] = []
    nodes: list[Node] = []
    tensors: dict[str, Any] = {}
    id_maps: list[dict[int, int]] = []
    for k, plan in enumerate(plans):
        prefix = f"p{k}."
        names = {name: prefix + name for name in plan.tensors}
        for name, tensor in plan.tensors.items():
            tensors[names[name]] = tensor
        shift = len(invokes)
        for inv in plan.invokes:
            invokes.append(Invoke(inv.kind, [names[t] for t in inv.tensors]))
        ids: dict[int, int] = {}
        for node in plan.nodes:
            ids[node.id] = len(nodes)
            nodes.append(Node(
                id=ids[node.id], op=node.op,
                args=_rewrite(node.args, ids, names), kwargs=_rewrite(node.kwargs, ids, names),
                path=node.path, io=node.io,
                invoke=None if node.invoke is None else node.invoke + shift,
                steps=node.steps, line=node.line))
        id_maps.append(ids)
    first = plans[0]
    merged = Plan(model=first.model, model_version=first.model_version, invokes=invokes,
                  nodes=nodes, tensors=tensors, mode="trace", generate=None, schema=first.schema,
                  stop=all(plan.stop for plan in plans))  # the pass ends early only if all agree
    return merged, MergeMap(id_maps)


def split_values(values: dict[int, Any], mapping: MergeMap) -> list[dict[int, Any]]:
    """The merged run's saved values (or any ``{node id: x}`` of it, such as the result's
    ``node_seconds``), split per part and keyed by each part's own node ids."""
    owner = mapping.owner()
    out: list[dict[int, Any]] = [{} for _ in mapping.ids]
    for new, value in values.items():
        if new in owner:
            part, old = owner[new]
            out[part][old] = value
    return out


def _rewrite(value: Any, ids: dict[int, int], names: dict[str, str]) -> Any:
    def leaf(x: Any) -> Any:
        if isinstance(x, Ref):
            if x.id not in ids:  # validation refuses forward references; keep them refused
                raise SchemaError(f"reference to node {x.id}, which does not come before it")
            return Ref(ids[x.id])
        if isinstance(x, TensorRef):
            if x.name not in names:
                raise SchemaError(f"reference to unknown tensor {x.name!r}")
            return TensorRef(names[x.name])
        return x

    return rebuild(value, leaf)
