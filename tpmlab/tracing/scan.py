"""``with model.scan(prompt):`` a dry run in the notebook: the plan is validated against the
model's description (paths, shapes, steps, rows) and each saved value is a meta tensor
(shape and dtype, no data). Nothing is sent to the engine."""

from __future__ import annotations

from typing import Any

from ..ir.plan import SAVE, Plan
from ..ir.validate import UNKNOWN, infer_values
from .tracer import Trace


class Scan(Trace):
    """A trace that runs nowhere: saved proxies receive meta tensors (``None`` where a shape
    depends on data)."""

    def execute(self, plan: Plan) -> tuple[dict[int, Any], dict[str, Any]]:
        modules = dict(self.model.meta_model.named_modules())
        env = infer_values(plan, self.model.info, limits=self.model.limits,
                           meta_module=modules.get)
        values = {n.id: None if env.get(n.id, UNKNOWN) is UNKNOWN else env[n.id]
                  for n in plan.nodes if n.op == SAVE}
        return values, {"model": self.model.name, "model_version": self.model.version,
                        "dry_run": True}
