"""The gateway's engine side: admission, cross-user batching, charging. No HTTP here
(see :mod:`tpmlab.gateway.app`).

A request's life (:meth:`Gateway.admit`):

1. the user's in-flight count is checked, before the body is read;
2. the body is read up to the tier's ``Limits.max_plan_bytes``, then decoded and
   validated with the tier's limits in a bounded pool of validation threads (a flood of
   plans waits there or is refused 503, and never blocks the event loop); the tier the
   plan needs is decided and its worst case computed (:mod:`.units`);
3. the ledger holds that worst case, in one atomic conditional update shared by every
   gateway on the database (:meth:`~tpmlab.gateway.ledger.Ledger.reserve`), else 402;
4. one worker task per model takes queued requests and, when batching is on, runs the
   traces that arrived within ``batch_window`` seconds of the first (same model version
   and input kind, every save sized, up to ``max_batch_requests`` and
   ``max_batch_rows``) as one merged plan (:mod:`tpmlab.ir.merge`), each on its own
   rows, under the users' limits (:func:`merged_limits`). If a merged run fails, each
   request of it runs again alone, so one bad plan never fails another user's. A
   session (the traces of ``model.session()``, :mod:`.sessions`), admitted the same way
   and validated as a whole, runs alone, as one call of the engine;
5. results are split per request, re-encoded with the request's own plan digest, and
   each hold becomes a charge of what the request used, at most its hold, in a second
   thread while the engine goes on. The plan's constants are dropped once it has run;
   results are kept per user within a byte budget (:mod:`.records`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter as Tally
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from ..errors import (
    PlanError,
    TpmlabError,
    WeightsChangedError,
)
from ..ir.codec import decode_plan, encode_plan, encode_result
from ..ir.merge import MergeBudget, can_merge, merge_key, merge_plans, row_lengths, split_values
from ..ir.model_info import ModelInfo
from ..ir.plan import Plan
from ..ir.session import encode_session_result
from ..ir.validate import Limits
from ..runtime import compute_threads
from ..runtime.backend import Backend
from ..runtime.limits import merged_limits
from ..runtime.request import plan_digest
from .errors import (
    BadRequestError,
    BusyError,
    ConflictError,
    GatewayError,
    GatewayTimeoutError,
    NotFoundError,
    QuotaError,
    RateLimitError,
    ResultGoneError,
    TierError,
    UpstreamError,
    as_gateway_error,
)
from .ledger import Ledger, UserView, from_micro, to_micro
from .metrics import Metrics
from .records import FINISHED, Request, RequestTable
from .remote_values import RemoteValueTable
from .sizing import Checked, check_plan
from .tiers import TIER_LIMITS, Need, OutputPaths, allows, required_tier
from .units import (
    CostModel,
    Hold,
    LearnedCost,
    Pricing,
    calibrate,
    hold,
    own_node_seconds,
    plan_rows,
    plan_tokens,
    saved_nbytes,
    steps_run,
)

log = logging.getLogger("tpmlab.gateway")
T = TypeVar("T")
# what turns a request body into a queued request: (user, model, body) -> Request
Prepare = Callable[[UserView, str, bytes], Request]
UNBOUNDED = 2**62  # a limit the gateway leaves to the engine's own


@dataclass
class GatewayConfig:
    """What a gateway serves and how. Times in seconds, sizes in bytes."""

    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    batching: bool = True
    batch_window: float = 0.010
    max_batch_requests: int = 32
    max_batch_rows: int = 64
    # rows x the longest row of a merged pass, and real tokens / that: see MergeBudget.
    # Unbounded by default: a GPU pass of many padded rows costs about what one row does.
    max_batch_cells: int | None = None
    min_batch_fill: float = 0.0
    max_concurrent_per_user: int = 8
    max_session_traces: int = 16  # traces in one session request (sessions.py)
    max_session_invokes: int = 256  # invokes over all the traces of one session
    max_session_rows: int = 512  # prompt rows over all the traces of one session
    request_timeout: float = 300.0
    keep_results_seconds: float = 600.0
    max_kept_bytes_per_user: int = 256 * 2**20  # finished requests' results and records
    pricing: Pricing = field(default_factory=Pricing)
    cost_models: dict[str, CostModel] = field(default_factory=dict)  # else calibrated at start
    # learn each cost model down from the requests that run alone (units.LearnedCost); off:
    # the cost models stay as given or calibrated (gateways sharing a ledger price alike)
    learn_costs: bool = True
    tier_limits: dict[str, Limits] = field(default_factory=lambda: dict(TIER_LIMITS))
    plan_compute_factor: float = 8.0  # a plan's own compute held, in forward passes (units.py)
    hold_lease_seconds: float = 60.0  # a crashed gateway's holds are released after this
    validation_threads: int = 2
    max_validations_waiting: int = 64  # beyond this many plans waiting to be validated: 503
    auth_failure_burst: int = 20  # failed authentications per address before 429...
    auth_failure_rate: float = 0.5  # ...and how many more per second after that
    # remote saves (.remote_values): kept this long after their request, then released...
    remote_value_ttl: float = 3600.0
    # ...and reading them is held as a scan at this speed (plus gram's multiply-adds at
    # this rate) before it runs; charged what it took
    remote_bytes_per_second: float = 256 * 2**20
    remote_flops_per_second: float = 1e9
    max_read_values: int = 1024  # values one read of several takes (remote_values.py)


@dataclass
class Deployed:
    info: ModelInfo
    paths: OutputPaths
    meta_modules: dict[str, Any]
    learned: LearnedCost

    @property
    def cost(self) -> CostModel:
        """The cost model holds and charges use now (:class:`~.units.LearnedCost`)."""
        return self.learned.model


@dataclass
class _Ran:
    """One request's part of an engine run."""

    values: dict[int, Any]
    meta: dict[str, Any]
    ids: dict[int, int]  # the request's node ids -> their ids in the plan that ran


