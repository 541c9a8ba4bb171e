"""Remote values behind the gateway: what a user's remote saves (``.save(remote=True)``)
keep on the engine, behind handles only that user can use.

A request whose plan keeps remote values reserves what they take (:meth:`RemoteValueTable.reserve`,
at admission, before it runs): the bytes validation sized (with the user's whole remaining
allowance when it cannot size them) and the number of values, against the user's tier
limits ``max_remote_bytes`` and ``max_remote_values`` (:mod:`.tiers`) less what the user
holds and has reserved already; past them the request is refused with
:class:`~tpmlab.cluster.errors.RemoteLimitError` (413). When it has run, each
:class:`~tpmlab.remote.RemoteValue` the engine made (its tensor in process, a Dask future
on a stage's worker) is kept here under a new handle (``rv_`` and 32 random bytes, never the
engine's key) and its place in the result holds only a description: handle, shape, dtype,
bytes (:func:`describe`). A handle of another user answers exactly as an unknown one (404).

Reading a value runs the engine's own remote-value operations
(:meth:`RemoteValue.fetch` with a checked index, :meth:`RemoteValue.reduce` with one of
:data:`~tpmlab.remote.REDUCTIONS`), each priced like a run: it holds its worst case in the
ledger (the bytes it returns and ``value bytes / remote_bytes_per_second`` seconds of
compute, plus ``2 rows d² / remote_flops_per_second`` for ``gram``), then is charged the
seconds it took and the bytes it returned (ledger mode ``remote-fetch`` /
``remote-reduce``). What it returns is held to the tier's ``max_saved_bytes``.

Many values are read in one request (``POST /v1/remote-values/fetch`` and ``/reduce`` with
``"handles"``; :func:`tpmlab.remote.fetch_all`, :func:`tpmlab.remote.reduce_all`): one call of
the engine, priced once (the hold is the values' worst cases added up, the charge what the
whole read took and returned, one ledger row with ``batch_size`` the number of values).
Every handle must be the user's (else 404, and nothing is read or charged) and of one
model; at most ``GatewayConfig.max_read_values`` handles, and what it returns is held to
``max_saved_bytes`` in all (else :class:`~tpmlab.errors.RemoteReadLimitError`, 413).

A value is released when its owner releases it (one, or all of theirs), when it expires
(``GatewayConfig.remote_value_ttl`` seconds after its request finished; the gateway's
housekeeping sweeps), and when the gateway closes; releasing frees its accounting.

=======  ====================================  =================================================
GET      /v1/remote-values                     your values (handle, model, shape, dtype, bytes)
                                               and your limits
GET      /v1/remote-values/{handle}            one of them
POST     /v1/remote-values/{handle}/fetch      ``{"index": [...]}`` in (optional); the tensor out
POST     /v1/remote-values/{handle}/reduce     ``{"op", "dims", "keepdim", "dtype"}``; the result
POST     /v1/remote-values/fetch               ``{"handles": [...]}``: those whole values, in order
POST     /v1/remote-values/reduce              ``{"handles": [...], "op", ...}``: each one's result
DELETE   /v1/remote-values/{handle}            release one
DELETE   /v1/remote-values                     release all of yours (``?model=`` one model's)
=======  ====================================  =================================================

An index is a list with one item per leading dim: an int, or ``[start, stop, step]``
(``null`` for a bound left out). Results are ``application/octet-stream``
(:func:`tpmlab.ir.codec.encode_result`: the tensor as value ``0``).
"""

from __future__ import annotations

import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from ..cluster.errors import RemoteLimitError
from ..errors import LimitError, RemoteReadLimitError, TpmlabError
from ..ir.codec import encode_result
from ..ir.validate import Limits
from ..remote import (
    DESCRIPTION,
    RemoteValue,
    check_index,
    check_reduction,
    fetch_all,
    index_from_wire,
    reduce_all,
)
from .auth import User
from .errors import BadRequestError, NotFoundError, QuotaError, UpstreamError, as_gateway_error
from .ledger import UserView

