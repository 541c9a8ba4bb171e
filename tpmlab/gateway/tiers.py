"""Access tiers, decided on the server from the validated plan (never from the client).

=========  ====================================================================
query      token ids in; generated tokens and the model's final logits out
           (points only at the model's output or the unembedding's output)
embed      also custom ``inputs_embeds`` in and final hidden states out
           (the final norm's output)
inspect    read any module's input or output, parameters, apply model modules
intervene  also write: ``set_point``, ``setitem``, in-place ops on any value that may
           share memory with a module value (:mod:`tpmlab.ir.schedule` decides which)
gradients  also back-propagate: ``loss.backward()`` and ``.grad`` of module values,
           inputs, constants and parameters (returned, never applied); what autograd
           keeps per stage is held to the tier's ``max_autograd_bytes``
admin      also manage users, keys and allocations
=========  ====================================================================

Each tier's :class:`~tpmlab.ir.validate.Limits` (:data:`TIER_LIMITS`) bound what one request
may do; ``max_remote_bytes`` and ``max_remote_values`` bound instead what one *user* keeps
on the engine through remote saves (``.save(remote=True)``) at once, over all their
requests, stages and models, until they release them or the values expire
(:mod:`tpmlab.gateway.remote_values`): none for ``query``, 512 MiB and 1,000 values for
``embed``, 2 GiB and 10,000 for ``inspect``, 4 GiB and 20,000 above.

Each tier includes the ones above it. :func:`required_tier` names the first thing
a plan does that needs more than the lowest tier, so a refusal can say what the
plan did and which tier would allow it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..ir.plan import BACKWARD, CALL_MODULE, PARAM, POINT, SET_POINT, Plan
from ..ir.schedule import Schedule
from ..ir.validate import Limits

TIERS = ("query", "embed", "inspect", "intervene", "gradients", "admin")
RANK = {name: i for i, name in enumerate(TIERS)}

# Per-tier size limits (the engine's own limits still apply on top). Any one value a
# plan computes (``max_intermediate_bytes``) may be twice what the tier may save: what
# a user may take home they may compute, with room for one temporary copy; the lowest
# tiers, who only reduce the final logits, get the least (query: 32 rows' last-position
# logits of a 150k vocabulary take 19 MB; 512 MiB is ample), so that no request of theirs
# can take a stage's memory from everyone else. Only the gradients tier may keep
# autograd state on a stage (``max_autograd_bytes``; below it a backward is refused anyway).
TIER_LIMITS: dict[str, Limits] = {
    "query": Limits(max_nodes=200, max_constant_bytes=4 * 2**20, max_saved_bytes=256 * 2**20,
                    max_invokes=32, max_new_tokens=512, max_tokens_per_row=4096,
                    max_intermediate_bytes=512 * 2**20, max_autograd_bytes=0),
    "embed": Limits(max_nodes=500, max_constant_bytes=64 * 2**20, max_saved_bytes=256 * 2**20,
                    max_invokes=32, max_new_tokens=512, max_tokens_per_row=4096,
                    max_intermediate_bytes=512 * 2**20, max_autograd_bytes=0),
    "inspect": Limits(max_nodes=10_000, max_constant_bytes=64 * 2**20,
                      max_saved_bytes=1 * 2**30, max_invokes=64, max_new_tokens=1024,
                      max_tokens_per_row=8192, max_intermediate_bytes=2 * 2**30,
                      max_autograd_bytes=0),
    "intervene": Limits(max_nodes=20_000, max_constant_bytes=256 * 2**20,
                        max_saved_bytes=2 * 2**30, max_invokes=128, max_new_tokens=2048,
                        max_tokens_per_row=8192, max_intermediate_bytes=4 * 2**30,
                        max_autograd_bytes=0),
    "gradients": Limits(max_nodes=20_000, max_constant_bytes=256 * 2**20,
                        max_saved_bytes=2 * 2**30, max_invokes=128, max_new_tokens=2048,
                        max_tokens_per_row=8192, max_intermediate_bytes=4 * 2**30,
                        max_autograd_bytes=4 * 2**30),
}
# Remote saves (``.save(remote=True)``): what one user may keep on the engine at once, over
# all their requests, stages and models (``max_remote_bytes``, ``max_remote_values``; the
# gateway accounts them, :mod:`.remote_values`). The query tier, which only reads final
# logits, keeps none; the others as much as two of their largest saves.
REMOTE_LIMITS: dict[str, tuple[int, int]] = {
    "query": (0, 0),
    "embed": (512 * 2**20, 1_000),
    "inspect": (2 * 2**30, 10_000),
    "intervene": (4 * 2**30, 20_000),
    "gradients": (4 * 2**30, 20_000),
}
TIER_LIMITS = {name: dataclasses.replace(limits, max_remote_bytes=REMOTE_LIMITS[name][0],
                                         max_remote_values=REMOTE_LIMITS[name][1])
               for name, limits in TIER_LIMITS.items()}
TIER_LIMITS["admin"] = TIER_LIMITS["gradients"]


@dataclass(frozen=True)
class Need:
    """The lowest tier that allows a plan, and the first reason it needs that tier."""

    tier: str
    reason: str


@dataclass(frozen=True)
class OutputPaths:
    """Module paths whose outputs the low tiers may read (from the model's adapter)."""

    logits: frozenset[str]  # the model itself ("") and its unembedding
    final_hidden: frozenset[str]  # the final norm


def required_tier(plan: Plan, schedule: Schedule, paths: OutputPaths) -> Need:
    """The lowest tier that allows ``plan`` (validated, with its ``schedule``)."""
    need = Need("query", "reads only prompts, generated tokens and final logits")

    def raise_to(tier: str, reason: str) -> None:
        nonlocal need
        if RANK[tier] > RANK[need.tier]:
            need = Need(tier, reason)

    if any(inv.kind == "embeds" for inv in plan.invokes):
        raise_to("embed", "gives custom inputs_embeds")
    for node in plan.nodes:
        where = f"node {node.id}" + (f" at {node.line}" if node.line else "")
        if node.op == BACKWARD:
            raise_to("gradients", f"back-propagates a loss ({where})")
        elif node.id in schedule.writes or node.op == SET_POINT:
            # by data flow: any op that mutates a value that may share memory with a
            # module value (through views, conversions, containers...) writes it
            targets = sorted(schedule.writes.get(node.id, ()))
            target = plan.nodes_by_id[targets[0]] if targets else node
            what = f"{target.path or '<model>'}.{target.io}"
            raise_to("intervene", f"writes {what} ({node.op}, {where})")
        elif node.op == POINT:
            name = f"{node.path or '<model>'}.{node.io}"
            if node.io == "output" and node.path in paths.logits:
                continue
            if node.io == "output" and node.path in paths.final_hidden:
                raise_to("embed", f"reads the final hidden states {name} ({where})")
            else:
                raise_to("inspect", f"reads the intermediate value {name} ({where})")
        elif node.op == PARAM:
            raise_to("inspect", f"reads the parameter {node.path}.{node.args[0]} ({where})")
        elif node.op == CALL_MODULE:
            raise_to("inspect", f"applies the module {node.path} to a value ({where})")
    return need


def allows(tier: str, needed: str) -> bool:
    return RANK.get(tier, -1) >= RANK[needed]
