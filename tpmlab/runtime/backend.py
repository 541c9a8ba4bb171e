"""Where plans run: the interface every backend keeps, and the in-process one.

A backend takes plan *bytes* and returns result *bytes* (:mod:`tpmlab.ir.codec`),
so the in-process path is the same data path a Dask cluster or a gateway uses.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..ir.codec import encode_result
from ..ir.model_info import ModelInfo
from ..ir.plan import SAVE
from ..ir.session import decode_session
from ..ir.validate import Limits
from ..remote import RemoteValues, wrap_local
from .engine import ModelHost
from .limits import request_limits
from .shared_passes import BatchPolicy, PassQueue


class Backend(Protocol):
    """Deploys models and runs plans on them.

    ``run`` takes plan bytes and returns result bytes; ``run_values`` returns the saved
    values by node id and the result's metadata (:func:`tpmlab.runtime.request.result_meta`:
    ``model_version``, ``plan_digest``, ``compute_seconds``, ``node_seconds``:
    ``{node id: seconds}`` of each plan node that is not a module point, over all steps
    and stages, ...), without a round trip through bytes where the backend can hand the
    values over as they are. ``run_session_values`` runs a session envelope
    (:mod:`tpmlab.ir.session`) as one request: each trace's ``run_values``, in order.
    ``limits``: the caller's
    limits for this request (a gateway's tier limits); the engine validates and runs the
    plan under the field-by-field minimum of them and its own
    (:func:`tpmlab.runtime.limits.request_limits`).
    """

    def deploy(self, name: str, **options: Any) -> ModelInfo: ...

    def run(self, model: str, plan: bytes, *, timeout: float | None = None,
            limits: Limits | None = None) -> bytes: ...

    def run_values(self, model: str, plan: bytes, *, timeout: float | None = None,
                   limits: Limits | None = None) -> tuple[dict[int, Any], dict[str, Any]]: ...

    def run_session_values(self, model: str, session: bytes, *, timeout: float | None = None,
                           limits: Limits | None = None
                           ) -> list[tuple[dict[int, Any], dict[str, Any]]]: ...

    def undeploy(self, name: str) -> None: ...

    def close(self) -> None: ...


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LocalBackend:
    """Runs plans on whole models loaded into this process (no cluster).

    Requests on one model from several threads are queued and run by the model's pass
    thread, never two passes at once (a plan's hooks sit on the model's shared modules);
    requests queued while a pass runs share the next forward pass where they can, each
    caller getting exactly its own values (:mod:`tpmlab.runtime.shared_passes`; ``batching``
    bounds how far a pass grows). Each result's metadata says how many requests its pass
    ran (``batch_size``); its ``compute_seconds`` are the pass's.
    """

    def __init__(self, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, limits: Limits = Limits(),
                 batching: BatchPolicy | None = None) -> None:
        from ..models.sources import model_dtype

        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = model_dtype(dtype) if dtype is not None else \
            (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.limits = limits
        self.hosts: dict[str, ModelHost] = {}
        self.batching = batching or BatchPolicy()
        self.queues: dict[str, PassQueue] = {}  # by model: its requests, one pass at a time
        self.remote = RemoteValues()  # remote saves handed out (tpmlab.remote)

    def deploy(self, name: str, **options: Any) -> ModelInfo:
        if name not in self.hosts:
            from ..models import resolve
            from ..models.sources import model_dtype

            dtype = options.get("dtype")
            dtype = model_dtype(dtype) if dtype is not None else self.dtype
            source = resolve(name)
            loaded = source.load(dtype=dtype, device=self.device)
            self.hosts[name] = ModelHost(name, loaded.model, loaded.tokenizer, loaded.version,
                                         loaded.adapter.family, source=source,
                                         limits=self.limits, meta_model=source.meta_model())
            self.queues[name] = PassQueue(self.hosts[name], self.batching)
        return self.hosts[name].info

    def host(self, name: str) -> ModelHost:
        if name not in self.hosts:
            raise LookupError(f"model {name!r} is not deployed here; deployed: {sorted(self.hosts)}")
        return self.hosts[name]

    def run(self, model: str, plan: bytes, *, timeout: float | None = None,
            limits: Limits | None = None) -> bytes:
        values, meta = self.run_values(model, plan, timeout=timeout, limits=limits)
        return encode_result(values, meta)

    def run_values(self, model: str, plan: bytes, *, timeout: float | None = None,
                   limits: Limits | None = None) -> tuple[dict[int, Any], dict[str, Any]]:
        """Like :meth:`run`, but hands the saved tensors back as they are: in one process
        there is nothing to serialize, and copying gigabytes of saves would dominate."""
        self.host(model)  # deployed, or a LookupError naming those that are
        values, meta, decoded = self.queues[model].run_plan(plan, limits, timeout)
        remote = [n.id for n in decoded.nodes if n.op == SAVE and n.kwargs.get("remote")]
        if remote:  # in process a remote save is the tensor itself, with the same API
            values = wrap_local(values, remote)
            for i in remote:
                for v in values[i] if isinstance(values.get(i), list) else [values.get(i)]:
                    if v is not None:
                        self.remote.add(model, v)
        return values, meta

    def run_session_values(self, model: str, session: bytes, *, timeout: float | None = None,
                           limits: Limits | None = None
                           ) -> list[tuple[dict[int, Any], dict[str, Any]]]:
        """Run a session envelope (:mod:`tpmlab.ir.session`) as one request: its traces in
        order, the values they keep for each other held in this process meanwhile; each
        trace's saved values and metadata, as :meth:`run_values` gives them."""
        host = self.host(model)
        limits = request_limits(host.limits, limits)
        plans = decode_session(session, max_bytes=limits.max_plan_bytes)
        results = self.queues[model].run_alone(lambda: host.run_session(plans, limits=limits))
        out = []
        for plan, (values, meta) in zip(plans, results):
            remote = [n.id for n in plan.nodes if n.op == SAVE and n.kwargs.get("remote")]
            if remote:
                values = wrap_local(values, remote)
                for i in remote:
                    for v in values[i] if isinstance(values.get(i), list) else [values.get(i)]:
                        if v is not None:
                            self.remote.add(model, v)
            out.append((values, meta))
        return out

    def release_remote(self, model: str | None = None) -> int:
        """Release the remote values handed out (of ``model``); how many."""
        return self.remote.release(model)

    def weight_restores(self) -> dict[str, int]:
        """By model: requests that wrote into the deployed weights since it was deployed here
        (each failed with WeightsChangedError, the weights restored from the source)."""
        return {name: host.weights.restores for name, host in self.hosts.items()}

    def undeploy(self, name: str) -> None:
        self.remote.release(name)
        self.hosts.pop(name, None)
        queue = self.queues.pop(name, None)
        if queue is not None:
            queue.close()

    def close(self) -> None:
        self.remote.release()
        for name in list(self.hosts):
            self.undeploy(name)
