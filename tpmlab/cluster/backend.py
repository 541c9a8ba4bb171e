"""``DaskBackend``: the :class:`~tpmlab.runtime.backend.Backend` that runs plans on
pipeline stages held by Dask workers.

* ``deploy`` splits the model's layers into stages balanced by parameter bytes
  (:mod:`.partition`), places one actor per stage (:mod:`.placement`: one stage per
  GPU on workers with a ``GPU`` resource, else CPU workers), each loading only its
  own weights, links each stage to the next, and publishes the deployment on the
  scheduler (:mod:`.deployments`) so other clients attach to it.
* ``run`` hands the plan bytes to stage 0's actor (which validates it and drives the
  pipeline) and, at the same time, to every later stage's ``collect``; hidden states
  go from stage to stage directly (:mod:`.actor`), and each stage's saved values come
  straight from that stage to the client, once, all stages in parallel. The client
  assembles the result bytes, and the result's ``node_seconds`` from every stage's.
  Both calls go straight through the client's connection pool (:meth:`DaskBackend._call`).
* A request's ``limits`` travel with both calls; each stage holds its own nodes to them,
  and the bytes saved so far travel along the chain, so the request's total over all
  stages and steps stays within ``max_saved_bytes`` (:mod:`.actor`).
* Remote saves (``.save(remote=True)``) stay on their stage's worker (:mod:`.remote_store`);
  the result carries a handle for each, which ``run_values`` turns into a
  :class:`~tpmlab.remote.RemoteValue` over a Dask future pinned to that worker. Each
  stage accounts them under this client's id; :meth:`DaskBackend.remote_usage` reads it.
* Faults: if a stage's worker dies during a request, the request fails with
  :class:`StageLostError` (it is not retried: a plan may have side effects the user
  wants to see once, and a retry would hide a flapping worker); before raising, the
  lost stages are loaded again on live workers and relinked, so the next request
  works. Every wait has a deadline and raises
  :class:`~tpmlab.errors.RequestTimeoutError` naming what did not answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import Any

import torch
from distributed import Client, Future, fire_and_forget
from distributed.protocol import to_serialize
from distributed.security import Security

from ..errors import ExecutionError, PlanError, RequestTimeoutError
from ..ir.codec import dtype_name, encode_result
from ..ir.model_info import START, ModelInfo
from ..ir.session import split_session
from ..ir.validate import Limits
from ..remote import RemoteValue, RemoteValues
from ..runtime.limits import limits_to_wire
from . import cleanup, deployments, quiet_profiler, stage_link
from .actor import StageActor, pad_token_id
from .deployments import DeploymentRecord
from .embedded import start_local_cluster
from .errors import DeploymentError, StageLostError
from .handover import local_token, unpack
from .partition import StageSpan, part_bytes, split_layers
from .placement import Placement, gpu_count, place_stages
from .remote_store import RemoteHandle
from .remote_store import free as free_remote
from .remote_store import take as take_remote
from .wire import from_wire

SETUP_TIMEOUT = 300.0  # seconds to load one stage's weights and answer
POLL = 1.0  # seconds between liveness checks while a request runs


def _worker_addresses(dask_scheduler: Any) -> list[str]:
    return list(dask_scheduler.workers)


@dataclass
class Deployment(DeploymentRecord):
    """One model's stages as this client sees them: the published record, the stage
    actors it calls, and whether this client deployed them (``owner``: it unpublishes them
    when it lets go)."""

    actors: list[Any] = field(default_factory=list)
    owner: bool = False


class DaskBackend:
    """Runs plans on a model split into pipeline stages over Dask workers.

    ``address``: a scheduler (``"tls://host:port"``), or ``None`` to start an embedded
    :class:`distributed.LocalCluster` of worker processes sized to this machine, speaking
    TLS under credentials made for it (``n_workers`` and other ``LocalCluster`` options
    may be given). ``security``: the :class:`distributed.security.Security` to connect (or
    start the embedded cluster) with. ``client``: use an existing
    :class:`distributed.Client` instead. ``timeout``: default seconds a request
    may take. ``threads``: torch threads per stage (default: the worker's cores).
    ``handover``: stages on this host hand large saved values over through shared memory
    (:mod:`.handover`); ``False``: every value travels through Dask's comms.
    """

    def __init__(self, address: str | None = None, *, client: Client | None = None,
                 n_workers: int | None = None, timeout: float = 600.0,
                 connect_timeout: float = 60.0, threads: int | None = None,
                 limits: Limits = Limits(), security: Security | None = None,
                 handover: bool = True, **cluster_options: Any) -> None:
        self.cluster = None
        if client is not None:
            self.client = client
            self._own_client = False
        else:
            if address is None:
                self.cluster = start_local_cluster(n_workers, security=security,
                                                   **cluster_options)
                address = self.cluster
            self.client = Client(address, timeout=connect_timeout, security=security)
            self._own_client = True
        self.timeout = timeout
        self.threads = threads
        self.limits = limits
        self.handover = local_token() if handover else None  # who may receive shared memory
        # direct channels to stages on this host, by actor key (None: none, through Dask)
        self._links: dict[str, stage_link.LinkClient | None] = {}
        self._links_lock = threading.Lock()  # a gateway's request threads call at once
        # over TCP even to stages on this host (None: as TPMLAB_STAGE_LINK says), to measure
        # the channel that stages on other hosts get (benchmarks/handover.py)
        self._link_network: bool | None = None
        self.deployments: dict[str, Deployment] = {}
        self.phases: list[dict[str, float]] | None = None  # a list: each request's phases (ms)
        self.remote = RemoteValues()  # remote saves handed to the notebook, by model

    # -- cluster facts -----------------------------------------------------------------------------
    def workers(self) -> dict[str, dict[str, Any]]:
        """The scheduler's live workers: ``{address: {"resources": ..., ...}}``."""
        return dict(self.client.scheduler_info(n_workers=-1)["workers"])

    def live_addresses(self) -> set[str]:
        return set(self.client.run_on_scheduler(_worker_addresses))

    # -- deploy ------------------------------------------------------------------------------------
    def deploy(self, name: str, *, stages: int | None = None, dtype: str | torch.dtype | None = None,
               **options: Any) -> ModelInfo:
        """Deploy ``name`` as ``stages`` pipeline stages (default 1), or attach to the cluster's
        existing deployment of the same model and version. Returns its :class:`ModelInfo`."""
        if name in self.deployments:
            return self.deployments[name].info
        from ..models import resolve
        from ..models.sources import model_dtype

        dtype = model_dtype(dtype) if dtype is not None else None  # a clear error, before a lock
        source = resolve(name)
        key = deployments.deployment_key(name, source.version)
        lock = deployments.deploy_lock(self.client, key)
        if not lock.acquire(timeout=SETUP_TIMEOUT):
            raise RequestTimeoutError(f"another client has been deploying {name} for over "
                                      f"{SETUP_TIMEOUT:.0f}s")
        try:
            record = deployments.lookup(self.client, key)
            if record is not None:
                dep = self._attach(record, owner=False)
            else:
                dep = self._deploy_new(name, source, key, stages or 1, dtype)
        finally:
            lock.release()
        self.deployments[name] = dep
        return dep.info

    def _attach(self, record: DeploymentRecord, *, owner: bool) -> Deployment:
        actors = [_result(f, SETUP_TIMEOUT, "a stage of the published deployment")
                  for f in record.futures]
        return Deployment(**vars(record), actors=actors, owner=owner)

    def _deploy_new(self, name: str, source: Any, key: str, n_stages: int,
                    dtype: torch.dtype | None) -> Deployment:
        cleanup.install(self.client)  # released stages free their memory promptly
        quiet_profiler.install(self.client)  # no stack sampling beside a stage's thread
        workers = self.workers()
        on_gpu = any(gpu_count(w) for w in workers.values())
        if dtype is None:
            dtype = torch.bfloat16 if on_gpu else torch.float32
        layer_bytes, first, last = part_bytes(source.meta_model(), source.adapter, dtype)
        try:
            spans = split_layers(layer_bytes, first, last, n_stages)
        except ValueError as e:
            raise DeploymentError(f"{name}: {e}") from None
        taken = [p for rec in deployments.list_deployments(self.client) for p in rec.placements]
        placements = place_stages(workers, n_stages, taken=taken)
        specs = [self._spec(name, source.version, span, place, dtype)
                 for span, place in zip(spans, placements)]
        futures = [self._submit(spec, place) for spec, place in zip(specs, placements)]
        # the tokenizer (its pad id goes to the stages) is read while the stages load
        reader = ThreadPoolExecutor(1)
        pad = reader.submit(lambda: pad_token_id(source.tokenizer()))
        reader.shutdown(wait=False)
        try:
            actors = [_result(f, SETUP_TIMEOUT, f"loading stage {i} of {name}")
                      for i, f in enumerate(futures)]
            described = [_result(a.describe(), SETUP_TIMEOUT, f"stage {i} of {name}")
                         for i, a in enumerate(actors)]
        except Exception as e:
            for f in futures:
                f.release()
            if isinstance(e, RequestTimeoutError):
                raise
            raise DeploymentError(f"could not load {name} as {n_stages} stages: "
                                  f"{type(e).__name__}: {e}") from e
        info = self._model_info(name, source, dtype, described, placements, spans)
        info.extra["pad_id"] = pad.result()
        dep = Deployment(key=key, info=info, futures=futures, actors=actors, placements=placements,
                         spans=spans, specs=specs, owner=True)
        self._link(dep, range(n_stages))
        self._publish(dep)
        return dep

    def _spec(self, name: str, version: str, span: StageSpan, place: Placement,
              dtype: torch.dtype) -> dict[str, Any]:
        # the version travels with the spec: a stage never digests the whole checkpoint
        return {"model": name, "version": version, "index": span.index, "n_stages": span.n_stages,
                "first": span.first, "last": span.last, "nbytes": span.nbytes, "device": place.device,
                "dtype": dtype_name(dtype), "threads": self.threads,
                "limits": {k: getattr(self.limits, k) for k in self.limits.__dataclass_fields__}}

    def _submit(self, spec: dict[str, Any], place: Placement) -> Future:
        return self.client.submit(StageActor, spec, actor=True, workers=[place.worker],
                                  allow_other_workers=False, pure=False,
                                  key=f"tpmlab-stage{spec['index']}-{spec['model']}-"
                                      f"{uuid.uuid4().hex[:8]}")

    @staticmethod
    def _model_info(name: str, source: Any, dtype: torch.dtype, described: list[dict[str, Any]],
                    placements: list[Placement], spans: list[StageSpan]) -> ModelInfo:
        events: list[str] = []
        shapes: dict[str, Any] = {}
        starts = []
        for i, d in enumerate(described):
            starts.append(START if i == 0 else len(events))
            events += d["events"]
            shapes.update(d["shapes"])
        meta = source.meta_model(dtype)
        params = {n: [list(p.shape), dtype_name(p.dtype)]
                  for n, p in meta.named_parameters(remove_duplicate=False)}
        return ModelInfo(name=name, version=described[0]["version"], family=described[0]["family"],
                         dtype=dtype_name(dtype), events=events, shapes=shapes,
                         modules=[n for n, _ in meta.named_modules()], params=params,
                         vocab_size=meta.get_input_embeddings().num_embeddings,
                         stage_starts=starts, stage_workers=[s.worker for s in placements],
                         extra={"stage_layers": [[s.first, s.last] for s in spans],
                                "stage_devices": [s.device for s in placements],
                                "stage_bytes": [d["nbytes"] for d in described]})

    def _link(self, dep: Deployment, stages: range | list[int]) -> None:
        info = dep.info.to_dict()
        calls = []
        for k in sorted(set(stages)):
            nxt = dep.actors[k + 1] if k + 1 < len(dep.actors) else None
            calls.append((k, dep.actors[k].link(nxt, info)))
        for k, call in calls:
            _result(call, SETUP_TIMEOUT, f"linking stage {k}")

    def _publish(self, dep: Deployment) -> None:
        deployments.publish(self.client, dep)

    # -- run ---------------------------------------------------------------------------------------
    def deployment(self, name: str) -> Deployment:
        if name not in self.deployments:
            raise LookupError(f"model {name!r} is not deployed here; deployed: "
                              f"{sorted(self.deployments)}")
        return self.deployments[name]

    def run(self, model: str, plan: bytes, *, timeout: float | None = None,
            limits: Limits | None = None) -> bytes:
        """Run plan bytes on ``model``'s stages; returns result bytes. ``limits`` tighten
        the stages' own for this request (a gateway passes the user's tier limits).

        Raises the plan's own errors (:class:`PlanError`, :class:`ExecutionError`),
        :class:`StageLostError` when a stage's worker died (the deployment is healed
        before it is raised) or :class:`RequestTimeoutError` after ``timeout`` seconds.
        """
        values, meta = self.run_values(model, plan, timeout=timeout, limits=limits)
        values = {k: _fetched(v) for k, v in values.items()}  # bytes carry no futures
        start = time.perf_counter()
        blob = encode_result(values, meta)
        if self.phases is not None and self.phases:
            self.phases[-1]["client encode"] = (time.perf_counter() - start) * 1e3
        return blob

    def run_values(self, model: str, plan: bytes, *, timeout: float | None = None,
                   limits: Limits | None = None) -> tuple[dict[int, Any], dict[str, Any]]:
        """Like :meth:`run`, but the saved tensors as they arrived from the stages: the
        notebook's own client has them in hand, and encoding gigabytes would only copy them."""
        dep = self.deployment(model)
        timeout = timeout or self.timeout
        req = uuid.uuid4().hex
        wire_limits = limits_to_wire(limits)
        t0, sent_at = time.perf_counter(), time.time()
        deadline = time.monotonic() + timeout
        try:
            # the plan goes to every stage at once: stage 0 runs it, later stages decode it
            # meanwhile and hand over their saves as soon as they have them
            futures = [self._call(dep, 0, "run", plan, req, timeout, wire_limits,
                                  self.handover, self.client.id)]
            futures += [self._call(dep, k, "collect", plan, req, timeout, wire_limits,
                                   self.handover) for k in range(1, len(dep.actors))]
        except RuntimeError as e:  # "Worker holding Actor was lost"
            self._fail_lost(dep, e)
        t1 = time.perf_counter()
        try:
            head = self._wait(dep, req, futures[0], deadline, model, timeout)
            t2, received_at = time.perf_counter(), time.time()
            values, meta = self._gather(dep, req, head, futures[1:], deadline, model, timeout)
        except (KeyboardInterrupt, OSError):
            # interrupted (failed waits abort in _wait): the stages free what they handed over
            self._abort(dep, req)
            raise
        t3 = time.perf_counter()
        if self.phases is not None:
            arrived, left = head.get("stamps", (sent_at, received_at))
            self.phases.append({**head["phases"], "client send": (t1 - t0) * 1e3,
                                "client wait run": (t2 - t1) * 1e3,
                                "client collect": (t3 - t2) * 1e3,
                                "hop client -> stage0": (arrived - sent_at) * 1e3,
                                "hop stage0 -> client": (received_at - left) * 1e3})
        return values, meta

    def run_session_values(self, model: str, session: bytes, *, timeout: float | None = None,
                           limits: Limits | None = None
                           ) -> list[tuple[dict[int, Any], dict[str, Any]]]:
        """Run a session envelope (:mod:`tpmlab.ir.session`) as one request: stage 0 validates
        it as a whole and drives its traces in order (:meth:`StageActor.run_session`); the
        values traces keep for each other stay on the stages; each later stage hands each
        trace's saves to the client as for :meth:`run_values`. Each trace's saved values
        and metadata, in order."""
        dep = self.deployment(model)
        timeout = timeout or self.timeout
        req = uuid.uuid4().hex
        blobs = split_session(session)
        subs = [f"{req}.{k}" for k in range(len(blobs))]
        wire_limits = limits_to_wire(limits)
        deadline = time.monotonic() + timeout
        try:
            head_future = self._call(dep, 0, "run_session", session, req, timeout, wire_limits,
                                     self.handover, self.client.id)
            later = [[self._call(dep, k, "collect", blob, sub, timeout, wire_limits,
                                 self.handover) for k in range(1, len(dep.actors))]
                     for blob, sub in zip(blobs, subs)]
        except RuntimeError as e:  # "Worker holding Actor was lost"
            self._fail_lost(dep, e)
        out = []
        try:
            heads = self._wait(dep, req, head_future, deadline, model, timeout)
            for head, futures in zip(heads, later):
                out.append(self._gather(dep, req, head, futures, deadline, model, timeout))
        except BaseException:
            for sub in subs:  # the stages free what the session held
                self._abort(dep, sub)
            raise
        return out

    def _gather(self, dep: Deployment, req: str, head: dict[str, Any], later: list[Any],
                deadline: float, model: str, timeout: float
                ) -> tuple[dict[int, Any], dict[str, Any]]:
        """One trace's saved values and metadata: stage 0's answer ``head`` joined with what
        each later stage's ``collect`` (``later``) hands over (saves, node times, and what a
        backward kept there)."""
        # one call: a bundle of small arrays (one shared-memory file) may hold both
        head_values, head_saves = unpack((head["values"], head["saves"]),
                                         functools.partial(self._give_back, dep, 0))
        values = from_wire(head_values)
        values.update(from_wire(head_saves))
        meta = head["meta"]
        node_seconds = dict(meta["node_seconds"])
        for stage, f in enumerate(later, start=1):
            output = self._wait(dep, req, f, deadline, model, timeout)
            values.update(from_wire(unpack(output["saves"],
                                           functools.partial(self._give_back, dep, stage))))
            if "autograd_bytes" in meta:
                meta["autograd_bytes"].append(output.get("autograd_bytes", 0))
                meta["backward_seconds"] += output.get("backward_seconds", 0.0)
            for node, seconds in output["node_seconds"].items():
                node_seconds[node] = node_seconds.get(node, 0.0) + seconds
        meta["node_seconds"] = node_seconds
        return {k: self._remote_values(model, v) for k, v in values.items()}, meta

    def _give_back(self, dep: Deployment, stage: int, names: list[str]) -> None:
        """Tell stage ``stage`` that this process unmapped the hand-over segments ``names``
        (on the unmapping thread, :func:`.handover.unpack`): back into its pool. Not
        waited for; a stage gone or undeployed meanwhile has nothing to take back."""
        if dep is not self.deployments.get(dep.info.name):
            return
        try:
            future = self._call(dep, stage, "take_back", names)
        except Exception:  # noqa: BLE001 - the stage's worker is lost, or the client closed
            return
        future.add_done_callback(_quiet)

    def _remote_values(self, model: str, value: Any) -> Any:
        """A remote save's handle (or list of them, per generation step) as a
        :class:`RemoteValue`: a future of a task that takes the array from the stage's store
        into its worker's memory, where Dask keeps it while the notebook holds the future."""
        if isinstance(value, list) and value and isinstance(value[0], RemoteHandle):
            return [self._remote_values(model, v) for v in value]
        if not isinstance(value, RemoteHandle):
            return value
        where = {"workers": [value.worker], "allow_other_workers": False, "pure": False}
        future = self.client.submit(take_remote, value.key, key=f"tpmlab-remote-{value.key}",
                                    **where)
        client, key = self.client, value.key

        def free_untaken() -> None:  # the take may never run once its future is released
            with contextlib.suppress(Exception):
                fire_and_forget(client.submit(free_remote, [key], **where))

        out = RemoteValue(shape=value.shape, dtype=value.dtype, nbytes=value.nbytes,
                          worker=value.worker, future=future, on_release=free_untaken)
        self.remote.add(model, out)
        return out

    def remote_usage(self, name: str) -> list[dict[str, dict[str, int]]]:
        """Per stage of ``name``: the remote saves its worker holds, ``{owner (a client id):
        {"bytes", "values", "untaken"}}`` (``untaken``: not yet moved into Dask's memory)."""
        dep = self.deployment(name)
        return [_result(a.remote_usage(), 60, f"stage {k}") for k, a in enumerate(dep.actors)]

    def release_remote(self, model: str | None = None) -> int:
        """Free every remote value this client holds (of ``model``); how many."""
        return self.remote.release(model)

    def _call(self, dep: Deployment, stage: int, method: str, *args: Any
              ) -> concurrent.futures.Future:
        """Call ``method`` of stage ``stage``'s actor, as Dask's actor handle does (the
        worker's ``actor_execute``), straight through the client's connection pool, on the
        client's event loop; the answer (or the stage's exception) comes back in a plain
        future the caller's thread waits on. Dask's handle waits through two more hand-offs
        between the loop and the caller's thread: a bare round trip took 1.19 ms through it
        against 0.62 ms this way (2-core CPU, TLS). A stage on this host is called over its
        stage link (:mod:`.stage_link`) from the call after its first one on: 0.74 against
        1.91 ms for a tiny trace's round trip to stage 0 beyond the stage's work.
        ``RuntimeError`` at once if the stage's worker is known lost, as from the handle."""
        status = dep.futures[stage].status
        if status not in ("finished", "pending"):
            raise RuntimeError(f"Worker holding Actor was lost.  Status: {status}")
        worker, key = dep.placements[stage].worker, dep.actors[stage].key
        link = self._links.get(key)
        if link is not None and link.alive and stage_link.ACTIVE:
            call = _over_link(link, method, *args)
        else:
            with self._links_lock:  # the first call: a stage on this host gets a link
                first = key not in self._links
                if first:
                    self._links[key] = None  # for the calls after this one
            if first:
                asyncio.run_coroutine_threadsafe(self._link_to(worker, key),
                                                 self.client.loop.asyncio_loop)
            call = actor_call(self.client, worker, key, method, *args)
        return asyncio.run_coroutine_threadsafe(call, self.client.loop.asyncio_loop)

    async def _link_to(self, worker: str, key: str) -> None:
        """Connect a direct channel to the stage ``key`` (:mod:`.stage_link`: a Unix socket
        on this host, TCP or TLS to another); until then, and if none, its calls go through
        Dask."""
        link = await stage_link.link_to(
            lambda token, network: actor_call(self.client, worker, key, "stage_link", token,
                                              network),
            self.client.security, role="client", network=self._link_network)
        if link is not None and key in self._links:
            self._links[key] = link
        elif link is not None:  # undeployed meanwhile
            link.close()

    def _unlink(self, keys: list[str]) -> None:
        for key in keys:
            link = self._links.pop(key, None)
            if link is not None:
                self.client.loop.add_callback(link.close)

    def _wait(self, dep: Deployment, req: str, future: Any, deadline: float, model: str,
              timeout: float) -> Any:
        """One actor call's answer, checking the stages' workers while waiting."""
        while True:
            try:
                return future.result(timeout=max(0.001, min(POLL, deadline - time.monotonic())))
            except (FuturesTimeout, TimeoutError):
                if time.monotonic() >= deadline:
                    self._abort(dep, req)
                    raise RequestTimeoutError(
                        f"the request on {model} ran past its timeout of {timeout:.0f}s "
                        "(pass a larger timeout= to trace/generate)") from None
                if self._lost_stages(dep):
                    self._fail_lost(dep, None)
            except (PlanError, ExecutionError, RequestTimeoutError):
                self._abort(dep, req)
                raise
            except Exception as e:  # a lost worker shows up as a comm or actor error
                if self._lost_stages(dep):
                    self._fail_lost(dep, e)
                self._abort(dep, req)
                raise

    def _abort(self, dep: Deployment, req: str) -> None:
        try:
            dep.actors[0].abort(req).result(timeout=10)
        except Exception:
            pass

    # -- faults ------------------------------------------------------------------------------------
    def _lost_stages(self, dep: Deployment) -> list[int]:
        live = self.live_addresses()
        return [k for k, s in enumerate(dep.placements) if s.worker not in live]

    def _fail_lost(self, dep: Deployment, cause: BaseException | None) -> None:
        lost = self._lost_stages(dep)
        names = ", ".join(f"stage {k} (layers {dep.spans[k].first}-{dep.spans[k].last}) on "
                          f"{dep.placements[k].worker}" for k in lost) or "a stage"
        try:
            self.heal(dep.info.name)
            healed = "the stages were loaded again on live workers; run the request again"
        except Exception as e:  # keep the original failure visible
            healed = f"re-placing the stages failed too ({type(e).__name__}: {e})"
        raise StageLostError(f"{names} lost its worker during the request; {healed}") from cause

    def heal(self, name: str) -> list[int]:
        """Load the stages whose workers are gone again on live workers and relink the chain.

        If another client already healed the deployment, adopt its stages. Returns the
        indices of the stages that were re-placed here.
        """
        dep = self.deployment(name)
        lock = deployments.deploy_lock(self.client, dep.key)
        if not lock.acquire(timeout=SETUP_TIMEOUT):
            raise RequestTimeoutError(f"could not lock deployment {dep.key} to heal it")
        try:
            record = deployments.lookup(self.client, dep.key)
            if record is not None and [f.key for f in record.futures] != [f.key for f in dep.futures]:
                dep = self.deployments[name] = self._attach(record, owner=dep.owner)
            lost = self._lost_stages(dep)
            if not lost:
                return []
            live = self.live_addresses()
            workers = {a: w for a, w in self.workers().items() if a in live}
            keep = [s for k, s in enumerate(dep.placements) if k not in lost]
            for k in lost:
                place = place_stages(workers, 1, taken=keep)[0]
                spec = {**dep.specs[k], "device": place.device}
                old = dep.futures[k]
                dep.futures[k] = self._submit(spec, place)
                dep.actors[k] = _result(dep.futures[k], SETUP_TIMEOUT, f"re-loading stage {k}")
                dep.placements[k], dep.specs[k] = place, spec
                keep.append(place)
                self._unlink([old.key])
                old.release()
            dep.info.stage_workers = [s.worker for s in dep.placements]
            dep.info.extra["stage_devices"] = [s.device for s in dep.placements]
            self._link(dep, sorted({j for k in lost for j in (k - 1, k) if j >= 0}))
            self._publish(dep)
            return lost
        finally:
            lock.release()

    # -- tear down ---------------------------------------------------------------------------------
    def memory(self, name: str) -> list[dict[str, Any]]:
        """Per stage: the stage's bytes (``stage_bytes``), its worker's resident and peak
        resident bytes now (``rss``, ``peak_rss``; with ``cuda_peak``/``cuda_allocated`` on a
        GPU), and what loading the stage cost that worker, measured there
        (:mod:`tpmlab.runtime.load_meter`): ``load_seconds``, ``read_bytes`` (bytes read
        through ``read``, page cache or disk), ``disk_read_bytes``, ``rss_before``,
        ``resident_growth``, ``load_host_peak`` and ``load_cuda_peak``; requests in flight
        (``requests``, ``held``; ``kept``: sessions holding values for a later trace) and the gradient state they still hold
        (:func:`~tpmlab.runtime.backward.held`: ``autograd_states``, ``autograd_bytes``)."""
        dep = self.deployment(name)
        return [_result(a.memory(), 60, f"stage {k}") | {"worker": dep.placements[k].worker}
                for k, a in enumerate(dep.actors)]

    def weight_restores(self) -> dict[str, int]:
        """By model: requests that wrote into a stage's deployed weights (each failed with
        WeightsChangedError, the stage's weights restored from the source), over all stages."""
        return {name: sum(_result(a.weight_restores(), 60, f"stage {k} of {name}")
                          for k, a in enumerate(dep.actors))
                for name, dep in self.deployments.items()}

    def undeploy(self, name: str) -> None:
        """Drop this client's hold on ``name``; the owner also removes it from the cluster
        (its actors, and their memory, go once no client holds them)."""
        self.remote.release(name)
        dep = self.deployments.pop(name, None)
        if dep is None:
            return
        if dep.owner:
            record = deployments.lookup(self.client, dep.key)
            if record is not None and [f.key for f in record.futures] == [f.key for f in dep.futures]:
                deployments.unpublish(self.client, dep.key)
        self._unlink([a.key for a in dep.actors])
        for f in dep.futures:
            f.release()
        dep.actors.clear()
        # Each client-side actor handle holds a future on its stage's key; handles caught in
        # reference cycles (the traceback of a failed or timed-out request) would keep the
        # stage, and its memory, alive until the collector happens to run.
        gc.collect()

    def close(self) -> None:
        self.remote.release()
        for name in list(self.deployments):
            try:
                self.undeploy(name)
            except Exception:
                pass
        if self._own_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


async def _over_link(link: stage_link.LinkClient, method: str, *args: Any) -> Any:
    return await link.call(method, *args)


async def actor_call(client: Client, address: str, key: str, method: str, *args: Any) -> Any:
    """``method`` of the actor ``key`` on worker ``address``, called as Dask's actor handle
    calls it (the worker's ``actor_execute``) through ``client``'s connection pool, on its
    event loop: the method's answer, or the exception it raised there."""
    answer = await client.rpc(address).actor_execute(
        function=method, actor=key, args=[to_serialize(a) for a in args], kwargs={})
    if answer["status"] != "OK":
        raise answer["exception"]
    return answer["result"]


def _quiet(future: concurrent.futures.Future) -> None:
    """Retrieve a call's outcome nobody waits for (a failure is not worth a warning)."""
    if not future.cancelled():
        future.exception()


def _fetched(value: Any) -> Any:
    if isinstance(value, RemoteValue):
        try:
            return value.fetch()
        finally:
            value.release()
    if isinstance(value, list):
        return [_fetched(v) for v in value]
    return value


def _result(future: Any, timeout: float, what: str) -> Any:
    try:
        return future.result(timeout=timeout)
    except (FuturesTimeout, TimeoutError):
        raise RequestTimeoutError(f"{what} did not answer within {timeout:.0f}s") from None
