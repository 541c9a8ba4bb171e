"""Service units (SU): what a request holds before it runs and what it is charged after.

    units = SU_PER_REQUEST
          + SU_PER_COMPUTE_SECOND * compute_seconds
          + SU_PER_MIB * bytes_returned / 2**20

``bytes_returned``: the bytes of the tensors the request saved, generated token ids
included (what it takes out of the service; the JSON envelope is not counted).

``compute_seconds`` is the request's **own** compute, the same whether it ran alone or
shared a forward pass with other users' plans:

* its forward passes, from a per-model cost model calibrated by measurement when the
  gateway deploys the model (:func:`calibrate`: solo passes of two prompt lengths, each
  timed by the engine's ``meta["compute_seconds"]``)::

      forward_seconds = passes * fixed_seconds + seconds_per_token * tokens

  where ``passes`` is 1 for a trace and ``1 + steps`` for a generation of ``steps`` new
  tokens, and ``tokens`` counts every real (unpadded) token that went through the model:
  the prompt's and ``rows`` per generated step;
* plus its plan's own nodes, as the engine measured them (``meta["node_seconds"]``, by
  plan node id: in a merged batch each request is charged only its own nodes);
* plus, for a plan with a backward (the ``gradients`` tier; such plans always run
  alone), the backward pass as the engine measured it (``meta["backward_seconds"]``,
  summed over stages). Its hold adds ``BACKWARD_FACTOR`` times the forward passes.

So batching makes the service faster, not any request cheaper or dearer, and nobody's
bill depends on who else was in the batch.

**The hold.** Before a request runs, the gateway holds its worst case in the ledger
(:func:`hold`): the forward passes of every token that may pass (``max_new_tokens`` for
a generation), an allowance for the plan's own compute of ``plan_compute_factor`` times
those passes (none for a plan without nodes of its own), and the bytes it may
save: exactly what validation sized, or the tier's ``max_saved_bytes`` (which the engine
enforces while running) when validation cannot size a save (later generation steps,
data-dependent shapes). The hold must fit the user's balance minus their other holds,
else 402. A session's traces run as one request: its hold is theirs added up and priced
as one request's (:func:`combined`), and so is its charge. **The hold is the cap**: a
request is charged what it used, never more than its hold, so no balance goes below
zero; what a request used beyond its hold (a plan whose own compute outgrew the
allowance) is counted in the gateway's metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..ir.codec import encode_plan
from ..ir.model_info import ModelInfo
from ..ir.plan import BACKWARD, POINT, Invoke, Plan
from ..ir.schedule import stop_step
from ..ir.validate import value_nbytes
from ..runtime.request import GENERATED

TOKEN_ID_BYTES = 8  # generated ids come back as int64
BACKWARD_FACTOR = 3.0  # a backward's hold: its pass costs about twice a forward, plus margin


@dataclass(frozen=True)
class Pricing:
    su_per_request: float = 0.1
    su_per_compute_second: float = 100.0  # 1 SU = 10 ms of engine compute
    su_per_mib: float = 1.0

    def units(self, compute_seconds: float, bytes_returned: int) -> float:
        return (self.su_per_request + self.su_per_compute_second * compute_seconds
                + self.su_per_mib * bytes_returned / 2**20)


@dataclass(frozen=True)
class CostModel:
    """Engine seconds of one forward pass: ``fixed_seconds + seconds_per_token * tokens``."""

    fixed_seconds: float
    seconds_per_token: float

    def seconds(self, tokens: int) -> float:
        return self.fixed_seconds + self.seconds_per_token * tokens

    def forward_seconds(self, prompt_tokens: int, rows: int, steps: int = 0) -> float:
        """Seconds of a request's forward passes: the prompt pass over ``prompt_tokens`` and,
        for a generation, ``steps`` more passes of one token per row (``rows`` rows)."""
        return ((1 + steps) * self.fixed_seconds
                + self.seconds_per_token * (prompt_tokens + rows * steps))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Hold:
    """A request's worst case, held in the ledger while it is in flight."""

    forward_seconds: float  # every token that may pass
    plan_seconds: float  # the allowance for the plan's own compute
    saved_bytes: int  # the most it may save (generated ids included)
    sized: bool  # whether validation sized every save (else the tier's limit is held)
    units: float


def plan_tokens(plan: Plan) -> int:
    """Real prompt tokens (or embedding positions) of all the plan's rows."""
    return sum(int(plan.tensors[name].shape[0]) for inv in plan.invokes for name in inv.tensors)


def plan_rows(plan: Plan) -> int:
    return sum(len(inv.tensors) for inv in plan.invokes)


def max_new_tokens(plan: Plan) -> int:
    return plan.generate.max_new_tokens if plan.mode == "generate" and plan.generate else 0