if TYPE_CHECKING:
    from .core import Gateway
    from .records import Request as GatewayRequest

HANDLE_PREFIX = "rv_"
OCTET = "application/octet-stream"


@dataclass(eq=False)
class Held:
    """One value a user keeps: its handle, whose it is, what made it, when it expires."""

    handle: str
    user_id: int
    model: str
    model_version: str
    plan_digest: str
    request_id: str
    value: RemoteValue
    expires: float  # time.monotonic()

    def info(self) -> dict[str, Any]:
        v = self.value
        return {"handle": self.handle, "model": self.model, "shape": list(v.shape),
                "dtype": v.dtype, "nbytes": v.nbytes, "request_id": self.request_id,
                "expires_in": round(max(self.expires - time.monotonic(), 0.0), 3)}


@dataclass(frozen=True)
class Reservation:
    """What a request in flight will keep: for ``user_id``, ``nbytes`` and ``values``."""

    user_id: int
    nbytes: int
    values: int


def describe(held: Held) -> dict[str, Any]:
    """What stands for a kept value in its request's result (:func:`tpmlab.remote.described`
    reads it)."""
    return {DESCRIPTION: held.info()}


class RemoteValueTable:
    """Every user's kept values and the reservations of their requests in flight
    (thread-safe: admission on the event loop, results in the post thread, reads in
    worker threads)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._held: dict[str, Held] = {}
        self._reserved: dict[str, Reservation] = {}  # by request id
        self._reads: set[str] = set()  # ledger holds of reads running now

    # -- accounting -----------------------------------------------------------------------------
    def usage(self, user_id: int) -> tuple[int, int]:
        """Bytes and values ``user_id`` holds and has reserved."""
        with self._lock:
            return self._usage(user_id)

    def _usage(self, user_id: int) -> tuple[int, int]:
        held = [h.value.nbytes for h in self._held.values() if h.user_id == user_id]
        res = [r for r in self._reserved.values() if r.user_id == user_id]
        return (sum(held) + sum(r.nbytes for r in res),
                len(held) + sum(r.values for r in res))

    def reserve(self, request_id: str, user_id: int, nbytes: int | None, count: int,
                limits: Limits) -> None:
        """Reserve what a request's remote saves keep (``nbytes`` None: not sized, the
        user's whole remaining allowance), or raise :class:`RemoteLimitError`."""
        if count == 0:
            return
        with self._lock:
            used, values = self._usage(user_id)
            room = limits.max_remote_bytes - used
            if (nbytes is not None and nbytes > room) or room <= 0:
                raise RemoteLimitError(
                    f"remote saves: this request keeps {_bytes(nbytes)} and you hold "
                    f"{used:,} bytes of remote values already (held or reserved by requests "
                    f"in flight), of your tier's limit of {limits.max_remote_bytes:,} bytes "
                    "(max_remote_bytes): release values you no longer need "
                    "(RemoteValue.release(), lab.release_remote()) or reduce them first")
            if values + count > limits.max_remote_values:
                raise RemoteLimitError(
                    f"remote saves: this request keeps {count} values and you hold {values} "
                    f"already, of your tier's limit of {limits.max_remote_values} "
                    "(max_remote_values): release values you no longer need")
            self._reserved[request_id] = Reservation(user_id, room if nbytes is None else nbytes,
                                                     count)

    def unreserve(self, request_id: str) -> None:
        with self._lock:
            self._reserved.pop(request_id, None)

    def reads(self) -> list[str]:
        """The ledger holds of reads running now (the gateway renews them)."""
        with self._lock:
            return list(self._reads)

    def _reading(self, op_id: str, running: bool) -> None:
        with self._lock:
            (self._reads.add if running else self._reads.discard)(op_id)

    # -- keeping --------------------------------------------------------------------------------
    def keep(self, req: GatewayRequest, parts: list[dict[int, Any]], model_version: str
             ) -> list[tuple[dict[int, Any], list[int]]]:
        """Keep the :class:`RemoteValue` objects among a finished request's values (``parts``:
        its values by node, one dict per trace: one for a plan, one per trace of a session;
        a value per node, or a list per generation step) under new handles; per part, the
        values with each replaced by its description, and the node ids that held them. Past
        the reservation (a save validation could not size) nothing is kept:
        :class:`RemoteLimitError`."""
        found = [{k: v for k, v in values.items() if _remote_in(v)} for values in parts]
        kept = [x for part in found for v in part.values()
                for x in (v if isinstance(v, list) else [v])]
        with self._lock:
            got = self._reserved.pop(req.id, None)
            reserved = got.nbytes if got is not None else 0
            nbytes = sum(v.nbytes for v in kept)
            if nbytes > reserved:
                for v in kept:
                    v.release()
                raise RemoteLimitError(
                    f"remote saves: this request kept {nbytes:,} bytes, more than the "
                    f"{reserved:,} bytes left of your tier's max_remote_bytes; nothing was "
                    "kept: release values you no longer need or save less")
            expires = time.monotonic() + self.ttl

            def hold(v: RemoteValue) -> dict[str, Any]:
                held = Held(HANDLE_PREFIX + secrets.token_urlsafe(32), req.user.id, req.model,
                            model_version, req.digest, req.id, v, expires)
                self._held[held.handle] = held
                return describe(held)

            out = []
            for values, part in zip(parts, found):
                described = dict(values)
                for k, v in part.items():
                    described[k] = [hold(x) for x in v] if isinstance(v, list) else hold(v)
                out.append((described, sorted(part)))
        return out

    def drop_request(self, request_id: str) -> int:
        """Release what a request kept (its result could not be delivered)."""
        with self._lock:
            gone = [h for h in self._held.values() if h.request_id == request_id]
            self._reserved.pop(request_id, None)
        return self._release(gone)

    # -- a user's values ------------------------------------------------------------------------
    def owned(self, user_id: int, handle: str) -> Held:
        """One of ``user_id``'s values; another user's handle is answered as an unknown one."""
        with self._lock:
            held = self._held.get(handle)
        if held is None or held.user_id != user_id:
            raise NotFoundError(f"no remote value {handle[:80]!r} (released, expired, or "
                                "never yours)")
        return held

    def of(self, user_id: int, model: str | None = None) -> list[Held]:
        with self._lock:
            return [h for h in self._held.values()
                    if h.user_id == user_id and model in (None, h.model)]

    def release(self, user_id: int, handle: str) -> None:
        held = self.owned(user_id, handle)
        with self._lock:
            self._held.pop(held.handle, None)
        self._release([held])

    def release_all(self, user_id: int, model: str | None = None) -> int:
        return self._release(self._take(lambda h: h.user_id == user_id
                                        and model in (None, h.model)))

    def expire(self, now: float | None = None) -> int:
        """Release every value past its time; how many."""
        now = time.monotonic() if now is None else now
        return self._release(self._take(lambda h: h.expires <= now))

    def close(self) -> int:
        """Release everything (the gateway is closing)."""
        with self._lock:
            self._reserved.clear()
        return self._release(self._take(lambda h: True))

    def _take(self, which: Any) -> list[Held]:
        with self._lock:
            gone = [h for h in self._held.values() if which(h)]
            for h in gone:
                del self._held[h.handle]
        return gone

    @staticmethod
    def _release(gone: list[Held]) -> int:
        for held in gone:  # outside the lock: on a cluster this frees a Dask future
            held.value.release()
        return len(gone)


