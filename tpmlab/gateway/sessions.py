"""Sessions behind the gateway: the traces of one ``with model.session():`` block, sent
together (:mod:`tpmlab.ir.session`), run and charged as one request.

A session is admitted as a plan is (:meth:`~tpmlab.gateway.core.Gateway.admit`: one of
the user's in-flight slots, the body read up to the tier's ``max_plan_bytes``, validation
in the bounded pool of threads, the hold in the ledger), waits in the same per-model
queue, and runs on the same worker, alone (never merged with other plans), as one call of
the backend's ``run_session_values``: the values its traces keep for each other
(``save(keep=True)`` read by ``from_trace``) stay on the engine. It is charged once,
for what its traces used together (:mod:`.units`), and can be waited for, fetched and
cancelled by its owner only, as any request. Remote saves of its traces are reserved
together against the user's remote-value limits and kept as a plan's are
(:mod:`.remote_values`).

Before anything runs, :func:`prepare_session` validates the whole session:

* every trace under the user's tier limits, each value it reads from an earlier trace
  shaped as that trace kept it, and every ``from_trace`` naming a kept save of an
  earlier trace (:func:`~tpmlab.ir.session.check_session`);
* each trace's tier (the refusal names the first trace that needs more than the user's);
* the session's sums (:func:`check_sums`): its traces, invokes and prompt rows within the
  gateway's ``max_session_traces``, ``max_session_invokes`` and ``max_session_rows``; its
  constants and the bytes its traces save or keep, as far as validation sizes them,
  within one request's limits of the tier (``max_constant_bytes``, ``max_saved_bytes``:
  a session sends one body and takes one answer home); and the forward passes of all its
  traces, by the model's cost model, within the gateway's ``request_timeout``.

The answer is a session result envelope (:func:`~tpmlab.ir.session.encode_session_result`):
each trace's result, in order, each carrying the request's id and the charge of the whole
session.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..errors import LimitError
from ..ir.plan import Plan
from ..ir.session import check_session, decode_session
from ..ir.validate import Limits
from ..runtime.request import plan_digest
from .ledger import UserView
from .records import Request
from .sizing import Checked, check_plan
from .tiers import Need, required_tier
from .units import Hold, combined, plan_rows, plan_tokens

if TYPE_CHECKING:
    from .core import Gateway, GatewayConfig


@dataclass(eq=False)
class SessionRequest(Request):
    """A session in the gateway: ``blob`` is its envelope, ``plans`` its traces in order
    (dropped with the envelope once it has run); ``plan`` is None."""

    plans: list[Plan] = field(default_factory=list)
    session: ClassVar[bool] = True

    def traces(self) -> list[Plan]:
        return list(self.plans)

    def drop_plan(self) -> None:
        super().drop_plan()
        self.plans = []


def session_digest(plans: list[Plan]) -> str:
    """A digest of what the session does: of its traces' plan digests, in order."""
    joined = "\n".join(plan_digest(p) for p in plans)
    return "sha256:" + hashlib.sha256(joined.encode()).hexdigest()


def prepare_session(gateway: Gateway, user: UserView, model: str, blob: bytes
                    ) -> SessionRequest:
    """Decode and validate a session envelope of ``user`` for ``model`` as a whole (see the
    module docstring) and compute its hold: the request to queue, or a
    :class:`~tpmlab.errors.PlanError` or :class:`~tpmlab.gateway.errors.GatewayError`
    naming the problem. Nothing runs before this returns."""
    dep = gateway.deployed(model)
    limits = gateway.limits_for(user)
    cfg = gateway.config

    def check() -> tuple[list[Plan], list[Checked], list[Need]]:
        plans = decode_session(blob, max_bytes=limits.max_plan_bytes)
        check_counts(plans, cfg)  # before the (costlier) validation of each trace
        checked = check_session(plans, dep.info, model=model, limits=limits,
                                meta_module=dep.meta_modules.get, check=check_plan)
        return plans, checked, [required_tier(p, c.schedule, dep.paths)
                                for p, c in zip(plans, checked)]

    plans, checked, needs = gateway.validated(user, check)
    for k, need in enumerate(needs):
        gateway.check_tier(user, need, f"trace {k} of this session")
    holds = [gateway.worst_case(dep, p, c, limits) for p, c in zip(plans, checked)]
    check_sums(plans, checked, holds, limits, cfg)
    remote = [c.remote_bytes for c in checked]
    return SessionRequest(id=uuid.uuid4().hex, user=user, model=model, mode="session",
                          plan=None, blob=blob, digest=session_digest(plans),
                          tokens=sum(plan_tokens(p) for p in plans),
                          hold=combined(holds, cfg.pricing), mergeable=False, plans=plans,
                          remote_bytes=None if None in remote else sum(remote),
                          remote_values=sum(c.remote_values for c in checked))


def check_counts(plans: list[Plan], cfg: GatewayConfig) -> None:
    """The session's traces, invokes and prompt rows within the gateway's bounds
    (:class:`LimitError` naming the sum and the bound)."""
    sums = (("traces", len(plans), cfg.max_session_traces),
            ("invokes", sum(len(p.invokes) for p in plans), cfg.max_session_invokes),
            ("prompt rows", sum(plan_rows(p) for p in plans), cfg.max_session_rows))
    for what, n, bound in sums:
        if n > bound:
            raise LimitError(f"the session has {n} {what} over all its traces, over the "
                             f"gateway's limit of {bound} for one session: split it into "
                             "several sessions")


def check_sums(plans: list[Plan], checked: list[Checked], holds: list[Hold], limits: Limits,
               cfg: GatewayConfig) -> None:
    """What the session sends, saves and takes as long, added over its traces, within one
    request's limits (:class:`LimitError` naming the sum and the limit)."""
    constants = sum(t.numel() * t.element_size() for p in plans for t in p.tensors.values())
    if constants > limits.max_constant_bytes:
        raise LimitError(f"the session's traces carry {constants:,} bytes of tensors, over "
                         f"your tier's limit of {limits.max_constant_bytes:,} for one request")
    saved = sum(c.saved_bytes for c in checked)
    if saved > limits.max_saved_bytes:
        raise LimitError(f"the session's traces save or keep {saved:,} bytes, over your "
                         f"tier's limit of {limits.max_saved_bytes:,} for one request")
    seconds = sum(h.forward_seconds for h in holds)
    if seconds > cfg.request_timeout:
        raise LimitError(f"the session's forward passes take about {seconds:.1f} s (the "
                         f"model's cost model), over the gateway's deadline of "
                         f"{cfg.request_timeout:g} s for one request: split it into several "
                         "sessions")
