"""``GatewayBackend``: the :class:`~tpmlab.runtime.backend.Backend` protocol over HTTP.

``tpmlab.connect(gateway=URL, token=...)`` uses it, so a notebook has the same API
against a gateway as against a Dask cluster or in-process. The token is a tpmlab API
key or a JupyterHub API token (default: the environment's, :func:`tpmlab.tokens.gateway_token`:
``$TPMLAB_TOKEN``, else ``$TPMLAB_GATEWAY_TOKEN``, else the ``$JUPYTERHUB_API_TOKEN`` every
JupyterHub single-user server has).

A remote save (``.save(remote=True)``) comes back as a :class:`GatewayRemoteValue`: the
API of :class:`~tpmlab.remote.RemoteValue`, each read a request to the gateway
(:mod:`tpmlab.gateway.remote_values`), so only what is fetched or reduced leaves the engine.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import httpx
import numpy as np
import torch

from ..errors import RequestTimeoutError
from ..ir.codec import decode_result
from ..ir.model_info import ModelInfo
from ..ir.session import decode_session_result
from ..ir.validate import Limits
from ..remote import (
    RemoteValue,
    RemoteValues,
    check_index,
    check_reduction,
    described,
    index_to_wire,
)
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
        self.remote = RemoteValues()  # the remote values this client handed out, by model
        self._dropped: list[str] = []  # handles of values collected here, released next call
        # values and bytes one read of several takes there, asked when first needed
        self._read_limits: tuple[int, int] | None = None

    def _get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params=params or None).json()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self._release_dropped()
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as e:
            raise RequestTimeoutError(f"the gateway {self.url} did not answer: {e}") from None
        raise_for_error(r)
        return r

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
        """:meth:`run`, decoded: saved values by node id and the result's metadata (remote
        saves as :class:`GatewayRemoteValue`)."""
        return self._with_remote(*decode_result(self.run(model, plan, timeout=timeout,
                                                         limits=limits)))

    def run_session_values(self, model: str, session: bytes, *, timeout: float | None = None,
                           limits: Limits | None = None
                           ) -> list[tuple[dict[int, Any], dict[str, Any]]]:
        """POST a session envelope (:mod:`tpmlab.ir.session`): the gateway validates it as a
        whole, runs it as one request (the values its traces keep for each other stay on
        the engine) and charges it once. Each trace's saved values and metadata, in order;
        ``last_charge`` is the whole session's. ``limits`` is ignored, as for :meth:`run`."""
        blob = self._post(f"/v1/models/{model}/sessions", session, timeout)
        return [self._with_remote(values, meta) for values, meta in decode_session_result(blob)]

    def _post(self, path: str, body: bytes, timeout: float | None) -> bytes:
        """POST ``body`` to ``path`` and wait up to ``timeout`` seconds (the client's own
        where None) for the result bytes; notes the charge in :attr:`last_charge`."""
        wait = timeout or self.timeout
        self._release_dropped()
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

    # -- remote values ----------------------------------------------------------------------------
    def _with_remote(self, values: dict[int, Any], meta: dict[str, Any]
                     ) -> tuple[dict[int, Any], dict[str, Any]]:
        """A result's values with its remote saves as :class:`GatewayRemoteValue`."""
        for k in meta.get("remote_saves", ()):
            v = values[k]
            values[k] = [self._remote_value(x) for x in v] if isinstance(v, list) \
                else self._remote_value(v)
        return values, meta

    def _remote_value(self, value: Any) -> GatewayRemoteValue:
        info = described(value)
        if info is None:
            raise gw_errors.GatewayError(f"the gateway sent {str(value)[:80]!r} for a remote save")
        out = GatewayRemoteValue(self, info)
        self.remote.add(out.model, out)
        return out

    def remote_values(self, model: str | None = None) -> dict[str, Any]:
        """The remote values you keep behind the gateway (from any of your clients): each
        one's handle, model, shape, dtype, bytes and seconds left, and your tier's limits."""
        return self._get("/v1/remote-values", **({"model": model} if model else {}))

    def release_remote(self, model: str | None = None) -> int:
        """Release the remote values this client handed out (of ``model``); how many."""
        self._release_dropped()
        return self.remote.release(model)

    def _read(self, handle: str, what: str, body: dict[str, Any]) -> torch.Tensor:
        r = self._call("POST", f"/v1/remote-values/{handle}/{what}", json=body)
        values, meta = decode_result(r.content)
        self.last_charge = {"request_id": meta.get("request_id"),
                            "units": float(meta.get("charged_units", "nan")), "batch_size": 1}
        return values[0]

    def _read_many(self, values: list[GatewayRemoteValue], what: str, body: dict[str, Any],
                   nbytes: list[int]) -> list[torch.Tensor]:
        """Read ``values`` (of one model; ``nbytes``: what each returns) with as few requests
        as the gateway's limits allow (``POST /v1/remote-values/{what}``; each at most
        ``max_read_values`` values and ``max_read_bytes``, a value over that alone is sent
        alone, to be refused naming the limit); ``last_charge`` is the last request's."""
        if self._read_limits is None:
            held = self.remote_values()
            self._read_limits = (int(held["max_read_values"]), int(held["max_read_bytes"]))
        most, most_bytes = self._read_limits
        chunks: list[list[int]] = [[]]
        size = 0
        for i, n in enumerate(nbytes):
            if chunks[-1] and (len(chunks[-1]) >= most or size + n > most_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += n
        out: list[torch.Tensor] = []
        for chunk in chunks:
            handles = [values[i].handle for i in chunk]
            r = self._call("POST", f"/v1/remote-values/{what}", json=dict(body, handles=handles))
            got, meta = decode_result(r.content)
            self.last_charge = {"request_id": meta.get("request_id"),
                                "units": float(meta.get("charged_units", "nan")),
                                "batch_size": len(handles)}
            out.extend(got[k] for k in range(len(handles)))
        return out

    def _release(self, handle: str) -> None:
        try:
            self._call("DELETE", f"/v1/remote-values/{handle}")
        except gw_errors.NotFoundError:  # expired there already
            pass

    def _drop(self, handle: str) -> None:
        """A value collected here: released at the next call (never from the collector)."""
        self._dropped.append(handle)

    def _release_dropped(self) -> None:
        while self._dropped:
            handle = self._dropped.pop()
            try:
                self.http.delete(f"/v1/remote-values/{handle}")
            except httpx.HTTPError:  # it expires on the gateway anyway
                pass

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
        """Release the remote values this client handed out, then close."""
        try:
            self.release_remote()
        except (httpx.HTTPError, gw_errors.GatewayError):  # they expire on the gateway
            pass
        self.http.close()


class GatewayRemoteValue(RemoteValue):
    """A remote value kept behind the gateway, with the API of
    :class:`~tpmlab.remote.RemoteValue`: ``shape``, ``dtype``, ``nbytes``, ``fetch(index)``,
    ``reduce(op, dims)``, ``to_dask_array()``, ``release()``. Each read is a request to
    the gateway, held to your tier's limits and priced in its ledger (``lab.backend.
    last_charge``); ``to_dask_array()`` fetches the whole value when called. ``handle``
    names it there (only you can use it); ``worker`` and ``future`` are ``None``. Dropping
    the object releases it at this client's next request; it also expires on the gateway."""

    def __init__(self, backend: GatewayBackend, info: dict[str, Any]) -> None:
        super().__init__(shape=tuple(int(n) for n in info["shape"]), dtype=str(info["dtype"]),
                         nbytes=int(info["nbytes"]))
        self.handle = str(info["handle"])
        self.model = str(info["model"])
        self._backend: GatewayBackend | None = backend
        self._finalizer = weakref.finalize(self, backend._drop, self.handle)
        self._finalizer.atexit = False

    @property
    def released(self) -> bool:
        return self._backend is None

    def _live(self) -> GatewayBackend:
        if self._backend is None:
            raise ValueError("this remote value was released")
        return self._backend

    def to_dask_array(self):
        """The value as a one-chunk ``dask.array``, fetched from the gateway now, in the
        notebook (reduce with :meth:`reduce`, or read part with :meth:`fetch`, to bring back
        less). Not at compute time: a computation may run on a Dask cluster the notebook
        also uses (the default scheduler), and the gateway's connection cannot go there."""
        import dask.array as da

        if self._array is None:
            self._array = da.from_array(self.fetch().numpy(), chunks=-1)
        return self._array

    def fetch(self, index: Any = None) -> torch.Tensor:
        backend = self._live()
        body = {"index": index_to_wire(check_index(self.shape, index)[0])} \
            if index is not None else {}
        return backend._read(self.handle, "fetch", body)

    def reduce(self, op: str, dims: Any = None, *, keepdim: bool = False,
               dtype: str | None = None) -> torch.Tensor:
        backend = self._live()
        axes = check_reduction(self.shape, op, dims, keepdim, dtype)[0]  # refused here as there
        return backend._read(self.handle, "reduce", {
            "op": op, "dims": None if axes is None else list(axes), "keepdim": keepdim,
            "dtype": dtype})

    def _group(self) -> Any:
        return ("gateway", id(self._live()), self.model)

    @staticmethod
    def _reduce_group(values: list[RemoteValue], op: str, dims: Any, keepdim: bool,
                      dtype: str | None) -> list[torch.Tensor]:
        wire = dims if dims is None or isinstance(dims, int) else [int(d) for d in dims]
        nbytes = [math.prod(check_reduction(v.shape, op, dims, keepdim, dtype)[1])
                  * np.dtype(dtype or v.dtype).itemsize for v in values]
        return values[0]._live()._read_many(values, "reduce", {  # checked per value there
            "op": op, "dims": wire, "keepdim": keepdim, "dtype": dtype}, nbytes)

    @staticmethod
    def _fetch_group(values: list[RemoteValue]) -> list[torch.Tensor]:
        return values[0]._live()._read_many(values, "fetch", {}, [v.nbytes for v in values])

    @staticmethod
    def _group_arrays(values: list[RemoteValue]) -> list[Any]:
        """The values as ``dask.array`` chunks fetched together, in one request, now (as
        :meth:`to_dask_array` does: in the notebook, whatever scheduler computes them)."""
        import dask.array as da

        return [da.from_array(t.numpy(), chunks=-1) for t in RemoteValue._fetch_all(values)]

    def release(self) -> None:
        backend, self._backend = self._backend, None
        self._array = None
        self._finalizer.detach()
        if backend is not None:
            backend._release(self.handle)

    def __repr__(self) -> str:
        where = "released" if self.released else f"behind the gateway as {self.handle[:10]}…"
        return f"<RemoteValue {list(self.shape)} {self.dtype} {where}>"
