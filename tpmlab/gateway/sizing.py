"""Validation for the gateway: the plan's checks, the bytes it saves, whether that count is
complete, and what its remote saves keep on the engine (:mod:`.remote_values` accounts
those per user).

:func:`tpmlab.ir.validate.inspect_plan` sizes every save it can on meta tensors and
leaves the rest to the engine's run-time limit. The gateway must know whether it sized
them all, because a request holds its worst case before it runs (:mod:`.units`): the
validator's count when it is complete, the tier's ``max_saved_bytes`` otherwise. The
count is incomplete when

* a generation saves at steps after the prompt pass (those values are not propagated),
* a module point's shape template is not fixed by batch and length, or
* some op could not run on meta tensors (data-dependent shapes such as boolean-mask
  indexing, values read as numbers): validation then treats its result as unknown.
  :class:`_MetaFailures` watches the validator's meta computations for such failures, or
* a session's trace reads a value of an earlier trace whose shape validation could not
  know (``from_trace``, :mod:`tpmlab.ir.session`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import LimitError
from ..ir.model_info import ModelInfo, event_key
from ..ir.plan import POINT, SAVE, Plan
from ..ir.schedule import Schedule
from ..ir.validate import Limits, contains_unknown, inspect_plan, remote_saves
from ..remote import kept_nbytes


@dataclass(frozen=True)
class Checked:
    schedule: Schedule
    saved_bytes: int  # what validation sized
    sized: bool  # whether that is every save
    remote_bytes: int | None = 0  # what its remote saves keep (None: not known before it runs)
    remote_values: int = 0  # how many values its remote saves keep (generation steps counted)


class _MetaFailures(TorchDispatchMode):
    """Notes whether any op failed on meta tensors while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            return func(*args, **(kwargs or {}))
        except Exception:
            self.failed = True
            raise


def _static(template: Any) -> bool:
    """Whether a shape template of :class:`ModelInfo` is fixed once batch and length are."""
    if template is None:
        return True
    if isinstance(template, dict) and "$tuple" in template:
        return all(_static(t) for t in template["$tuple"])
    if isinstance(template, dict) and "$dict" in template:
        return all(_static(t) for t in template["$dict"].values())
    if isinstance(template, dict) and "shape" in template:
        return all(d in ("B", "T") or isinstance(d, int) for d in template["shape"])
    return False


def check_plan(plan: Plan, info: ModelInfo, limits: Limits,
               meta_module: Callable[[str], torch.nn.Module | None] | None, *,
               imports: dict[int, Any] | None = None, env: dict[int, Any] | None = None
               ) -> Checked:
    """Validate ``plan`` with ``limits`` (raises a :class:`~tpmlab.errors.PlanError`); the
    saved bytes validation sized, over the limit of the tier is a :class:`LimitError`.
    ``imports``/``env``: as for :func:`~tpmlab.ir.validate.inspect_plan` (a session's
    traces, :func:`~tpmlab.ir.session.check_session`)."""
    probe = _MetaFailures()
    env = {} if env is None else env
    with probe:
        schedule, saved = inspect_plan(plan, info, limits=limits, meta_module=meta_module,
                                       imports=imports, env=env)
    if saved > limits.max_saved_bytes:
        raise LimitError(f"the plan saves {saved:,} bytes, over your tier's limit of "
                         f"{limits.max_saved_bytes:,} bytes")
    later_steps = plan.mode == "generate" and any(
        n.op == SAVE and not (n.steps.single and n.steps.start == 0) for n in plan.nodes)
    templates = all(_static(info.shapes.get(event_key(n.path, n.io)))
                    for n in plan.nodes if n.op == POINT)
    unknown_imports = contains_unknown(list((imports or {}).values()))
    remote_bytes, remote_values = remote_saves(plan, env, kept_nbytes)
    return Checked(schedule, saved, not (later_steps or not templates or probe.failed
                                         or unknown_imports), remote_bytes, remote_values)
