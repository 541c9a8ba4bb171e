"""The gateway's engine side: admission (validate, tier, quota), cross-user batching,
charging. No HTTP here (see :mod:`tpmlab.gateway.app`).

A request's life: :meth:`Gateway.prepare` decodes and validates the plan with the
user's tier limits, decides the tier it needs and estimates its cost (in a worker
thread); :meth:`Gateway.submit` checks the user's concurrency and balance and queues
it; one worker task per model takes queued requests and, when batching is on, runs
the traces that arrived within ``batch_window`` seconds of the first (same model
version and input kind, up to ``max_batch_requests`` and ``max_batch_rows``) as one
merged plan (:mod:`tpmlab.ir.merge`), each on its own rows. If a merged run fails,
each request of it runs again alone, so one bad plan never fails another user's.
Results are split per request, re-encoded with the request's own plan digest and
charged (:mod:`tpmlab.gateway.units`) in a second thread while the engine goes on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..errors import ExecutionError, LimitError, PlanError, RequestTimeoutError
from ..ir.codec import decode_plan, decode_result, encode_plan, encode_result
from ..ir.merge import can_merge, merge_key, merge_plans, split_values
from ..ir.model_info import ModelInfo
from ..ir.plan import Plan
from ..ir.validate import Limits
from ..runtime.engine import plan_digest
from .errors import (
    BadRequestError,
    ConflictError,
    GatewayError,
    GatewayTimeoutError,
    NotFoundError,
    QuotaError,
    RateLimitError,
    TierError,
)
from .ledger import Ledger, UserView
from .tiers import TIER_LIMITS, OutputPaths, allows, required_tier
from .units import CostModel, Pricing, calibrate, plan_rows, plan_tokens, saved_nbytes


@dataclass
class GatewayConfig:
    """What a gateway serves and how. Times in seconds, sizes in bytes."""

    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    batching: bool = True
    batch_window: float = 0.010
    max_batch_requests: int = 32
    max_batch_rows: int = 64
    max_body_bytes: int = 64 * 2**20
    max_concurrent_per_user: int = 8
    request_timeout: float = 300.0
    keep_results_seconds: float = 600.0
    pricing: Pricing = field(default_factory=Pricing)
    cost_models: dict[str, CostModel] = field(default_factory=dict)  # else calibrated at start
    tier_limits: dict[str, Limits] = field(default_factory=lambda: dict(TIER_LIMITS))


class Metrics:
    """Prometheus metrics of one gateway (its own registry, so several can coexist)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "tpmlab_gateway_request_seconds", "Time from a plan's arrival to its answer",
            ["model", "outcome"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.queue_depth = Gauge("tpmlab_gateway_queue_depth", "Requests waiting for the engine",
                                 ["model"], registry=self.registry)
        self.units = Counter("tpmlab_gateway_service_units", "Service units charged",
                             ["model"], registry=self.registry)
        self.requests = Counter("tpmlab_gateway_requests", "Requests answered, by outcome",
                                ["model", "outcome"], registry=self.registry)
        self.batch_size = Histogram("tpmlab_gateway_batch_size", "Requests per forward pass",
                                    ["model"], registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))


@dataclass
class Request:
    id: str
    user: UserView
    model: str
    plan: Plan
    blob: bytes
    digest: str
    tokens: int
    estimate: float
    mergeable: bool
    created: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued | running | done | failed | cancelled
    finished: float | None = None
    result: bytes | None = None
    error: Exception | None = None
    units: float = 0.0
    batch_size: int = 0
    future: asyncio.Future | None = None

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "model": self.model, "state": self.state,
                               "mode": self.plan.mode, "tokens": self.tokens,
                               "estimated_units": round(self.estimate, 6),
                               "units": round(self.units, 6), "batch_size": self.batch_size}
        if self.error is not None:
            out["error"] = type(self.error).__name__
            out["message"] = str(self.error)
        return out


@dataclass
class Deployed:
    info: ModelInfo
    paths: OutputPaths
    meta_modules: dict[str, Any]
    cost: CostModel


