"""Service units (SU): what a request costs.

    units = SU_PER_REQUEST
          + SU_PER_COMPUTE_SECOND * compute_seconds
          + SU_PER_MIB * bytes_returned / 2**20

``bytes_returned``: the bytes of the tensors the request saved (what it takes out of
the service; the JSON envelope is not counted).

``compute_seconds`` of a **trace** comes from a per-model cost model calibrated by
measurement when the gateway deploys the model (:func:`calibrate`: solo forward
passes of two prompt lengths, each timed by the engine's ``meta["compute_seconds"]``)::

    compute_seconds = fixed_seconds + seconds_per_token * tokens

where ``tokens`` is the number of real (unpadded) prompt tokens of the request.
So a trace costs the same whether it ran alone or shared a forward pass with other
users' traces: batching makes the service faster, not any request cheaper or
dearer, and nobody's bill depends on who else was in the batch. (A trace whose
interventions cost much more than its forward pass, such as a logit lens over every
layer, is undercharged by this model; the ledger keeps each run's measured seconds
next to the charged ones to audit that.)

A **generation** always runs alone, so it is charged its own measured
``meta["compute_seconds"]``.

Before a request runs, the same formula with an *estimate* (the cost model for
every token that will pass: prompt tokens plus ``rows * max_new_tokens``, and the
validator's bound on saved bytes) must fit in the user's balance, else 402.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..ir.codec import encode_plan
from ..ir.model_info import ModelInfo
from ..ir.plan import Invoke, Plan
from ..ir.validate import value_nbytes


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
    """Engine seconds of one trace: ``fixed_seconds + seconds_per_token * tokens``."""

    fixed_seconds: float
    seconds_per_token: float

    def seconds(self, tokens: int) -> float:
        return self.fixed_seconds + self.seconds_per_token * tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_tokens(plan: Plan) -> int:
    """Real prompt tokens (or embedding positions) of all the plan's rows."""
    return sum(int(plan.tensors[name].shape[0]) for inv in plan.invokes for name in inv.tensors)


def plan_rows(plan: Plan) -> int:
    return sum(len(inv.tensors) for inv in plan.invokes)


def saved_nbytes(value: Any) -> int:
    """Bytes of the tensors in a saved value (nested lists, tuples, dicts)."""
    return value_nbytes(value, scalar_bytes=0)


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
