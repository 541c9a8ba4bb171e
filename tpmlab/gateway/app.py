"""The gateway's HTTP API (FastAPI). Every endpoint but ``/health`` and ``/metrics``
needs ``Authorization: Bearer <tpmlab API key or JupyterHub token>``.

=======  ====================================  =================================================
GET      /health                               liveness, served models, queue depth
GET      /metrics                              Prometheus metrics
GET      /v1/models                            served models
GET      /v1/models/{model}                    the model's ModelInfo (what ``lab.model`` needs)
POST     /v1/models/{model}/run                plan bytes in, result bytes out (waits)
POST     /v1/models/{model}/requests           plan bytes in, 202 + request id (does not wait)
POST     /v1/models/{model}/sessions           session bytes in, session result bytes out (waits)
POST     /v1/models/{model}/sessions/requests  session bytes in, 202 + request id (does not wait)
GET      /v1/requests/{id}                     status of one of your requests
GET      /v1/requests/{id}/result              its result bytes (waits up to ``timeout``)
DELETE   /v1/requests/{id}                     cancel one of your queued requests
GET      /v1/me                                your tier and balance
GET      /v1/me/usage                          your balance and recent charges
...      /v1/remote-values[...]                your remote saves: list, fetch, reduce, release
                                               (:mod:`tpmlab.gateway.remote_values`)
admin    /v1/admin/users[...]                  users, keys, tiers, allocations (admin tier)
=======  ====================================  =================================================

Plans and results are ``application/octet-stream`` (:mod:`tpmlab.ir.codec`: JSON +
safetensors, never pickles). A session (the traces of ``model.session()``) is one
envelope of plans in and one envelope of results out (:mod:`tpmlab.ir.session`); it is
validated as a whole, runs as one request and is charged once (:mod:`.sessions`), and its
status, result and cancellation are those of any request (``/v1/requests/{id}``).
Errors are JSON ``{"error": <class>, "message": ...}`` with the status their class states (``http_status``: plan errors 400, size limits 413, failures
while running 422, the gateway's own errors theirs), read in one place
(:func:`tpmlab.gateway.errors.http_status`). A request is authenticated (failures throttled per client address)
and counted against the user's in-flight limit before its body is read.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..errors import TpmlabError
from .auth import Authenticator, HubSettings, User, current_user
from .core import Gateway
from .errors import (
    BadRequestError,
    PayloadTooLargeError,
    TierError,
    UnsupportedMediaTypeError,
    class_for_status,
    error_body,
    http_status,
)
from .ledger import USER_NAME_PATTERN, UserView
from .remote_values import router as remote_values_router
from .sessions import prepare_session
from .throttle import FailureThrottle, retry_after_header
from .tiers import TIERS

log = logging.getLogger("tpmlab.gateway")
OCTET = "application/octet-stream"


# -- schemas ----------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    error: str
    message: str


class Health(BaseModel):
    status: str
    version: str
    models: list[str]
    queue_depth: dict[str, int]


class ModelEntry(BaseModel):
    name: str
    version: str
    family: str
    dtype: str
    n_stages: int
    cost_model: dict[str, float]


class ModelDetail(ModelEntry):
    info: dict[str, Any]


class Me(BaseModel):
    name: str
    tier: str
    source: str
    allocated: float
    used: float
    balance: float
    held: float = Field(description="units held by your requests in flight")
    requests: int
    max_invokes: int = Field(description="invokes your tier allows in one forward pass (a "
                                         "trace with more runs in several)")


class Usage(Me):
    charges: list[dict[str, Any]]


class RequestStatus(BaseModel):
    id: str
    model: str
    state: str
    mode: str
    tokens: int
    estimated_units: float = Field(description="the hold: the most the request can cost")
    units: float
    batch_size: int
    error: str | None = None
    message: str | None = None
    result: str | None = Field(default=None, description="'dropped' once no longer kept")


class NewUser(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=USER_NAME_PATTERN)
    tier: str = Field(default="query", pattern="^(" + "|".join(TIERS) + ")$")
    units: float = Field(default=0.0, ge=0, le=1e12, allow_inf_nan=False)


class UserOut(BaseModel):
    name: str
    tier: str
    source: str
    active: bool
    balance: float


class NewKey(BaseModel):
    label: str = Field(default="", max_length=200)


class KeyOut(BaseModel):
    user: str
    key: str = Field(description="the whole key; shown only once")


class Grant(BaseModel):
    units: float = Field(ge=-1e12, le=1e12, allow_inf_nan=False,
                         description="negative: take back (never below what is used and held)")
    note: str = Field(default="", max_length=500)


class TierChange(BaseModel):
    tier: str = Field(pattern="^(" + "|".join(TIERS) + ")$")


# -- authentication (dependencies) --------------------------------------------------------------
async def admin_user(user: Annotated[UserView, Depends(current_user)]) -> UserView:
    if user.tier != "admin":
        raise TierError("managing users needs the 'admin' tier, and your tier is "
                        f"{user.tier!r}", needed="admin", tier=user.tier)
    return user


Admin = Annotated[UserView, Depends(admin_user)]


# -- the app ----------------------------------------------------------------------------------------
def create_app(gateway: Gateway, *, hub: HubSettings | None = None) -> FastAPI:
    cfg = gateway.config
    auth = Authenticator(gateway.ledger, hub, FailureThrottle(cfg.auth_failure_burst,
                                                              cfg.auth_failure_rate))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        yield
        await auth.close()
        await gateway.close()

    app = FastAPI(title="tpmlab gateway", version=__version__, lifespan=lifespan,
                  responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody},
                             429: {"model": ErrorBody}})
    app.state.gateway = gateway
    app.state.auth = auth

    def answer(e: Exception) -> JSONResponse:
        status = http_status(e)
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        retry = getattr(e, "extra", {}).get("retry_after")
        if retry is not None:
            headers["Retry-After"] = retry_after_header(retry)
        return JSONResponse(error_body(e), status_code=status, headers=headers or None)

    @app.exception_handler(TpmlabError)
    async def _tpmlab_error(request: Request, e: TpmlabError) -> JSONResponse:
        return answer(e)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:  # logged by Starlette
        return JSONResponse({"error": "InternalError", "message": "the gateway failed; its "
                             "administrators find the cause in its log"}, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Routing answers (no such path, method not allowed) in the same body as ours."""
        name = class_for_status(e.status_code).__name__
        return JSONResponse({"error": name, "message": f"{e.detail}: {request.method} "
                             f"{request.url.path[:200]}"}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _bad_parameters(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
                             for err in e.errors()[:5])
        detail = [{"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg")),
                   "type": str(err.get("type"))} for err in e.errors()[:20]]  # not the input
        return JSONResponse({"error": "BadRequestError", "message": problems,
                             "detail": detail}, status_code=422)

    async def read_plan(request: Request, limit: int) -> bytes:
        """The body, refused before it is read past ``limit`` bytes (the user's tier's
        ``Limits.max_plan_bytes``)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"a body of {int(declared):,} bytes exceeds your tier's "
                                       f"limit of {limit:,} bytes for a plan or session")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"the body exceeds your tier's limit of {limit:,} "
                                           "bytes for a plan or session")
            chunks.append(chunk)
        if not size:
            raise BadRequestError("empty body: send the plan bytes (application/octet-stream)")
        return b"".join(chunks)

    def check_content_type(request: Request) -> None:
        kind = request.headers.get("content-type")
        if kind is not None and kind.split(";")[0].strip().lower() != OCTET:
            raise UnsupportedMediaTypeError(f"a plan is sent as {OCTET}, not {kind[:100]!r}")

    def model_entry(name: str) -> dict[str, Any]:
        dep = gateway.deployed(name)
        info = dep.info
        return {"name": name, "version": info.version, "family": info.family,
                "dtype": info.dtype, "n_stages": info.n_stages,
                "cost_model": dep.cost.to_dict()}

    # -- open endpoints ------------------------------------------------------------------------
    @app.get("/health", response_model=Health)
    async def health() -> dict:
        return {"status": "ok", "version": __version__, "models": sorted(gateway.models),
                "queue_depth": gateway.queue_depth()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- models and plans ----------------------------------------------------------------------
    @app.get("/v1/models", response_model=list[ModelEntry])
    async def models(user: User) -> list[dict]:
        return [model_entry(m) for m in sorted(gateway.models)]

    @app.get("/v1/models/{model}", response_model=ModelDetail)
    async def model_detail(model: str, user: User) -> dict:
        return {**model_entry(model), "info": gateway.deployed(model).info.to_dict()}

    def serve_requests(run_path: str, submit_path: str, prepare: Any, what: str) -> None:
        """POST ``run_path``: ``what`` bytes in, its result out once it ran (waits up to
        ``timeout``); POST ``submit_path``: 202 and the request's status (does not wait).
        ``prepare``: what admits the body (:meth:`Gateway.admit`)."""

        async def admit(user: UserView, model: str, request: Request):
            check_content_type(request)
            return await gateway.admit(user, model, lambda limit: read_plan(request, limit),
                                       prepare)

        async def run(model: str, request: Request, user: User,
                      timeout: Annotated[float | None, Query(gt=0)] = None) -> Response:
            req = await admit(user, model, request)
            blob = await gateway.wait(req, timeout)
            return Response(blob, media_type=OCTET, headers=_charge_headers(req))

        async def submit(model: str, request: Request, user: User) -> dict:
            req = await admit(user, model, request)
            return req.status()

        app.add_api_route(run_path, run, methods=["POST"], response_class=Response,
                          name=f"run {what}", summary=f"run a {what} (waits)",
                          responses={200: {"content": {OCTET: {}}}, 402: {"model": ErrorBody},
                                     403: {"model": ErrorBody}, 413: {"model": ErrorBody}})
        app.add_api_route(submit_path, submit, methods=["POST"], status_code=202,
                          response_model=RequestStatus, name=f"submit {what}",
                          summary=f"submit a {what} (does not wait)")

    serve_requests("/v1/models/{model}/run", "/v1/models/{model}/requests", None, "plan")
    serve_requests("/v1/models/{model}/sessions", "/v1/models/{model}/sessions/requests",
                   functools.partial(prepare_session, gateway), "session")

    @app.get("/v1/requests/{request_id}", response_model=RequestStatus)
    async def request_status(request_id: str, user: User) -> dict:
        return gateway.owned(user, request_id).status()

    @app.get("/v1/requests/{request_id}/result", response_class=Response)
    async def request_result(request_id: str, user: User,
                             timeout: Annotated[float | None, Query(gt=0)] = None) -> Response:
        req = gateway.owned(user, request_id)
        blob = await gateway.wait(req, timeout)
        return Response(blob, media_type=OCTET, headers=_charge_headers(req))

    @app.delete("/v1/requests/{request_id}", response_model=RequestStatus)
    async def cancel(request_id: str, user: User) -> dict:
        return gateway.cancel(user, request_id).status()

    # -- the user's account --------------------------------------------------------------------
    @app.get("/v1/me", response_model=Me)
    def me(user: User) -> dict:
        return {"name": user.name, "tier": user.tier, "source": user.source,
                **gateway.ledger.totals(user.name),
                "max_invokes": gateway.limits_for(user).max_invokes}

    @app.get("/v1/me/usage", response_model=Usage)
    def usage(user: User, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
        return {"name": user.name, "tier": user.tier, "source": user.source,
                **gateway.ledger.totals(user.name),
                "max_invokes": gateway.limits_for(user).max_invokes,
                "charges": gateway.ledger.charges(user.name, limit)}

    app.include_router(remote_values_router)

    # -- administration ------------------------------------------------------------------------
    def user_out(name: str) -> dict:
        u = gateway.ledger.user(name)
        if u is None:
            raise BadRequestError(f"no user {name!r}")
        return {"name": u.name, "tier": u.tier, "source": u.source, "active": u.active,
                "balance": gateway.ledger.balance(name)}

    @app.get("/v1/admin/users", response_model=list[UserOut])
    def list_users(admin: Admin) -> list[dict]:
        return [user_out(u.name) for u in gateway.ledger.users()]

    @app.post("/v1/admin/users", response_model=UserOut, status_code=201)
    def create_user(body: NewUser, admin: Admin) -> dict:
        gateway.ledger.create_user(body.name, body.tier, units=body.units)
        return user_out(body.name)

    @app.post("/v1/admin/users/{name}/keys", response_model=KeyOut, status_code=201)
    def create_key(name: str, body: NewKey, admin: Admin) -> dict:
        return {"user": name, "key": gateway.ledger.create_key(name, body.label)}

    @app.delete("/v1/admin/keys/{key_id}", status_code=204)
    def revoke_key(key_id: str, admin: Admin) -> Response:
        gateway.ledger.revoke_key(key_id)
        return Response(status_code=204)

    @app.post("/v1/admin/users/{name}/allocations", response_model=UserOut)
    def allocate(name: str, body: Grant, admin: Admin) -> dict:
        gateway.ledger.allocate(name, body.units, body.note or f"granted by {admin.name}")
        return user_out(name)

    @app.put("/v1/admin/users/{name}/tier", response_model=UserOut)
    def set_tier(name: str, body: TierChange, admin: Admin) -> dict:
        gateway.ledger.set_tier(name, body.tier)
        return user_out(name)

    @app.get("/v1/admin/users/{name}/usage", response_model=Usage)
    def user_usage(name: str, admin: Admin) -> dict:
        u = gateway.ledger.user(name)
        if u is None:
            raise BadRequestError(f"no user {name!r}")
        return {"name": u.name, "tier": u.tier, "source": u.source,
                **gateway.ledger.totals(name), "charges": gateway.ledger.charges(name)}

    return app


def _charge_headers(req: Any) -> dict[str, str]:
    return {"X-Tpmlab-Request-Id": req.id, "X-Tpmlab-Units": f"{req.units:.6f}",
            "X-Tpmlab-Batch-Size": str(req.batch_size)}