class Gateway:
    """Admission, batching and charging in front of any :class:`~tpmlab.runtime.backend.Backend`."""

    def __init__(self, backend: Backend, ledger: Ledger, config: GatewayConfig | None = None) -> None:
        from ..models import resolve

        self.backend = backend
        self.ledger = ledger
        self.config = config or GatewayConfig()
        self.metrics = Metrics()
        self.instance = uuid.uuid4().hex  # names this gateway's holds in the ledger
        self.models: dict[str, Deployed] = {}
        for name in self.config.models:
            info = backend.deploy(name)
            source = resolve(name)
            adapter = source.adapter
            paths = OutputPaths(logits=frozenset({"", adapter.unembed}),
                                final_hidden=frozenset({adapter.final_norm}))
            cost = self.config.cost_models.get(name) or calibrate(
                lambda blob, name=name: self._run_values(name, blob, None)[1]["compute_seconds"],
                info)
            self.models[name] = Deployed(info, paths, dict(source.meta_model().named_modules()),
                                         LearnedCost(cost, learn=self.config.learn_costs))
            self.metrics.cost_scale.labels(name).set(1.0)
        self.records = RequestTable(keep_seconds=self.config.keep_results_seconds,
                                    max_bytes_per_user=self.config.max_kept_bytes_per_user)
        self.remote_values = RemoteValueTable(self.config.remote_value_ttl)
        self._inflight: dict[int, int] = {}
        self._queued: Tally[str] = Tally()
        self._validating = 0
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: dict[str, deque] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._housekeeping: asyncio.Task | None = None
        self._engines = {name: ThreadPoolExecutor(1, thread_name_prefix=f"engine-{name}",
                                                  initializer=compute_threads.settle)
                         for name in self.models}
        self._validators = ThreadPoolExecutor(self.config.validation_threads,
                                              thread_name_prefix="gateway-validate")
        self._post = ThreadPoolExecutor(2, thread_name_prefix="gateway-post")

    # -- admission --------------------------------------------------------------------------------
    def deployed(self, model: str) -> Deployed:
        if model not in self.models:
            raise NotFoundError(f"model {model!r} is not served here; served: {sorted(self.models)}")
        return self.models[model]

    def limits_for(self, user: UserView) -> Limits:
        return self.config.tier_limits.get(user.tier) or TIER_LIMITS["query"]

    def engine_limits(self, user: UserView) -> Limits:
        """What a request of ``user`` runs under on the engine: the tier's limits, but for
        remote saves, which the tier bounds per user over all their requests and
        :attr:`remote_values` accounts: there the engine's own (per stage, for the gateway
        as one owner) apply."""
        return replace(self.limits_for(user), max_remote_bytes=UNBOUNDED,
                       max_remote_values=UNBOUNDED)

    async def admit(self, user: UserView, model: str,
                    read_body: Callable[[int], Awaitable[bytes]],
                    prepare: Prepare | None = None) -> Request:
        """Admit one plan of ``user``: ``read_body(max_bytes)`` reads it (called only once the
        user may have another request in flight). Returns the queued request, or raises a
        :class:`PlanError` or :class:`GatewayError` naming the problem. ``prepare``: what
        turns the body into a request (:meth:`prepare`; a session's,
        :func:`tpmlab.gateway.sessions.prepare_session`)."""
        self.deployed(model)
        self._take_slot(user)
        reserved = None
        try:
            blob = await read_body(self.limits_for(user).max_plan_bytes)
            req = await self._prepare_bounded(prepare or self.prepare, user, model, blob)
            reserved = req.id
            self.remote_values.reserve(req.id, user.id, req.remote_bytes, req.remote_values,
                                       self.limits_for(user))
            await self._hold(req)
        except BaseException as e:
            if reserved is not None:
                self.remote_values.unreserve(reserved)
            self._give_slot(user)
            if isinstance(e, GatewayError | PlanError):
                self.metrics.refused.labels(type(e).__name__).inc()
            raise
        self._enqueue(req)
        return req

    def prepare(self, user: UserView, model: str, blob: bytes) -> Request:
        """Decode, validate (with the tier's limits), check the tier, compute the hold.
        Raises a :class:`PlanError` or :class:`GatewayError` naming the problem."""
        dep = self.deployed(model)
        limits = self.limits_for(user)

        def check() -> tuple[Plan, Checked, Need]:
            plan = decode_plan(blob, max_bytes=limits.max_plan_bytes)
            if plan.model != model:
                raise BadRequestError(f"the plan is for model {plan.model!r} but was sent to "
                                      f"{model!r}")
            checked = check_plan(plan, dep.info, limits, dep.meta_modules.get)
            return plan, checked, required_tier(plan, checked.schedule, dep.paths)

        plan, checked, need = self.validated(user, check)
        self.check_tier(user, need, "this plan")
        return Request(id=uuid.uuid4().hex, user=user, model=model, mode=plan.mode, plan=plan,
                       blob=blob, digest=plan_digest(plan), tokens=plan_tokens(plan),
                       hold=self.worst_case(dep, plan, checked, limits),
                       mergeable=self.config.batching and checked.sized and can_merge(plan),
                       remote_bytes=checked.remote_bytes, remote_values=checked.remote_values)

    def validated(self, user: UserView, check: Callable[[], T]) -> T:
        """``check()``, which decodes and validates a body: a :class:`TpmlabError` it raises
        stands; anything else is the validator's own bug, answered as a bad request."""
        try:
            return check()
        except TpmlabError:
            raise
        except Exception as e:  # noqa: BLE001 - validation's own bug, triggered by this plan
            self.metrics.validation_bugs.inc()
            log.exception("validation raised %s on a plan of %s", type(e).__name__, user.name)
            raise BadRequestError(f"the plan could not be validated: {type(e).__name__}: "
                                  f"{str(e)[:300]}") from None

    @staticmethod
    def check_tier(user: UserView, need: Need, what: str) -> None:
        """Refuse (:class:`TierError`) what needs a higher tier than ``user``'s; ``what``
        names it in the message ("this plan")."""
        if not allows(user.tier, need.tier):
            raise TierError(f"{what} {need.reason}: that needs the {need.tier!r} tier, and "
                            f"your tier is {user.tier!r}", needed=need.tier, tier=user.tier)

    def worst_case(self, dep: Deployed, plan: Plan, checked: Checked, limits: Limits) -> Hold:
        """What ``plan`` (validated into ``checked`` under ``limits``) holds (:func:`hold`)."""
        cfg = self.config
        return hold(plan, dep.cost, cfg.pricing, saved_bytes=checked.saved_bytes,
                    sized=checked.sized, max_saved_bytes=limits.max_saved_bytes,
                    plan_compute_factor=cfg.plan_compute_factor)

    async def _prepare_bounded(self, prepare: Prepare, user: UserView, model: str,
                               blob: bytes) -> Request:
        cfg = self.config
        if self._validating >= cfg.validation_threads + cfg.max_validations_waiting:
            raise BusyError(f"the gateway is validating {self._validating} plans; try again "
                            "in a moment", retry_after=1)
        loop = asyncio.get_running_loop()
        self._validating += 1
        # counted until the thread is done with it, even if its client has gone meanwhile
        work = self._validators.submit(prepare, user, model, blob)
        work.add_done_callback(lambda _: _call_soon(loop, self._validated))
        return await asyncio.wrap_future(work)

    def _validated(self) -> None:
        self._validating -= 1

    async def _hold(self, req: Request) -> None:
        try:
            got = await run_in_threadpool(
                self.ledger.reserve, req.user.id, req.id, req.hold.units,
                gateway=self.instance, lease=self.config.hold_lease_seconds)
        except SQLAlchemyError as e:
            raise UpstreamError(f"the ledger database cannot be reached: "
                                f"{type(e).__name__}") from None
        if not got.admitted:
            h = req.hold
            saves = f"{h.saved_bytes:,} bytes" + ("" if h.sized else
                                                  " (your tier's limit: validation cannot size "
                                                  "every save of this plan)")
            raise QuotaError(
                f"this request holds {h.units:.3f} service units until it ends (at most "
                f"{h.forward_seconds + h.plan_seconds:.3f} s of compute and {saves}), and your "
                f"available balance is {got.available:.3f} (balance {got.balance:.3f}, "
                f"{got.held:.3f} held by requests in flight); ask an administrator for a "
                "larger allocation", estimate=h.units, balance=got.balance, held=got.held)
        req.held = True

    def _take_slot(self, user: UserView) -> None:
        n = self._inflight.get(user.id, 0)
        if n >= self.config.max_concurrent_per_user:
            raise RateLimitError(f"you have {n} requests in flight, the limit is "
                                 f"{self.config.max_concurrent_per_user}; wait for one to finish")
        self._inflight[user.id] = n + 1

    def _give_slot(self, user: UserView) -> None:
        n = self._inflight.get(user.id, 1) - 1
        if n > 0:
            self._inflight[user.id] = n
        else:
            self._inflight.pop(user.id, None)

    def _enqueue(self, req: Request) -> None:
        req.future = asyncio.get_running_loop().create_future()
        self._start_housekeeping()
        self.records.add(req)
        self._queued[req.model] += 1
        self._queue(req.model).put_nowait(req)
        self._set_depth(req.model)

    async def wait(self, req: Request, timeout: float | None = None) -> bytes:
        timeout = min(timeout or self.config.request_timeout, self.config.request_timeout)
        req.readers += 1
        try:
            try:
                await asyncio.wait_for(asyncio.shield(req.future), timeout)
            except asyncio.TimeoutError:
                if req.state == "queued":
                    self._end(req, "cancelled", GatewayTimeoutError("timed out in the queue"))
                raise GatewayTimeoutError(
                    f"request {req.id} did not finish within {timeout:g} s"
                    + ("" if req.state == "cancelled" else "; it is still running, fetch its "
                       f"result later at /v1/requests/{req.id}/result"),
                    request_id=req.id) from None
            if req.error is not None:
                raise req.error
            if req.result is None:
                raise ResultGoneError(f"the result of request {req.id} is no longer kept "
                                      "(results are kept for a while, within a per-user "
                                      "budget of bytes)")
            return req.result
        finally:
            req.readers -= 1

    def owned(self, user: UserView, request_id: str) -> Request:
        """A request of this user; another user's request is reported as not existing."""
        req = self.records.get(request_id)
        if req is None or req.user.id != user.id:
            raise NotFoundError(f"no request {request_id!r}")
        return req

    def cancel(self, user: UserView, request_id: str) -> Request:
        req = self.owned(user, request_id)
        if req.state != "queued":
            raise ConflictError(f"request {request_id} is {req.state}; only queued requests "
                                "can be cancelled")
        self._end(req, "cancelled", ConflictError(f"request {request_id} was cancelled by its "
                                                  "owner"))
        return req

    def queue_depth(self) -> dict[str, int]:
        return {m: self._queued[m] for m in self.models}

    # -- the worker per model ---------------------------------------------------------------------
    def _queue(self, model: str) -> asyncio.Queue:
        if model not in self._queues:
            self._queues[model] = asyncio.Queue()
            self._pending[model] = deque()
            self._workers[model] = asyncio.get_running_loop().create_task(self._worker(model))
        return self._queues[model]

    async def _next(self, model: str, timeout: float | None) -> Request | None:
        pending = self._pending[model]
        if pending:
            return pending.popleft()
        queue = self._queues[model]
        if timeout is None:
            return await queue.get()
        if timeout <= 0:
            return queue.get_nowait() if not queue.empty() else None
        try:
            return await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def _batch_budget(self) -> MergeBudget:
        cfg = self.config
        return MergeBudget(cfg.max_batch_requests, cfg.max_batch_rows, cfg.max_batch_cells,
                           cfg.min_batch_fill)

    async def _worker(self, model: str) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        while True:
            first = await self._next(model, None)
            if first.state != "queued":
                continue
            batch = [first]
            if first.mergeable:
                key = merge_key(first.plan)
                taken = self._batch_budget().group(row_lengths(first.plan))
                skipped = []
                deadline = first.created + cfg.batch_window
                while len(batch) < cfg.max_batch_requests:
                    item = await self._next(model, deadline - time.monotonic())
                    if item is None:
                        break
                    if item.state != "queued":
                        continue
                    if (item.mergeable and merge_key(item.plan) == key
                            and taken.add(row_lengths(item.plan))):
                        batch.append(item)
                    else:
                        skipped.append(item)
                        if len(skipped) > 4 * cfg.max_batch_requests:
                            break
                self._pending[model].extend(skipped)
            for req in batch:
                req.state = "running"
                req.batch_size = len(batch)
                self._queued[model] -= 1
            self._set_depth(model)
            self.metrics.batch_size.labels(model).observe(len(batch))
            try:
                outs = await loop.run_in_executor(self._engines[model], self._run_batch, model,
                                                  batch)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                outs = [e] * len(batch)
            loop.run_in_executor(self._post, self._finish_all, batch, outs, loop)

    def _run_values(self, model: str, blob: bytes, limits: Limits | None, *,
                    session: bool = False) -> Any:
        """Run a plan on the engine under ``limits`` (the engine's own where None): its values
        and metadata; a session's (``session``), each trace's, in order."""
        timeout = self.config.request_timeout
        run = self.backend.run_session_values if session else self.backend.run_values
        try:
            return run(model, blob, timeout=timeout, limits=limits)
        except WeightsChangedError:
            self.metrics.weight_restores.labels(model).inc()
            raise

    def _run_one(self, model: str, req: Request) -> list[_Ran] | Exception:
        try:
            got = self._run_values(model, req.blob, self.engine_limits(req.user),
                                   session=req.session)
        except Exception as e:  # noqa: BLE001 - reported to the request's owner
            return e
        return [_Ran(values, meta, {n.id: n.id for n in plan.nodes})
                for plan, (values, meta) in zip(req.traces(), got if req.session else [got])]

    def _run_batch(self, model: str, batch: list[Request]) -> list[list[_Ran] | Exception]:
        if len(batch) == 1:
            return [self._run_one(model, batch[0])]
        try:
            merged, mapping = merge_plans([r.plan for r in batch])
            limits = merged_limits([self.engine_limits(r.user) for r in batch])
            values, meta = self._run_values(model, encode_plan(merged), limits)
        except Exception:  # noqa: BLE001 - run each alone: one bad plan fails only itself
            for req in batch:
                req.batch_size = 1
            return [self._run_one(model, r) for r in batch]
        return [[_Ran(part, meta, ids)]
                for part, ids in zip(split_values(values, mapping), mapping.ids)]

    def _finish_all(self, batch: list[Request], outs: list[list[_Ran] | Exception],
                    loop: asyncio.AbstractEventLoop) -> None:
        """Charge each request what it used (at most its hold) and encode its result, then
        settle the holds in one transaction (in the post thread, while the engine goes on)."""
        charges, done = [], []
        for req, out in zip(batch, outs):
            if isinstance(out, Exception):
                req.error = as_gateway_error(out)
                continue
            try:
                self._keep_remote(req, out)
                row = self._charge(req, out)
                req.units = from_micro(min(to_micro(row["units"]), to_micro(req.hold.units)))
                req.result = self._encode(req, out)
                charges.append(row)
                done.append((req, out))
            except Exception as e:  # noqa: BLE001 - reported to the request's owner
                req.error, req.result = as_gateway_error(e), None
        for req, out in done:
            self._learn(req, out)
        for req in batch:
            req.drop_plan()  # it has run: its constants are not needed any more
            if req.error is not None:  # what it reserved or kept on the engine goes
                self.remote_values.drop_request(req.id)
        try:
            charged = self.ledger.settle(charges) if charges else {}
            failed = [r.id for r in batch if r.error is not None and r.held]
            if failed:
                self.ledger.release(failed)
        except Exception as e:  # noqa: BLE001 - no charge; the holds expire unrenewed
            log.exception("could not record charges")
            for req, _ in done:
                req.error = UpstreamError(f"could not record the charge: {type(e).__name__}")
                req.result = None
                self.remote_values.drop_request(req.id)
            done = []
        for req, out in done:
            if charged[req.id] != req.units:  # the hold had expired: charged what was free
                req.units = charged[req.id]
                req.result = self._encode(req, out)
        loop.call_soon_threadsafe(self._complete, batch)

    def _keep_remote(self, req: Request, outs: list[_Ran]) -> None:
        """Keep the request's remote values under its user's handles; the result carries
        their descriptions (:mod:`.remote_values`)."""
        if req.remote_values:
            version = str(outs[0].meta.get("model_version", ""))
            kept = self.remote_values.keep(req, [out.values for out in outs], version)
            for out, (values, ids) in zip(outs, kept):
                out.values, out.meta = values, dict(out.meta, remote_saves=ids)

    def _encode(self, req: Request, outs: list[_Ran]) -> bytes:
        """The result bytes of ``req``; a session's: each trace's, in one envelope, each with
        the request's id and the charge of the whole session."""
        blobs = []
        for out in outs:
            meta = dict(out.meta, request_id=req.id, batch_size=req.batch_size, **req.cost,
                        charged_units=req.units)
            if not req.session:  # a merged run's digest is not the user's plan's
                meta["plan_digest"] = req.digest
            meta.pop("node_seconds", None)  # of the whole run: other users' nodes too
            blobs.append(encode_result(out.values, meta))
        return encode_session_result(blobs) if req.session else blobs[0]

    def _charge(self, req: Request, outs: list[_Ran]) -> dict[str, Any]:
        """What ``req`` used (see :mod:`.units`), as a charge row for the ledger: a
        session's is the sum over its traces, charged once."""
        dep = self.models[req.model]
        nbytes, forward, own, measured = 0, 0.0, 0.0, 0.0
        for plan, out in zip(req.traces(), outs):
            nbytes += sum(saved_nbytes(v) for v in out.values.values())
            forward += dep.cost.forward_seconds(plan_tokens(plan), plan_rows(plan),
                                                steps_run(plan, out.values))
            # the plan's own nodes and, for a backward (never merged), its measured seconds
            own += own_node_seconds(out.meta.get("node_seconds"), out.ids) \
                + float(out.meta.get("backward_seconds", 0.0))
            measured += float(out.meta.get("compute_seconds", 0.0))
        units = self.config.pricing.units(forward + own, nbytes)
        req.cost = {"measured_seconds": measured, "forward_seconds": forward,
                    "plan_seconds": own, "charged_seconds": forward + own,
                    "held_units": from_micro(to_micro(req.hold.units))}
        if units > req.hold.units:
            self.metrics.uncharged.labels(req.model).inc(units - req.hold.units)
        return {"request_id": req.id, "user_id": req.user.id, "model": req.model,
                "model_version": str(outs[0].meta.get("model_version", "")),
                "plan_digest": req.digest, "mode": req.mode, "tokens": req.tokens,
                "bytes_returned": nbytes, "compute_seconds": forward + own,
                "measured_seconds": measured, "batch_size": req.batch_size, "units": units}

    def _learn(self, req: Request, outs: list[_Ran]) -> None:
        """Teach the model's cost model (:class:`~.units.LearnedCost`) what ``req``'s forward
        passes took, if it ran alone: the engine's compute seconds less its plan's own nodes
        and backward, against the calibrated fit's prediction for its tokens, rows and steps
        (a session's traces added up). A merged run's seconds are the batch's, and a stopped
        plan's (``tracer.stop()``) are of part of a pass: neither is used."""
        if req.batch_size != 1 or any(plan.stop for plan in req.traces()):
            return  # tracer.stop(): its pass ended early, faster than any whole pass
        learned = self.models[req.model].learned
        try:
            predicted, measured = 0.0, 0.0
            for plan, out in zip(req.traces(), outs):
                predicted += learned.fit.forward_seconds(plan_tokens(plan), plan_rows(plan),
                                                         steps_run(plan, out.values))
                measured += float(out.meta.get("compute_seconds", 0.0)) \
                    - own_node_seconds(out.meta.get("node_seconds"), out.ids) \
                    - float(out.meta.get("backward_seconds", 0.0))
            if learned.observe(predicted, measured):
                self.metrics.cost_scale.labels(req.model).set(learned.scale)
        except Exception:  # noqa: BLE001 - the request is answered all the same
            log.exception("could not learn from request %s", req.id)

    def _complete(self, batch: list[Request]) -> None:
        for req in batch:
            if req.error is None:
                self.metrics.units.labels(req.model).inc(req.units)
            self._end(req, "failed" if req.error is not None else "done", req.error)

    def _end(self, req: Request, state: str, error: Exception | None) -> None:
        """``req`` is finished (on the event loop): give back its slot, wake its waiters,
        keep it within its user's bounds. A cancelled request's hold is released here."""
        if req.state in FINISHED:
            return
        was_queued = req.state == "queued"
        req.state, req.finished = state, time.monotonic()
        self._give_slot(req.user)
        if was_queued:
            self._queued[req.model] -= 1
        if state == "cancelled":
            req.error = error
            self.remote_values.unreserve(req.id)
            if req.held:
                asyncio.get_running_loop().run_in_executor(self._post, self._release_quietly,
                                                           [req.id])
        outcome = state if state != "failed" else type(req.error).__name__
        self.metrics.latency.labels(req.model, state).observe(req.finished - req.created)
        self.metrics.requests.labels(req.model, outcome).inc()
        if req.future is not None and not req.future.done():
            req.future.set_result(None)
        self.records.finished(req)
        self._set_depth(req.model)

    def _release_quietly(self, ids: list[str]) -> None:
        try:
            self.ledger.release(ids)
        except Exception:  # noqa: BLE001 - not renewed, the holds expire by themselves
            log.exception("could not release holds %s", ids)

    def _set_depth(self, model: str) -> None:
        self.metrics.queue_depth.labels(model).set(self._queued[model])

    # -- holds of requests in flight --------------------------------------------------------------
    async def start(self) -> None:
        """Start renewing this gateway's holds and expiring those of stopped gateways (the
        app calls it at startup; admission starts it too)."""
        self._start_housekeeping()

    def _start_housekeeping(self) -> None:
        if self._housekeeping is None or self._housekeeping.done():
            self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())

    async def _housekeep(self) -> None:
        """Every quarter of the lease: renew this gateway's holds, release those of gateways
        that stopped renewing, forget finished requests past their time."""
        lease = self.config.hold_lease_seconds
        while True:
            live = [r.id for r in self.records.in_flight() if r.held]
            live += self.remote_values.reads()  # reads of remote values running now
            try:
                await run_in_threadpool(self.ledger.renew, self.instance, live, lease)
                await run_in_threadpool(self.ledger.expire)
            except Exception:  # noqa: BLE001 - try again at the next round
                log.exception("could not renew or expire holds")
            self.records.prune()  # every user's finished requests past their time
            await run_in_threadpool(self.remote_values.expire)  # remote values past theirs
            await asyncio.sleep(lease / 4)

    async def close(self) -> None:
        tasks = [*self._workers.values(), *([self._housekeeping] if self._housekeeping else [])]
        for task in tasks:
            task.cancel()
        for ex in self._engines.values():
            ex.shutdown(wait=False, cancel_futures=True)
        self._validators.shutdown(wait=False, cancel_futures=True)
        self._post.shutdown(wait=False)
        try:  # what users kept on the engine goes with the gateway
            await run_in_threadpool(self.remote_values.close)
        except Exception:  # noqa: BLE001 - the engine frees them when it closes
            log.exception("could not release the remote values kept here")
        try:  # requests still queued here will not run: give their holds back
            await run_in_threadpool(self.ledger.release_gateway, self.instance)
        except Exception:  # noqa: BLE001 - they expire by themselves
            log.exception("could not release this gateway's holds")


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop has closed: the gateway is gone
        pass