def _remote_in(value: Any) -> bool:
    return isinstance(value, RemoteValue) or (
        isinstance(value, list) and bool(value) and isinstance(value[0], RemoteValue))


def _bytes(nbytes: int | None) -> str:
    return "an amount of bytes known only once it runs" if nbytes is None else f"{nbytes:,} bytes"


# -- reads, priced ----------------------------------------------------------------------------------
def read(gateway: Gateway, user: UserView, helds: list[Held], kind: str, out_nbytes: int,
         extra_seconds: float, work: Any, *, many: bool = False
         ) -> tuple[list[Any], dict[str, Any]]:
    """Run ``work()`` (a read of the values of ``helds``, all of one model, returning a list
    of tensors of ``out_nbytes`` bytes in all) priced like a run, once for them all: refuse
    past the tier's ``max_saved_bytes``, hold the worst case in the ledger (else 402), run
    it, charge what it took. Returns the tensors and their metadata. ``many``: a read of
    several values (its errors say so: :class:`RemoteReadLimitError`)."""
    cfg = gateway.config
    limits = gateway.limits_for(user)
    if out_nbytes > limits.max_saved_bytes:
        error = RemoteReadLimitError if many else LimitError
        raise error(f"this {kind} returns {out_nbytes:,} bytes, over your tier's limit of "
                    f"{limits.max_saved_bytes:,} bytes (max_saved_bytes): "
                    + ("read fewer values at a time, " if len(helds) > 1 else "")
                    + "fetch a slice or reduce the value first")
    seconds = sum(h.value.nbytes for h in helds) / cfg.remote_bytes_per_second + extra_seconds
    worst = cfg.pricing.units(seconds, out_nbytes)
    op_id = uuid.uuid4().hex
    table = gateway.remote_values
    try:
        got = gateway.ledger.reserve(user.id, op_id, worst, gateway=gateway.instance,
                                     lease=cfg.hold_lease_seconds)
    except SQLAlchemyError as e:
        raise UpstreamError(f"the ledger database cannot be reached: {type(e).__name__}") \
            from None
    if not got.admitted:
        raise QuotaError(f"this {kind} holds {worst:.3f} service units until it ends, and your "
                         f"available balance is {got.available:.3f}; ask an administrator for a "
                         "larger allocation", estimate=worst, balance=got.balance, held=got.held)
    first = helds[0]
    digest = first.plan_digest if all(h.plan_digest == first.plan_digest for h in helds) \
        else ""  # values of several plans
    table._reading(op_id, True)
    try:
        start = time.perf_counter()
        try:
            tensors = work()
        except Exception:
            gateway.ledger.release([op_id])
            raise
        took = time.perf_counter() - start
        returned = sum(t.numel() * t.element_size() for t in tensors)
        try:
            charged = gateway.ledger.settle([{
                "request_id": op_id, "user_id": user.id, "model": first.model,
                "model_version": first.model_version, "plan_digest": digest,
                "mode": f"remote-{kind}", "tokens": 0, "bytes_returned": returned,
                "compute_seconds": took, "measured_seconds": took, "batch_size": len(helds),
                "units": cfg.pricing.units(took, returned)}])[op_id]
        except SQLAlchemyError as e:  # not charged: not delivered (the hold expires)
            raise UpstreamError(f"could not record the charge: {type(e).__name__}") from None
    finally:
        table._reading(op_id, False)
    meta = {"request_id": op_id, "charged_units": charged, "compute_seconds": took,
            "model_version": first.model_version, "plan_digest": digest, "held_units": worst}
    meta.update({"handles": [h.handle for h in helds]} if many else {"handle": first.handle})
    return tensors, meta


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _gram_flops(v: RemoteValue, op: str) -> float:
    return 2.0 * math.prod(v.shape[:-1]) * v.shape[-1] ** 2 if op == "gram" else 0.0