def computes(plan: Plan) -> bool:
    """Whether the plan has nodes of its own to run (the engine times every node but the
    module points: ops, saves, writes)."""
    return any(node.op != POINT for node in plan.nodes)


def saved_nbytes(value: Any) -> int:
    """Bytes of the tensors in a saved value (nested lists, tuples, dicts)."""
    return value_nbytes(value, scalar_bytes=0)


def generated_bytes_bound(plan: Plan) -> int:
    """The most bytes of generated token ids a generation returns (prompt ids included)."""
    steps = max_new_tokens(plan)
    if not steps:
        return 0
    lengths = [int(plan.tensors[n].shape[0]) for inv in plan.invokes for n in inv.tensors]
    return TOKEN_ID_BYTES * sum(length + steps for length in lengths)


def hold(plan: Plan, cost: CostModel, pricing: Pricing, *, saved_bytes: int, sized: bool,
         max_saved_bytes: int, plan_compute_factor: float) -> Hold:
    """The worst case of ``plan`` (see the module docstring). ``saved_bytes``: what
    validation sized; ``sized``: whether it sized every save; ``max_saved_bytes``: the
    tier's limit, enforced by the engine while the plan runs."""
    forward = cost.forward_seconds(plan_tokens(plan), plan_rows(plan), max_new_tokens(plan))
    own = plan_compute_factor * forward if computes(plan) else 0.0
    if any(node.op == BACKWARD for node in plan.nodes):
        own += BACKWARD_FACTOR * forward
    nbytes = (saved_bytes if sized else max(saved_bytes, max_saved_bytes)) \
        + generated_bytes_bound(plan)
    return Hold(forward, own, nbytes, sized, pricing.units(forward + own, nbytes))


def combined(holds: list[Hold], pricing: Pricing) -> Hold:
    """The hold of several plans run as one request (a session's traces): their seconds
    and bytes added, priced once (one ``su_per_request``)."""
    forward = sum(h.forward_seconds for h in holds)
    own = sum(h.plan_seconds for h in holds)
    nbytes = sum(h.saved_bytes for h in holds)
    return Hold(forward, own, nbytes, all(h.sized for h in holds),
                pricing.units(forward + own, nbytes))


def steps_run(plan: Plan, values: Mapping[int, Any]) -> int:
    """Generation steps a finished request ran (0 for a trace), from its generated ids; a
    generation its ``tracer.stop()`` ended returns none, and ran up to its stop's step."""
    if plan.mode != "generate":
        return 0
    if plan.stop and GENERATED not in values:
        return stop_step(plan.nodes)
    rows = values.get(GENERATED) or []
    lengths = [int(plan.tensors[n].shape[0]) for inv in plan.invokes for n in inv.tensors]
    prompt = lengths if plan.invokes and plan.invokes[0].kind == "tokens" else [0] * len(lengths)
    return max((int(ids.shape[-1]) - p for ids, p in zip(rows, prompt)), default=0)


def own_node_seconds(node_seconds: Mapping[Any, float] | None, ids: Mapping[int, int]) -> float:
    """Seconds the engine spent on a request's own nodes. ``node_seconds``: the run's
    ``{node id: seconds}`` (keys may be strings after a JSON round trip); ``ids``: the
    request's node ids as they were in the plan that ran (``{own id: run id}``)."""
    if not node_seconds:
        return 0.0
    run = {int(k): float(v) for k, v in node_seconds.items()}
    return sum(run.get(new, 0.0) for new in ids.values())


def calibrate(run_seconds, info: ModelInfo, *, lengths: tuple[int, int] = (8, 64),
              repeats: int = 3) -> CostModel:
    """Fit a :class:`CostModel` from solo traces of two prompt lengths.

    ``run_seconds(plan_bytes) -> float`` runs a plan alone and returns its
    ``meta["compute_seconds"]``. The fastest of ``repeats`` runs per length is used (the least disturbed by other load)."""
    medians = []
    for n in lengths:
        ids = torch.arange(1, n + 1, dtype=torch.long) % 100 + 1
        plan = Plan(model=info.name, model_version=info.version,
                    invokes=[Invoke("tokens", ["in0"])], nodes=[], tensors={"in0": ids})
        blob = encode_plan(plan)
        run_seconds(blob)  # warm-up
        medians.append(min(run_seconds(blob) for _ in range(repeats)))  # least disturbed run
    (n0, t0), (n1, t1) = zip(lengths, medians)
    per_token = max((t1 - t0) / (n1 - n0), 0.0)
    fixed = max(t0 - per_token * n0, 0.0)
    if per_token == 0.0:
        per_token = t1 / n1
    return CostModel(fixed_seconds=fixed, seconds_per_token=per_token)