class Gateway:
    """Admission, batching and charging in front of any :class:`~tpmlab.runtime.backend.Backend`."""

    def __init__(self, backend: Any, ledger: Ledger, config: GatewayConfig | None = None) -> None:
        from ..models import resolve

        self.backend = backend
        self.ledger = ledger
        self.config = config or GatewayConfig()
        self.metrics = Metrics()
        self.models: dict[str, Deployed] = {}
        for name in self.config.models:
            info = backend.deploy(name)
            source = resolve(name)
            adapter = source.adapter
            paths = OutputPaths(logits=frozenset({"", adapter.unembed}),
                                final_hidden=frozenset({adapter.final_norm}))
            cost = self.config.cost_models.get(name) or calibrate(
                lambda blob, name=name: self._run_values(name, blob)[1]["compute_seconds"], info)
            self.models[name] = Deployed(info, paths, dict(source.meta_model().named_modules()),
                                         cost)
        self.requests: dict[str, Request] = {}
        self._inflight: dict[int, int] = {}
        self._reserved: dict[int, float] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: dict[str, deque] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._engines = {name: ThreadPoolExecutor(1, thread_name_prefix=f"engine-{name}")
                         for name in self.models}
        self._post = ThreadPoolExecutor(2, thread_name_prefix="gateway-post")

    # -- admission --------------------------------------------------------------------------------
    def deployed(self, model: str) -> Deployed:
        if model not in self.models:
            raise NotFoundError(f"model {model!r} is not served here; served: {sorted(self.models)}")
        return self.models[model]

    def prepare(self, user: UserView, model: str, blob: bytes) -> Request:
        """Decode, validate (with the tier's limits), check the tier, estimate the cost.
        Raises a :class:`PlanError` or :class:`GatewayError` naming the problem."""
        dep = self.deployed(model)
        limits = self.config.tier_limits.get(user.tier) or TIER_LIMITS["query"]
        plan = decode_plan(blob, max_bytes=limits.max_constant_bytes + 2**20)
        if plan.model != model:
            raise BadRequestError(f"the plan is for model {plan.model!r} but was sent to {model!r}")
        schedule, saved = _validate(plan, dep, limits)
        need = required_tier(plan, schedule, dep.paths)
        if not allows(user.tier, need.tier):
            raise TierError(f"this plan {need.reason}: that needs the {need.tier!r} tier, and "
                            f"your tier is {user.tier!r}", needed=need.tier, tier=user.tier)
        tokens = plan_tokens(plan)
        passing = tokens
        if plan.mode == "generate" and plan.generate is not None:
            passing += plan_rows(plan) * plan.generate.max_new_tokens
            saved += plan_rows(plan) * plan.generate.max_new_tokens * 8
        estimate = self.config.pricing.units(dep.cost.seconds(passing), saved)
        return Request(id=uuid.uuid4().hex, user=user, model=model, plan=plan, blob=blob,
                       digest=plan_digest(plan), tokens=tokens, estimate=estimate,
                       mergeable=self.config.batching and can_merge(plan))

    async def submit(self, req: Request) -> Request:
        uid = req.user.id
        if self._inflight.get(uid, 0) >= self.config.max_concurrent_per_user:
            raise RateLimitError(f"you have {self._inflight[uid]} requests in flight, the limit "
                                 f"is {self.config.max_concurrent_per_user}; wait for one to finish")
        from starlette.concurrency import run_in_threadpool

        balance = await run_in_threadpool(self.ledger.balance, req.user.name)
        free = balance - self._reserved.get(uid, 0.0)
        if req.estimate > free:
            raise QuotaError(f"this request is estimated at {req.estimate:.3f} service units and "
                             f"your available balance is {free:.3f} (balance {balance:.3f}, "
                             f"{self._reserved.get(uid, 0.0):.3f} held by requests in flight); "
                             "ask an administrator for a larger allocation",
                             estimate=req.estimate, balance=balance)
        if self._inflight.get(uid, 0) >= self.config.max_concurrent_per_user:  # raced meanwhile
            raise RateLimitError("too many requests in flight")
        self._inflight[uid] = self._inflight.get(uid, 0) + 1
        self._reserved[uid] = self._reserved.get(uid, 0.0) + req.estimate
        loop = asyncio.get_running_loop()
        req.future = loop.create_future()
        self._prune()
        self.requests[req.id] = req
        self._queue(req.model).put_nowait(req)
        self._set_depth(req.model)
        return req

    async def wait(self, req: Request, timeout: float | None = None) -> bytes:
        timeout = min(timeout or self.config.request_timeout, self.config.request_timeout)
        try:
            await asyncio.wait_for(asyncio.shield(req.future), timeout)
        except asyncio.TimeoutError:
            if req.state == "queued":
                self._release(req, "cancelled", GatewayTimeoutError("timed out in the queue"))
            raise GatewayTimeoutError(
                f"request {req.id} did not finish within {timeout:g} s"
                + ("" if req.state == "cancelled" else "; it is still running, fetch its result "
                   f"later at /v1/requests/{req.id}/result"), request_id=req.id) from None
        if req.error is not None:
            raise req.error
        return req.result

    def owned(self, user: UserView, request_id: str) -> Request:
        """A request of this user; another user's request is reported as not existing."""
        req = self.requests.get(request_id)
        if req is None or req.user.id != user.id:
            raise NotFoundError(f"no request {request_id!r}")
        return req

    def cancel(self, user: UserView, request_id: str) -> Request:
        req = self.owned(user, request_id)
        if req.state != "queued":
            raise ConflictError(f"request {request_id} is {req.state}; only queued requests "
                                "can be cancelled")
        self._release(req, "cancelled", ConflictError(f"request {request_id} was cancelled by its owner"))
        return req

    def queue_depth(self) -> dict[str, int]:
        return {m: sum(1 for r in self.requests.values() if r.model == m and r.state == "queued")
                for m in self.models}

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

    async def _worker(self, model: str) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        while True:
            first = await self._next(model, None)
            if first.state != "queued":
                continue
            batch = [first]
            if first.mergeable:
                key, rows = merge_key(first.plan), plan_rows(first.plan)
                skipped = []
                deadline = first.created + cfg.batch_window
                while len(batch) < cfg.max_batch_requests:
                    item = await self._next(model, deadline - time.monotonic())
                    if item is None:
                        break
                    if item.state != "queued":
                        continue
                    if (item.mergeable and merge_key(item.plan) == key
                            and rows + plan_rows(item.plan) <= cfg.max_batch_rows):
                        batch.append(item)
                        rows += plan_rows(item.plan)
                    else:
                        skipped.append(item)
                        if len(skipped) > 4 * cfg.max_batch_requests:
                            break
                self._pending[model].extend(skipped)
            for req in batch:
                req.state = "running"
                req.batch_size = len(batch)
            self._set_depth(model)
            self.metrics.batch_size.labels(model).observe(len(batch))
            try:
                outs = await loop.run_in_executor(self._engines[model], self._run_batch, model,
                                                  batch)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                outs = [e] * len(batch)
            loop.run_in_executor(self._post, self._finish_all, batch, outs, loop)

    def _run_values(self, model: str, blob: bytes) -> tuple[dict[int, Any], dict[str, Any]]:
        fast = getattr(self.backend, "run_values", None)
        if fast is not None:
            return fast(model, blob, timeout=self.config.request_timeout)
        return decode_result(self.backend.run(model, blob, timeout=self.config.request_timeout))

    def _run_one(self, model: str, req: Request) -> Any:
        try:
            return self._run_values(model, req.blob)
        except Exception as e:  # noqa: BLE001 - reported to the request's owner
            return e

    def _run_batch(self, model: str, batch: list[Request]) -> list[Any]:
        if len(batch) == 1:
            return [self._run_one(model, batch[0])]
        try:
            merged, mapping = merge_plans([r.plan for r in batch])
            values, meta = self._run_values(model, encode_plan(merged))
        except Exception:  # noqa: BLE001 - run each alone: one bad plan fails only itself
            for req in batch:
                req.batch_size = 1
            return [self._run_one(model, r) for r in batch]
        return [(part, meta) for part in split_values(values, mapping)]

    def _finish_all(self, batch: list[Request], outs: list[Any],
                    loop: asyncio.AbstractEventLoop) -> None:
        charges = []
        for req, out in zip(batch, outs):
            try:
                charges.extend(self._finish(req, out))
            except Exception as e:  # noqa: BLE001
                req.error, req.result = _as_error(e), None
        try:
            self.ledger.record_charges(charges)
        except Exception as e:  # noqa: BLE001 - never lose the answer over the ledger
            for req in batch:
                if req.error is None:
                    req.error = GatewayError(f"could not record the charge: {e}")
        loop.call_soon_threadsafe(self._complete, batch)

    def _finish(self, req: Request, out: Any) -> list[dict]:
        if isinstance(out, Exception):
            req.error = _as_error(out)
            return []
        values, meta = out
        dep = self.models[req.model]
        nbytes = sum(saved_nbytes(v) for v in values.values())
        measured = float(meta.get("compute_seconds", 0.0))
        seconds = dep.cost.seconds(req.tokens) if req.plan.mode == "trace" else measured
        req.units = self.config.pricing.units(seconds, nbytes)
        meta = dict(meta, plan_digest=req.digest, request_id=req.id, batch_size=req.batch_size,
                    measured_seconds=measured, charged_seconds=seconds,
                    charged_units=req.units)
        req.result = encode_result(values, meta)
        return [{"request_id": req.id, "user_id": req.user.id, "model": req.model,
                 "model_version": str(meta.get("model_version", "")), "plan_digest": req.digest,
                 "mode": req.plan.mode, "tokens": req.tokens, "bytes_returned": nbytes,
                 "compute_seconds": seconds, "measured_seconds": measured,
                 "batch_size": req.batch_size, "units": req.units}]

    def _complete(self, batch: list[Request]) -> None:
        for req in batch:
            if req.error is None:
                self.metrics.units.labels(req.model).inc(req.units)
            self._release(req, "failed" if req.error is not None else "done", req.error)

    def _release(self, req: Request, state: str, error: Exception | None) -> None:
        if req.state in ("done", "failed", "cancelled"):
            return
        uid = req.user.id
        self._inflight[uid] = max(self._inflight.get(uid, 1) - 1, 0)
        self._reserved[uid] = max(self._reserved.get(uid, 0.0) - req.estimate, 0.0)
        req.state, req.finished = state, time.monotonic()
        if state == "cancelled":
            req.error = error
        outcome = state if state != "failed" else type(req.error).__name__
        self.metrics.latency.labels(req.model, state).observe(req.finished - req.created)
        self.metrics.requests.labels(req.model, outcome).inc()
        if req.future is not None and not req.future.done():
            req.future.set_result(None)
        self._set_depth(req.model)

    def _set_depth(self, model: str) -> None:
        self.metrics.queue_depth.labels(model).set(
            sum(1 for r in self.requests.values() if r.model == model and r.state == "queued"))

    def _prune(self) -> None:
        horizon = time.monotonic() - self.config.keep_results_seconds
        old = [k for k, r in self.requests.items() if r.finished is not None and r.finished < horizon]
        for k in old:
            del self.requests[k]

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        for ex in self._engines.values():
            ex.shutdown(wait=False, cancel_futures=True)
        self._post.shutdown(wait=False, cancel_futures=True)


def _validate(plan: Plan, dep: Deployed, limits: Limits) -> tuple[Any, int]:
    """:func:`tpmlab.ir.validate.validate`, also returning the bytes the plan saves."""
    from ..ir.validate import inspect_plan

    schedule, saved = inspect_plan(plan, dep.info, limits=limits, meta_module=dep.meta_modules.get)
    if saved > limits.max_saved_bytes:
        raise LimitError(f"the plan saves {saved:,} bytes, over your tier's limit of "
                         f"{limits.max_saved_bytes:,} bytes")
    return schedule, saved


def _as_error(e: Exception) -> Exception:
    if isinstance(e, (PlanError, ExecutionError, GatewayError, RequestTimeoutError)):
        return e
    if isinstance(e, LookupError):
        return NotFoundError(str(e))
    return ExecutionError(f"the engine failed: {type(e).__name__}: {e}")
