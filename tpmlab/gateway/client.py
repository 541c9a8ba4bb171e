"""``GatewayBackend``: the :class:`~tpmlab.runtime.backend.Backend` protocol over HTTP.

``tpmlab.connect(gateway=URL, token=...)`` uses it, so a notebook has the same API
against a gateway as against a Dask cluster or in-process. The token is a tpmlab API
key or a JupyterHub API token (default: the environment's, :func:`tpmlab.tokens.gateway_token`:
``$TPMLAB_TOKEN``, else ``$TPMLAB_GATEWAY_TOKEN``, else the ``$JUPYTERHUB_API_TOKEN`` every
JupyterHub single-user server has).
"""

from __future__ import annotations

from typing import Any

import httpx

from ..errors import RequestTimeoutError
from ..ir.codec import decode_result
from ..ir.model_info import ModelInfo
from ..ir.session import decode_session_result
from ..ir.validate import Limits
from ..tokens import gateway_token, token_sources
from . import errors as gw_errors


def raise_for_error(response: httpx.Response) -> None:
    """Raise the tpmlab error a gateway error response stands for (the class it names,
    else the gateway error class of its HTTP status)."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    raise gw_errors.error_from_answer(response.status_code, body,
                                      response.text or response.reason_phrase)


class GatewayBackend:
    """Deploy = ask the gateway for the model's info; run = POST the plan bytes."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 600.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        token = token or gateway_token()
        if not token:
            raise gw_errors.AuthenticationError(
                "connect(gateway=...) needs token= (a tpmlab API key or a JupyterHub token), "
                f"or one of {token_sources()} set")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10.0),
                                 headers={"Authorization": f"Bearer {token}",
                                          "User-Agent": "tpmlab-gateway-client"},
                                 transport=transport)
        self.last_charge: dict[str, Any] = {}

    def _get(self, path: str, **params: Any) -> Any:
        try:
            r = self.http.get(path, params=params or None)
        except httpx.TimeoutException as e:
            raise RequestTimeoutError(f"the gateway {self.url} did not answer: {e}") from None
        raise_for_error(r)
        return r.json()

    def deploy(self, name: str, **options: Any) -> ModelInfo:
        """The gateway's administrators deploy models; this attaches to one (``options``
        such as ``stages=`` are theirs to choose and are ignored here)."""
        return ModelInfo.from_dict(self._get(f"/v1/models/{name}")["info"])

    def run(self, model: str, plan: bytes, *, timeout: float | None = None,
            limits: Limits | None = None) -> bytes:
        """POST the plan; result bytes. ``limits`` is ignored: the gateway holds every
        request to its user's tier limits."""
        return self._post(f"/v1/models/{model}/run", plan, timeout)

    def run_values(self, model: str, plan: bytes, *, timeout: float | None = None,
                   limits: Limits | None = None) -> tuple[dict[int, Any], dict[str, Any]]:
        """:meth:`run`, decoded: saved values by node id and the result's metadata."""
        return decode_result(self.run(model, plan, timeout=timeout, limits=limits))

    def run_session_values(self, model: str, session: bytes, *, timeout: float | None = None,
                           limits: Limits | None = None
                           ) -> list[tuple[dict[int, Any], dict[str, Any]]]:
        """POST a session envelope (:mod:`tpmlab.ir.session`): the gateway validates it as a
        whole, runs it as one request (the values its traces keep for each other stay on
        the engine) and charges it once. Each trace's saved values and metadata, in order;
        ``last_charge`` is the whole session's. ``limits`` is ignored, as for :meth:`run`."""
        return decode_session_result(self._post(f"/v1/models/{model}/sessions", session,
                                                timeout))

    def _post(self, path: str, body: bytes, timeout: float | None) -> bytes:
        """POST ``body`` to ``path`` and wait up to ``timeout`` seconds (the client's own
        where None) for the result bytes; notes the charge in :attr:`last_charge`."""
        wait = timeout or self.timeout
        try:
            r = self.http.post(path, content=body,
                               params={"timeout": wait},
                               headers={"Content-Type": "application/octet-stream"},
                               timeout=httpx.Timeout(wait + 30.0, connect=10.0))
        except httpx.TimeoutException as e:
            raise RequestTimeoutError(f"the gateway {self.url} did not answer within "
                                      f"{wait:g} s: {e}") from None
        raise_for_error(r)
        self.last_charge = {"request_id": r.headers.get("x-tpmlab-request-id"),
                            "units": float(r.headers.get("x-tpmlab-units", "nan")),
                            "batch_size": int(r.headers.get("x-tpmlab-batch-size", "0"))}
        return r.content

    @property
    def limits(self) -> Limits:
        """What the client needs to know of your tier's limits: the invokes one pass takes
        (a trace with more is split into passes before it is sent)."""
        return Limits(max_invokes=int(self.me()["max_invokes"]))

    def models(self) -> list[dict[str, Any]]:
        return self._get("/v1/models")

    def me(self) -> dict[str, Any]:
        """Your tier and balance."""
        return self._get("/v1/me")

    def usage(self, limit: int = 20) -> dict[str, Any]:
        """Your balance and your most recent charges."""
        return self._get("/v1/me/usage", limit=limit)

    def undeploy(self, name: str) -> None:
        pass  # the deployment is shared; only its administrators remove it

    def close(self) -> None:
        self.http.close()