def fetch(gateway: Gateway, user: UserView, handle: str, index: list[Any] | None
          ) -> tuple[Any, dict[str, Any]]:
    """The value of ``handle`` (or the part ``index`` selects), priced."""
    held = gateway.remote_values.owned(user.id, handle)
    v = held.value
    idx, shape = check_index(v.shape, index_from_wire(index)) if index else ((), v.shape)
    tensors, meta = read(gateway, user, [held], "fetch", _nbytes(shape, v.dtype), 0.0,
                         lambda: [v.fetch(idx if idx else None)])
    return tensors[0], meta


def reduce(gateway: Gateway, user: UserView, handle: str, op: str, dims: Any, keepdim: bool,
           dtype: str | None) -> tuple[Any, dict[str, Any]]:
    """A whitelisted reduction of the value of ``handle`` on the engine, priced."""
    held = gateway.remote_values.owned(user.id, handle)
    v = held.value
    _, shape = check_reduction(v.shape, op, dims, keepdim, dtype)
    tensors, meta = read(gateway, user, [held], "reduce", _nbytes(shape, dtype or v.dtype),
                         _gram_flops(v, op) / gateway.config.remote_flops_per_second,
                         lambda: [v.reduce(op, dims, keepdim=keepdim, dtype=dtype)])
    return tensors[0], meta


