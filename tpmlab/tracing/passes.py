"""Running a plan with more invokes than the engine takes in one pass, as several passes.

Each pass carries a slice of the invokes, the nodes that read them, and the nodes that
read no invoke (constants, random values: recomputed in each pass) or only the whole batch
(a persistent edit: applied to each pass's batch); the saved values of all passes come back
as one result. A plan whose nodes combine values of invokes that
land in different passes cannot be split: that is a :class:`~tpmlab.errors.LimitError`
naming the node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..errors import LimitError
from ..ir.ops import OPS
from ..ir.plan import POINT, SAVE, Invoke, Plan, Ref

RunOne = Callable[[Plan], "tuple[dict[int, Any], dict[str, Any]]"]


def run_in_passes(plan: Plan, max_invokes: int, run_one: RunOne
                  ) -> tuple[dict[int, Any], dict[str, Any]]:
    """Run ``plan`` with ``run_one``, split into passes of at most ``max_invokes`` invokes
    where it has more. The metadata of a split run lists each pass's ``plan_digest`` under
    ``pass_digests`` and their number under ``passes``."""
    if len(plan.invokes) <= max_invokes:
        return run_one(plan)
    owner = invoke_of_nodes(plan, max_invokes)
    values: dict[int, Any] = {}
    metas: list[dict[str, Any]] = []
    for first in range(0, len(plan.invokes), max_invokes):
        part = _part(plan, owner, range(first, min(first + max_invokes, len(plan.invokes))))
        part_values, meta = run_one(part)
        for node_id, value in part_values.items():
            if node_id < 0:  # per-row results (generated ids): the passes' rows in order
                values.setdefault(node_id, []).extend(value)
            else:  # a node that reads no invoke is saved by every pass: keep the first
                values.setdefault(node_id, value)
        metas.append(meta)
    meta = {**metas[0], "passes": len(metas), "pass_digests": [m.get("plan_digest") for m in metas]}
    for key in ("compute_seconds",):
        if all(key in m for m in metas):
            meta[key] = sum(m[key] for m in metas)
    return values, meta


WHOLE = "whole batch"  # the owner of values read from the whole batch (an empty tr.invoke())


def invoke_of_nodes(plan: Plan, max_invokes: int) -> dict[int, int | str | None]:
    """The pass (first invoke of its slice) each node belongs to; ``None`` for nodes that
    read no invoke (run in every pass), :data:`WHOLE` for nodes that read only the whole
    batch (a persistent edit: run on each pass's batch). Raises where a node needs invokes
    of two passes, or saves a value of the whole batch (no one pass holds it)."""
    owner: dict[int, int | str | None] = {}
    for node in plan.nodes:
        if node.op == POINT:
            owner[node.id] = WHOLE if node.invoke is None else \
                node.invoke // max_invokes * max_invokes
            continue
        passes = {owner[r] for r in node.refs()} - {None}
        if len(passes) > 1:
            _refuse(node, "combines values of invokes that fall in different passes"
                    if WHOLE not in passes else "combines a value of the whole batch with "
                    "an invoke's value")
        owner[node.id] = passes.pop() if passes else None
        if node.op == SAVE and owner[node.id] == WHOLE:
            _refuse(node, "saves a value of the whole batch (an empty tr.invoke())")
        spec = OPS.get(node.op)
        first = node.args[0] if node.args and isinstance(node.args[0], Ref) else None
        if spec is not None and spec.mutates and first is not None and \
                owner[first.id] != owner[node.id]:
            _refuse(node, "writes a value shared by all passes with an invoke's value")
    return owner


def _refuse(node: Any, why: str) -> None:
    raise LimitError(f"the trace has more invokes than one pass takes, and it cannot be split "
                     f"into passes: {node.describe()} {why}; use fewer invokes per trace",
                     node=node.id, op=node.op, line=node.line)


def _part(plan: Plan, owner: dict[int, int | None], invokes: range) -> Plan:
    """The pass of ``invokes``: their rows and nodes, every node that reads no invoke, and
    every constant but the other passes' inputs."""
    nodes = [dataclasses.replace(n, invoke=n.invoke - invokes.start)
             if n.op == POINT and n.invoke is not None else n
             for n in plan.nodes if owner[n.id] in (None, WHOLE, invokes.start)]
    others = {name for i, inv in enumerate(plan.invokes) if i not in invokes
              for name in inv.tensors}
    return plan.replace(invokes=[Invoke(plan.invokes[i].kind, list(plan.invokes[i].tensors))
                                 for i in invokes],
                        nodes=nodes,
                        tensors={k: v for k, v in plan.tensors.items() if k not in others})
