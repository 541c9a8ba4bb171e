"""Who is asking: tpmlab API keys (in the ledger) and JupyterHub API tokens.

A request carries ``Authorization: Bearer <token>`` (or ``token <token>``, as
JupyterHub writes it). A token that starts with ``tpmk_`` is an API key checked
against the ledger; any other token is asked about at JupyterHub
(``GET {hub_api}/user`` with ``Authorization: token <token>``), so JupyterHub users
need no new credential: on first sight they get a ledger account with the
configured default tier and allocation, named ``hub:<name>`` so that a JupyterHub
login never reaches a key-based account of the same name. Hub answers are cached for
a short while, keyed by the token's digest (never the token itself).

Failed authentications are throttled per client address (:mod:`.throttle`): once an
address has failed too often, its requests get 429 before any credential is checked.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Annotated

import httpx
from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from .errors import AuthenticationError, RateLimitError, UpstreamError
from .ledger import KEY_PREFIX, Ledger, UserView
from .throttle import FailureThrottle


@dataclass
class HubSettings:
    api_url: str  # e.g. http://127.0.0.1:8081/hub/api
    default_tier: str = "query"
    default_units: float = 1000.0
    cache_seconds: float = 60.0
    timeout: float = 5.0
    # a scope the token must carry, e.g. "access:services!service=tpmlab" for the gateway
    # run as that Hub service (`tpmlab hub-config`): other Hub tokens are refused
    required_scope: str | None = None


def token_from_header(value: str | None) -> str:
    if not value:
        raise AuthenticationError("no credential: send 'Authorization: Bearer <API key or "
                                  "JupyterHub token>'")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() not in ("bearer", "token") or not token.strip():
        raise AuthenticationError("the Authorization header must be 'Bearer <token>' or "
                                  "'token <token>'")
    return token.strip()


def has_scope(scopes: list[str], required: str | None) -> bool:
    """Whether a Hub token's ``scopes`` grant ``required`` (itself, or its unfiltered form:
    ``access:services`` grants ``access:services!service=x``)."""
    if required is None:
        return True
    return required in scopes or required.partition("!")[0] in scopes


class Authenticator:
    def __init__(self, ledger: Ledger, hub: HubSettings | None = None,
                 throttle: FailureThrottle | None = None) -> None:
        self.ledger = ledger
        self.hub = hub
        self.throttle = throttle or FailureThrottle()
        self._cache: dict[str, tuple[float, str]] = {}
        self._http: httpx.AsyncClient | None = None

    async def user(self, authorization: str | None, address: str = "") -> UserView:
        """The caller; 401 without a valid credential, 429 while ``address`` (the client's)
        has failed too often."""
        wait = self.throttle.retry_after(address)
        if wait > 0:
            raise RateLimitError(f"too many failed authentications from {address or 'here'}; "
                                 f"try again in {wait:.0f} s", retry_after=wait)
        try:
            return await self._user(authorization)
        except AuthenticationError:
            self.throttle.failed(address)
            raise

    async def _user(self, authorization: str | None) -> UserView:
        token = token_from_header(authorization)
        if token.startswith(KEY_PREFIX):
            user = await run_in_threadpool(self.ledger.check_key, token)
            if user is None:
                raise AuthenticationError("unknown, revoked or malformed API key")
            return user
        if self.hub is None:
            raise AuthenticationError("not a tpmlab API key, and this gateway does not "
                                      "accept JupyterHub tokens")
        name = await self._hub_user(token)
        user = await run_in_threadpool(self.ledger.hub_user, name, tier=self.hub.default_tier,
                                       units=self.hub.default_units)
        if not user.active:
            raise AuthenticationError(f"user {user.name!r} is disabled")
        return user

    async def _hub_user(self, token: str) -> str:
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.hub.timeout)
        try:
            r = await self._http.get(self.hub.api_url.rstrip("/") + "/user",
                                     headers={"Authorization": f"token {token}"})
        except httpx.HTTPError as e:
            raise UpstreamError(f"cannot reach JupyterHub to check the token: {e}") from None
        if r.status_code in (401, 403, 404):
            raise AuthenticationError("JupyterHub does not know this token")
        if r.status_code != 200:
            raise UpstreamError(f"JupyterHub answered {r.status_code} checking the token")
        try:
            body = r.json()
            name, scopes = body["name"], body.get("scopes") or []
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UpstreamError("JupyterHub's answer has no user name") from None
        if not isinstance(name, str) or not name:
            raise UpstreamError("JupyterHub's answer has no user name")
        if not has_scope(scopes, self.hub.required_scope):
            raise AuthenticationError(f"this JupyterHub token does not grant "
                                      f"{self.hub.required_scope!r}: use the token of your "
                                      "single-user server or make one with that scope")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (time.monotonic() + self.hub.cache_seconds, name)
        return name

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


async def current_user(request: Request,
                       authorization: Annotated[str | None, Header()] = None) -> UserView:
    """The caller, from an API key or a JupyterHub token (a FastAPI dependency: the app's
    ``state.auth`` checks it); 401 without a valid one, 429 while the client's address has
    failed too often."""
    address = request.client.host if request.client else ""
    return await request.app.state.auth.user(authorization, address)


User = Annotated[UserView, Depends(current_user)]  # an endpoint's authenticated caller