def owned_all(gateway: Gateway, user: UserView, handles: list[str]) -> list[Held]:
    """The values of ``handles``, every one ``user``'s and of one model, checked before
    anything runs or is held: past ``GatewayConfig.max_read_values``
    :class:`RemoteReadLimitError`; a handle that is not theirs answers as an unknown one
    (404), and nothing is read or charged."""
    most = gateway.config.max_read_values
    if not handles:
        raise BadRequestError("a read of several values needs at least one handle")
    if len(handles) > most:
        raise RemoteReadLimitError(f"this read names {len(handles)} values; one read takes at "
                                   f"most {most} (the gateway's max_read_values): read fewer "
                                   "at a time")
    helds = [gateway.remote_values.owned(user.id, h) for h in handles]
    models = sorted({h.model for h in helds})
    if len(models) > 1:
        raise BadRequestError(f"one read takes values of one model; these are of {models}")
    return helds


def fetch_many(gateway: Gateway, user: UserView, handles: list[str]
               ) -> tuple[list[Any], dict[str, Any]]:
    """The whole values of ``handles``, in one call of the engine, priced once."""
    helds = owned_all(gateway, user, handles)
    values = [h.value for h in helds]
    return read(gateway, user, helds, "fetch", sum(_nbytes(v.shape, v.dtype) for v in values),
                0.0, lambda: fetch_all(values), many=True)


def reduce_many(gateway: Gateway, user: UserView, handles: list[str], op: str, dims: Any,
                keepdim: bool, dtype: str | None) -> tuple[list[Any], dict[str, Any]]:
    """The same whitelisted reduction of each value of ``handles`` on the engine, in one call
    of it (:func:`tpmlab.remote.reduce_all`), priced once: the hold is their worst cases
    added up."""
    helds = owned_all(gateway, user, handles)
    values = [h.value for h in helds]
    out = sum(_nbytes(check_reduction(v.shape, op, dims, keepdim, dtype)[1], dtype or v.dtype)
              for v in values)
    flops = sum(_gram_flops(v, op) for v in values)
    return read(gateway, user, helds, "reduce", out,
                flops / gateway.config.remote_flops_per_second,
                lambda: reduce_all(values, op, dims, keepdim=keepdim, dtype=dtype), many=True)


# -- HTTP -------------------------------------------------------------------------------------------
class ValueOut(BaseModel):
    handle: str
    model: str
    shape: list[int]
    dtype: str
    nbytes: int
    request_id: str
    expires_in: float = Field(description="seconds until the gateway releases it")


class ValuesOut(BaseModel):
    values: list[ValueOut]
    bytes: int = Field(description="bytes you hold (and have reserved by requests in flight)")
    count: int
    max_bytes: int = Field(description="your tier's max_remote_bytes")
    max_values: int = Field(description="your tier's max_remote_values")
    max_read_values: int = Field(description="values one read of several takes")
    max_read_bytes: int = Field(description="bytes one read returns: your tier's "
                                            "max_saved_bytes")


IndexItem = int | Annotated[list[int | None], Field(min_length=3, max_length=3)]


class FetchBody(BaseModel):
    index: list[IndexItem] | None = Field(default=None, max_length=64,
                                          description="one item per leading dim: an int, or "
                                                      "[start, stop, step] (null: left out)")


class ReduceBody(BaseModel):
    op: str = Field(max_length=40, description="one of tpmlab.remote.REDUCTIONS")
    dims: int | list[int] | None = Field(default=None, description="dims to reduce; all if "
                                                                    "null; none for gram")
    keepdim: bool = False
    dtype: str | None = Field(default=None, max_length=40,
                              description="float32 or float64 (null: the value's own)")


Handles = Annotated[list[Annotated[str, Field(max_length=200)]],
                    Field(min_length=1, max_length=10_000,
                          description="handles of your values, all of one model")]


class FetchManyBody(BaseModel):
    handles: Handles


class ReduceManyBody(ReduceBody):
    handles: Handles


class Released(BaseModel):
    released: int


router = APIRouter(prefix="/v1/remote-values", tags=["remote values"])


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _answer(tensor: Any, meta: dict[str, Any]) -> Response:
    return _answer_all([tensor], meta)


def _answer_all(tensors: list[Any], meta: dict[str, Any]) -> Response:
    return Response(encode_result(dict(enumerate(tensors)), meta), media_type=OCTET,
                    headers={"X-Tpmlab-Request-Id": meta["request_id"],
                             "X-Tpmlab-Units": f"{meta['charged_units']:.6f}"})


@router.get("", response_model=ValuesOut)
def list_values(request: Request, user: User,
                model: Annotated[str | None, Query(max_length=200)] = None) -> dict:
    gw = _gateway(request)
    limits = gw.limits_for(user)
    nbytes, count = gw.remote_values.usage(user.id)
    return {"values": [h.info() for h in gw.remote_values.of(user.id, model)],
            "bytes": nbytes, "count": count, "max_bytes": limits.max_remote_bytes,
            "max_values": limits.max_remote_values,
            "max_read_values": gw.config.max_read_values,
            "max_read_bytes": limits.max_saved_bytes}


@router.post("/fetch", response_class=Response, responses={200: {"content": {OCTET: {}}}})
async def fetch_values(body: FetchManyBody, request: Request, user: User) -> Response:
    gw = _gateway(request)
    return _answer_all(*await run_in_threadpool(_engine_errors, fetch_many, gw, user,
                                                body.handles))


@router.post("/reduce", response_class=Response, responses={200: {"content": {OCTET: {}}}})
async def reduce_values(body: ReduceManyBody, request: Request, user: User) -> Response:
    gw = _gateway(request)
    return _answer_all(*await run_in_threadpool(_engine_errors, reduce_many, gw, user,
                                                body.handles, body.op, body.dims, body.keepdim,
                                                body.dtype))


@router.get("/{handle}", response_model=ValueOut)
def value_info(handle: str, request: Request, user: User) -> dict:
    return _gateway(request).remote_values.owned(user.id, handle).info()


@router.post("/{handle}/fetch", response_class=Response,
             responses={200: {"content": {OCTET: {}}}})
async def fetch_value(handle: str, body: FetchBody, request: Request, user: User) -> Response:
    gw = _gateway(request)
    return _answer(*await run_in_threadpool(_engine_errors, fetch, gw, user, handle, body.index))


@router.post("/{handle}/reduce", response_class=Response,
             responses={200: {"content": {OCTET: {}}}})
async def reduce_value(handle: str, body: ReduceBody, request: Request,
                       user: User) -> Response:
    gw = _gateway(request)
    return _answer(*await run_in_threadpool(_engine_errors, reduce, gw, user, handle, body.op,
                                            body.dims, body.keepdim, body.dtype))


@router.delete("/{handle}", response_model=Released)
def release_value(handle: str, request: Request, user: User) -> dict:
    _gateway(request).remote_values.release(user.id, handle)
    return {"released": 1}


@router.delete("", response_model=Released)
def release_values(request: Request, user: User,
                   model: Annotated[str | None, Query(max_length=200)] = None) -> dict:
    return {"released": _gateway(request).remote_values.release_all(user.id, model)}


def _engine_errors(fn: Any, *args: Any) -> Any:
    """``fn(*args)``; a failure of the engine (not a tpmlab error) as the gateway's."""
    try:
        return fn(*args)
    except TpmlabError:
        raise
    except Exception as e:  # noqa: BLE001 - a worker lost, a value gone
        raise as_gateway_error(e) from None
