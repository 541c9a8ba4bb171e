"""The Dask actor that holds one pipeline stage on its worker.

A request travels down the chain of stage actors, each calling the next one's
:meth:`StageActor.step` directly from its own worker (no hop through the client
or the scheduler); the reply travels back the same way and carries only what the
driver needs (while generating, the next tokens), never saved values.

* The client calls stage 0's :meth:`StageActor.run` and, at the same moment, every
  later stage's :meth:`StageActor.collect`, each with the plan bytes: so the plan
  travels once to every stage, each later stage decodes it while stage 0 works,
  and only stage 0 validates it (:mod:`tpmlab.runtime.request`: ``admit`` there,
  ``follow`` on the others). Each stage keeps what it learned from a plan's bytes
  (:class:`~tpmlab.runtime.plan_cache.PlanCache`): a repeated plan is not decoded or
  validated again.
* Stage 0's ``run`` validates the plan, builds the padded batch and drives the steps
  (one for a trace; for a generation the decoding loop of :mod:`tpmlab.runtime.decoding`,
  one step per token, the last stage picking the tokens, then a :meth:`finish` down the
  chain); it returns stage 0's own saves with the request's metadata.
* Every later stage keeps its request's output (:class:`StageOutput`: saves as host
  copies, and the time of each plan node it ran) keyed by request id until
  its ``collect`` hands them to the client, straight from that stage and once; a
  trace's saves are ready as soon as the stage's own layers ran, so they travel while
  later stages compute. Saves and state are dropped when handed over, when the
  request fails or is aborted, and past the request's deadline.
* Every stage keeps a request's state (its :class:`PlanRunner`, the KV cache while
  generating) keyed by request id, and drops it when the request ends, fails or is
  aborted; a failing request never leaves state behind for the next one.
* A request's limits (the caller's, tightened to the stage's own) travel with ``run`` and
  ``collect``; every stage holds its own nodes to them. The bytes saved so far, over all
  stages and steps, travel down the chain with each step and back up with its reply,
  so every stage checks the request's *total* against ``max_saved_bytes`` before a save
  leaves it.
* Methods are coroutines, so a stage's event loop is free while it waits on the
  next stage; the compute runs in one thread per stage. Two stages may therefore
  share a worker without blocking each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import resource
import statistics
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch

from ..errors import ExecutionError, RequestTimeoutError
from ..ir.model_info import START, ModelInfo
from ..ir.plan import SAVE, Plan
from ..ir.schedule import Schedule
from ..ir.session import MAX_TRACES, check_session, decode_session, imports_of
from ..ir.validate import Limits
from ..runtime import compute_threads, host_malloc, request
from ..runtime.backward import forget_frames, held, registry, weight_storages
from ..runtime.batching import BatchLayout, build_batch
from ..runtime.decoding import Decoding, eos_ids, needs_history, next_step_inputs, next_tokens
from ..runtime.footprints import Footprints
from ..runtime.limits import limits_from_wire, request_limits
from ..runtime.load_meter import LoadMeter
from ..runtime.plan_cache import PlanCache
from ..runtime.runner import PlanRunner, StopForward
from ..runtime.weights import WeightGuard
from . import cuda_ipc, pinned_segments, stage_link
from .backward import stage_backward
from .compute_gaps import Gaps
from .handover import TAKE_BACK_MAX, Segments, Token
from .partition import StageSpan
from .remote_store import STORE, to_array
from .stage import StageModel
from .wire import from_wire, to_wire


@dataclass
class _Request:
    """One request's state on one stage."""

    plan: Plan
    runner: PlanRunner
    layout: BatchLayout
    generate: bool
    cache: Any = None
    # while generating: the last step's attention mask and position ids on the stage's device
    # (a decode step's message carries neither: :meth:`StageActor._step_inputs`), and on the
    # last stage the sequences so far where choosing a token reads them
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # parts of this step's phases measured inside them (seconds), added to its timings:
    # the hidden state's copy to host, the backward's parts (:func:`.backward.stage_backward`)
    times: dict[str, float] = field(default_factory=dict)


class StageOutput(TypedDict):
    """What one stage hands the client at the end of a request."""

    saves: dict[int, Any]  # saved values by node id (wire form)
    node_seconds: dict[int, float]  # seconds each plan node run here took, over all steps
    autograd_bytes: int  # what autograd kept here for the request's backward (0: none)
    backward_seconds: float  # the backward's own time here (its plan nodes are timed apart)


GRACE = 5.0  # seconds a request's leftovers may outlive its deadline before a sweep drops them
ENDED_TTL = 120.0  # seconds an aborted request's id is remembered (a late collect returns at once)
#: what the previous stage and the notebook's client may call through the stage link
#: (:mod:`.stage_link`); the rest (linking, abort, memory, ...) goes through Dask
LINK_CALLS = frozenset({"step", "finish", "ipc_ack", "run", "collect", "run_session",
                        "take_back"})


class _Slot:
    """What one request's client hand-off needs on one later stage: the decoded plan (from
    :meth:`StageActor.collect`, with the request's limits) and the stage's output (from its
    last step or ``finish``).
    Each is a future whose value may be an exception (raised by the reader)."""

    __slots__ = ("deadline", "plan", "output", "handover")

    def __init__(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        self.deadline = deadline
        self.handover: Token | None = None  # the client's, with the plan: who maps the saves
        self.plan: asyncio.Future = loop.create_future()
        self.output: asyncio.Future = loop.create_future()

    def fail(self, error: BaseException) -> None:
        for f in (self.plan, self.output):
            if not f.done():
                f.set_result(error)


def _raise_if_error(value: Any) -> Any:
    if isinstance(value, BaseException):
        raise value
    return value


async def _await_within(awaitable: Any, deadline: float, what: str) -> Any:
    """Await ``awaitable`` until the monotonic ``deadline``; past it, a RequestTimeoutError.
    A future already done is read at once; otherwise the wait runs in the awaiting task
    (``asyncio.timeout``), not in a task of its own: each stage hop awaits this, and a task
    more costs event-loop turns on the request's critical path."""
    if isinstance(awaitable, asyncio.Future) and awaitable.done():
        return awaitable.result()
    left = max(deadline - time.monotonic(), 0.001)
    try:
        if _timeout is None:  # Python 3.10
            async def wait() -> Any:
                return await awaitable
            return await asyncio.wait_for(wait(), timeout=left)
        async with _timeout(left):
            return await awaitable
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"{what} did not answer before the request's deadline") from None


_timeout = getattr(asyncio, "timeout", None)


class StageActor:
    """Stage ``spec["index"]`` of a deployment; created with ``client.submit(StageActor, spec,
    actor=True, workers=[address])``.

    ``spec``: ``model`` (name), ``index``, ``n_stages``, ``first``/``last`` (decoder
    layers), ``device``, ``dtype``, optional ``threads`` (torch threads; default the
    machine's cores, since the stages of one request run one after another).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        from ..models import resolve

        self.spec = spec
        host_malloc.relax()  # a nanny may have fixed malloc's thresholds: forwards fault anew
        threads = compute_threads.settle(int(spec.get("threads") or os.cpu_count() or 1))
        self.device = torch.device(spec["device"])
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = getattr(torch, spec["dtype"])
        self.span = StageSpan(index=spec["index"], n_stages=spec["n_stages"], first=spec["first"],
                              last=spec["last"], nbytes=spec.get("nbytes", 0))
        self.source = resolve(spec["model"])
        if spec.get("version"):  # the client's digest: this stage reads its own tensors only
            self.source.assume_version(spec["version"])
        # the stage's thread: every op of the stage runs there, its loading included. OpenMP
        # keeps a team of threads for each thread that ever ran a parallel op, and once a
        # process holds more such threads than it has cores, libgomp stops spinning between
        # parallel regions: a forward's threads sleep and wake at every op (a 2-stage CPU
        # trace took 1.3x the in-process one while the Dask thread that loaded the stage kept
        # a team of its own; benchmarks/README.md, "CPU stages").
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"tpmlab-stage{self.span.index}",
                                        initializer=compute_threads.settle, initargs=(threads,))
        try:
            self._pool.submit(self._load).result()
        except BaseException:
            self._pool.shutdown(wait=False)
            raise
        self.frozen = weight_storages(self.stage.model)  # not autograd's memory
        self.footprints = Footprints()  # what the stage's ops keep for a backward, by shape
        self.backprops = registry()  # requests' gradient state here (memory() reports it)
        self.limits = Limits(**spec.get("limits", {}))
        self.next: Any = None  # the next stage's Actor handle
        self.link_next: stage_link.LinkClient | None = None  # to the next stage, direct
        self._link_server: stage_link.LinkServer | None = None  # for the previous stage
        self.info: ModelInfo | None = None
        self.owned: range | None = None
        self.requests: dict[str, _Request] = {}
        self.slots: dict[str, _Slot] = {}
        self.ended: dict[str, float] = {}  # aborted request ids -> when to forget them
        self.kept: dict[str, dict[int, Any]] = {}  # stage 0: a session trace's kept values
        self.plans = PlanCache()  # decoded, validated plans by their bytes: a repeat skips both
        self._meta: dict[str, torch.nn.Module] | None = None
        # saves handed over in shared memory, until taken; on a GPU, copied from the device
        # into segments registered with CUDA (unregistered after the stage's thread's work)
        self.gaps = Gaps()  # the stage thread's computations, which its pool's fill avoids
        self.segments = Segments(pinned_segments.for_device(self.device, self._pool.submit),
                                 self.gaps)
        self.pad_id: int | None = None  # from the model's info (:meth:`link`)
        self.passes = 0  # forward passes (steps) this stage ran its layers for
        self._tok: Any = None  # the tokenizer, once a request needs it
        # remote saves (:mod:`.remote_store`) are accounted under this stage's own name
        self.store_name = f"{spec['model']} stage {self.span.index} ({os.urandom(3).hex()})"
        worker = _worker()
        self.address = worker.address if worker is not None else None
        # the cluster's credentials as this worker holds them: its links' TLS contexts
        self.security = worker.security if worker is not None else None
        # hidden states to the next stage and gradients to the previous one in device memory,
        # where both stages can open it (:mod:`.cuda_ipc`)
        self.ipc_id = os.urandom(4).hex()
        self.ipc_next = cuda_ipc.Sender(f"{self.ipc_id}>")
        self.ipc_prev = cuda_ipc.Sender(f"{self.ipc_id}<")
        self.ipc_in = cuda_ipc.Receiver()
        self._acks: set[asyncio.Task] = set()  # acknowledgements on their way

    def _load(self) -> None:
        """Load this stage's layers (on the stage's thread: :meth:`__init__`)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # per thread
        with LoadMeter(self.device) as meter:
            self.stage = StageModel(self.source, self.span, device=self.device, dtype=self.dtype)
            self.events, self.shapes = self.stage.probe()
            self.weights = WeightGuard(self.stage.model, self.source, dtype=self.dtype)
        self.load = meter.figures  # what loading this stage cost its worker process

    # -- set-up ------------------------------------------------------------------------------------
    async def describe(self) -> dict[str, Any]:
        """What the deployment needs to know: events, shapes, bytes held, where."""
        return {"events": self.events, "shapes": self.shapes, "nbytes": self.stage.nbytes,
                "device": str(self.device), "pid": os.getpid(), "version": self.stage.version,
                "family": self.source.adapter.family}

    async def link(self, next_stage: Any, info: dict[str, Any]) -> None:
        """Set the next stage's actor (``None`` on the last stage) and the model's info; the
        two stages tell each other where their tensors live (:mod:`.cuda_ipc`)."""
        self.next = next_stage
        if self.link_next is not None:  # relinked (a stage was replaced): a new channel
            self.link_next.close()
            self.link_next = None
        peer = None
        if next_stage is not None:
            self.link_next = await stage_link.link_to(next_stage.stage_link, self.security)
            try:
                peer = await asyncio.wait_for(
                    _await_within(next_stage.ipc_hello(cuda_ipc.identity(self.ipc_id)),
                                  time.monotonic() + 30, "the next stage"), 31)
            except Exception:  # noqa: BLE001 - an older or unreachable peer: host memory
                peer = None
        self.ipc_next.link(peer)
        self.info = ModelInfo.from_dict(info)
        self.plans.clear()  # schedules depend on the model's info
        # the deploying client read the tokenizer (≈ 1 s) while the stages loaded
        pad = self.info.extra.get("pad_id")
        self.pad_id = int(pad) if pad is not None else pad_token_id(self.source.tokenizer())
        k = self.span.index
        starts = self.info.stage_starts
        stop = starts[k + 1] if k + 1 < len(starts) else len(self.info.events)
        self.owned = range(START if k == 0 else starts[k], stop)

    async def stage_link(self, token: Token | None = None, network: bool = False
                         ) -> stage_link.Address:
        """Where the previous stage (or the notebook) may call this one directly
        (:mod:`.stage_link`): a Unix socket, and TCP too (TLS on a TLS cluster) for a caller
        whose ``token`` says it runs on another host or that asks for the ``network``."""
        if self._link_server is None:
            self._link_server = await stage_link.LinkServer(self, LINK_CALLS).start()
        if stage_link.wants_network(token, bool(network)):
            endpoint = stage_link.network_endpoint(self.address, self.security)
            if endpoint is not None:
                await self._link_server.listen_network(*endpoint)
        return self._link_server.address()

    def _next_call(self, method: str, *args: Any) -> Any:
        """Call ``method`` on the next stage: through the stage link where there is one (and
        it is up), else through Dask; an awaitable of the result. On the event loop."""
        link = self.link_next
        if link is not None and link.alive and stage_link.ACTIVE:
            return link.call(method, *args)
        return getattr(self.next, method)(*args)

    async def ipc_hello(self, prev: cuda_ipc.Identity) -> cuda_ipc.Identity:
        """The previous stage's :class:`~.cuda_ipc.Identity` in, this one's out (at link time)."""
        self.ipc_prev.link(prev)
        return cuda_ipc.identity(self.ipc_id)

    async def ipc_ack(self, req: str, buffers: list[int]) -> None:
        """The previous stage has copied what request ``req`` handed it in these buffers."""
        self.ipc_prev.release(req, buffers)

    async def ipc_fetch(self, req: str, value: cuda_ipc.IpcTensor) -> Any:
        """The previous stage could not open ``value``: the value itself, the ordinary way."""
        return to_wire(await self._compute(self.ipc_prev.refused, value, req))

    async def ipc(self) -> dict[str, Any]:
        """What the device hand-overs did here (:mod:`.cuda_ipc`): per direction, whether the
        link uses them (``next``/``prev``), values ``sent`` through them or the ``ordinary``
        way, ``refused`` by the peer, ``pool_full``, buffers ``held`` now and kept; and values
        ``received`` and buffers ``opened`` here."""
        out: dict[str, Any] = {}
        for name, sender in (("next", self.ipc_next), ("prev", self.ipc_prev)):
            out[name] = {"active": sender.active, **sender.counts, "held": sender.held(),
                         "buffers": sender.buffers()}
        out["in"] = {**self.ipc_in.counts, "cached": self.ipc_in.opened()}
        return out

    async def memory(self) -> dict[str, Any]:
        """This worker process's memory: resident and peak resident bytes (the peak since
        the last stage load on this worker began), stage bytes, and what loading this stage
        cost (:class:`~tpmlab.runtime.load_meter.LoadMeter`: ``load_seconds``, ``read_bytes``,
        ``disk_read_bytes``, ``rss_before``, ``resident_growth``, ``load_host_peak``,
        ``load_cuda_peak``); ``ipc_held``: device buffers handed to a neighbour and not yet
        acknowledged, ``ipc``: what the device hand-overs did (:meth:`ipc`); ``handover``:
        what the segments registered with CUDA did (:meth:`~.handover.Segments.counts`;
        empty on a stage without); ``recycling``: what its hand-over pool made, lent and
        had back (:meth:`~.handover.Segments.recycling`); ``malloc_relaxed``: whether this
        process set malloc's thresholds for forwards (:mod:`~tpmlab.runtime.host_malloc`);
        ``linked``: whether this stage calls the next one over a stage link
        (:mod:`.stage_link`) now, ``link`` over which (``"unix"``, ``"tcp"``, ``"tls"``;
        ``None``: through Dask); ``passes``: forward steps this stage ran its layers for
        (a pass that a ``tracer.stop()`` ended on an earlier stage is not one)."""
        import psutil

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = {"rss": psutil.Process().memory_info().rss, "peak_rss": peak,
               "stage_bytes": self.stage.nbytes, "requests": len(self.requests),
               "held": len(self.slots), "kept": len(self.kept), "passes": self.passes,
               "ipc_held": self.ipc_next.held() + self.ipc_prev.held(), "ipc": await self.ipc(),
               "handover": self.segments.counts(), "recycling": self.segments.recycling(),
               "malloc_relaxed": host_malloc.relaxed(),
               "linked": self.link_next is not None and self.link_next.alive,
               "link": self.link_next.kind if self.link_next is not None
               and self.link_next.alive else None,
               **self.load, **held(self.backprops)}
        if self.device.type == "cuda":
            out["cuda_peak"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_allocated"] = torch.cuda.memory_allocated(self.device)
        return out

    async def take_back(self, names: list[str]) -> int:
        """Hand-over segments the notebook has unmapped, by the names it got them under,
        back into this stage's pool (:meth:`.handover.Segments.take_back`); how many came
        back. Names this stage did not lend are ignored."""
        if not isinstance(names, list) or len(names) > TAKE_BACK_MAX \
                or not all(isinstance(n, str) for n in names):
            raise TypeError(f"take_back wants a list of at most {TAKE_BACK_MAX} "
                            "segment names")
        return self.segments.take_back(names)

    async def weight_restores(self) -> int:
        """Requests that wrote into this stage's weights (each failed, the weights restored)."""
        return self.weights.restores

    async def abort(self, req: str) -> None:
        """Drop a request's state and saves here and on every later stage (after a failure
        elsewhere); a ``collect`` of it arriving later returns at once."""
        self._drop(req, ExecutionError("the request was aborted"))
        self.segments.free(req)
        self.ipc_next.release(req)
        self.ipc_prev.release(req)
        STORE.free_request(req)
        if self.next is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_await_within(self.next.abort(req), time.monotonic() + 5,
                                                     "the next stage"), 6)

    # -- request bookkeeping -----------------------------------------------------------------------
    def _drop(self, req: str, error: BaseException, st: _Request | None = None) -> None:
        self._let_go(req, st)
        self.kept.pop(req, None)
        slot = self.slots.pop(req, None)
        if slot is not None:
            slot.fail(error)
        self.ended[req] = time.monotonic() + ENDED_TTL

    def _let_go(self, req: str, st: _Request | None = None) -> None:
        """Forget a request's state here; its gradient state (``st``'s, or the one held under
        ``req``) is released in the stage's thread, after whatever of it still runs there."""
        st = self.requests.pop(req, None) or st
        if st is not None and st.runner.gradients is not None:
            self._pool.submit(_release, st)

    def _sweep(self) -> None:
        """Drop what requests left behind past their deadline (a client that never came back)."""
        now = time.monotonic()
        for req in [r for r, s in self.slots.items() if s.deadline + GRACE < now]:
            self._drop(req, RequestTimeoutError("the request ran past its deadline"))
        for req in [r for r, t in self.ended.items() if t < now]:
            del self.ended[req]
        self.ipc_next.sweep(GRACE)
        self.ipc_prev.sweep(GRACE)

    def _slot(self, req: str, deadline: float) -> _Slot:
        slot = self.slots.get(req)
        if slot is None:
            if req in self.ended:
                raise ExecutionError(f"stage {self.span.index}: the request was aborted")
            slot = self.slots[req] = _Slot(deadline)
        return slot

    def _hand_over(self, req: str, output: StageOutput) -> None:
        slot = self.slots.get(req)
        if slot is not None and not slot.output.done():
            slot.output.set_result(output)

    # -- compute -----------------------------------------------------------------------------------
    async def _compute(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._computing,
                                                                  fn, *args)

    def _computing(self, fn: Any, *args: Any) -> Any:
        with self.gaps.computing():  # the pool makes and registers segments between these
            return fn(*args)

    def _meta_modules(self) -> dict[str, torch.nn.Module]:
        if self._meta is None:
            self._meta = dict(self.source.meta_model().named_modules())
        return self._meta

    def _new_request(self, plan: Plan, schedule: Schedule, layout: BatchLayout,
                     generate: bool, limits: Limits, *, req: str = "",
                     handover: Token | None = None, deadline: float = 0.0,
                     owner: str | None = None) -> _Request:
        # large saves are copied straight into shared memory the client maps: on a GPU stage,
        # into segments registered with CUDA, where one is ready
        alloc = self.segments.allocator(req, handover, deadline) \
            if self.device.type == "cpu" or self.segments.pinning is not None else None
        runner = PlanRunner(plan, self.info, schedule, layout,
                            module_lookup=self.stage.modules.__getitem__, device=self.device,
                            owned=self.owned, limits=limits, frozen=self.frozen,
                            host_alloc=alloc, footprints=self.footprints)
        if runner.gradients is not None:
            if deadline:  # the backward stops past the request's deadline
                runner.gradients.deadline = deadline
            self.backprops.add(runner.gradients)
        return _Request(plan=plan, runner=runner, layout=layout, generate=generate,
                        cache=self.stage.new_cache() if generate else None,
                        extra={"req": req, "owner": owner or "", "limits": limits,
                               "handover": handover, "deadline": deadline})

    def _forward(self, st: _Request, msg: dict[str, Any]) -> dict[str, Any]:
        """One step of this stage (runs in the stage's thread). Returns the message for the
        next stage, or on the last stage the reply (next tokens while generating)."""
        runner, step = st.runner, msg["step"]
        if msg.get("stopped"):  # an earlier stage ended the pass (tracer.stop()): no work here
            return self._stopped(msg, msg.get("saved", 0))
        # first, before the request's state changes: a buffer that cannot be opened here
        # (cuda_ipc.Refused) has the previous stage send the value again
        hidden = None if self.span.is_first else self._received(msg["hidden"], msg["req"])
        runner.env.update(from_wire(msg["carry"], self.device))
        # the request's saves so far, over all stages, include this stage's earlier steps
        runner.saved_elsewhere = msg.get("saved", 0) - runner.saved_bytes
        mask, pos = self._step_inputs(st, msg)
        grads = runner.gradients  # None: forward only, under inference_mode as ever
        stopped = runner.stops_before(step)
        self.weights.ready()
        try:
            runner.begin_step(step)
            with (torch.inference_mode() if grads is None else grads.forward()), runner.hooks():
                self.passes += not stopped
                if stopped:  # a stopping plan with nothing to run at any event
                    pass
                elif self.span.is_first:
                    embeds = _dev(msg.get("inputs_embeds"), self.device)
                    out = self.stage.forward(attention_mask=mask, position_ids=pos, cache=st.cache,
                                             input_ids=_dev(msg.get("input_ids"), self.device),
                                             inputs_embeds=embeds if grads is None
                                             else grads.input_leaf(embeds),
                                             logits_to_keep=1 if st.generate else 0)
                else:
                    if grads is not None:  # its gradient goes back to the previous stage
                        st.extra["hidden_in"] = hidden.requires_grad_()
                        hidden = hidden.clone()  # a plan may write the stage's input in place
                    out = self.stage.forward(hidden=hidden,
                                             attention_mask=mask, position_ids=pos, cache=st.cache,
                                             logits_to_keep=1 if st.generate else 0)
            if grads is not None and not self.span.is_last:
                st.extra["out"] = out
        except StopForward:  # the last event the plan needs ran here: later stages do nothing
            stopped = True
        except BaseException as e:
            if grads is not None:  # a kept traceback must not keep the request's graph
                forget_frames(e)
            if isinstance(e, torch.OutOfMemoryError):
                raise ExecutionError(f"out of memory on stage {self.span.index}: {e}") from None
            raise
        finally:
            self.weights.check()  # a write validation missed: restore, fail this request
        saved = runner.saved_elsewhere + runner.saved_bytes
        if stopped:
            return self._stopped(msg, saved)
        if self.span.is_last:
            reply: dict[str, Any] = {"saved": saved}
            if st.generate:
                # a list of ints: the driver rebuilds the tensor; cheaper to send than a tensor.
                # On a GPU, reading them waits for the stage's queued work: "tokens" is that wait
                # and the choice, a part of "forward" (the rest: queueing the layers)
                start = time.perf_counter()
                reply["tokens"] = next_tokens(st.plan.generate, self._history(st, msg),
                                              out.logits[:, -1, :], step).tolist()
                st.times["tokens"] = time.perf_counter() - start
            return reply
        last_event = self.owned.stop - 1
        start = time.perf_counter()  # on a GPU: waits for the stage's forward, then copies
        hidden_out = self._given(self.ipc_next, out, msg["req"], time.monotonic() + msg["timeout"])
        st.times["forward out"] = time.perf_counter() - start
        return {**_passed_on(msg), "hidden": hidden_out,
                "carry": to_wire(runner.carry_out(last_event)), "saved": saved}

    def _step_inputs(self, st: _Request, msg: dict[str, Any]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's attention mask and position ids on this stage's device: the message's
        (a request's first step), else (a decode step) the last step's extended by one
        position (:func:`~tpmlab.runtime.decoding.next_step_inputs`, the driver's rule), so
        they do not travel with every token."""
        if "attention_mask" in msg:
            mask = from_wire(msg["attention_mask"], self.device)
            pos = from_wire(msg["position_ids"], self.device)
        elif st.mask is None:
            raise ExecutionError(f"stage {self.span.index}: step {msg['step']} came without "
                                 "its attention mask and no earlier step left one")
        else:
            mask, pos = next_step_inputs(st.mask, st.positions)
        if st.generate:
            st.mask, st.positions = mask, pos
        return mask, pos

    def _history(self, st: _Request, msg: dict[str, Any]) -> torch.Tensor | None:
        """The last stage: the sequences so far ``[rows, length]`` where choosing a token
        reads them (:func:`~tpmlab.runtime.decoding.needs_history`), kept here: a step's
        message carries the whole prompt at step 0, then only the tokens the driver
        appended since."""
        new = from_wire(msg.get("ids"))
        if new is not None:
            st.ids = new if st.ids is None or msg["step"] == 0 else torch.cat([st.ids, new], -1)
        return st.ids

    def _received(self, value: Any, req: str) -> Any:
        """A value from a neighbour on this stage's device (the copy out of a device buffer
        queued on this thread's stream: :meth:`~.cuda_ipc.Receiver.settle` it before the
        acknowledgement)."""
        if isinstance(value, cuda_ipc.IpcTensor):
            return self.ipc_in.take(value, req, self.device)
        return from_wire(value, self.device)

    def _given(self, sender: cuda_ipc.Sender, value: Any, req: str, deadline: float) -> Any:
        """``value`` for a neighbour: in one of ``sender``'s device buffers, held by ``req``
        until acknowledged, or the ordinary way (:func:`~.wire.to_wire`)."""
        given = sender.give(value, req, deadline)
        return given if given is not None else to_wire(value)

    def _ack(self, req: str, value: Any) -> None:
        """Tell the next stage it may reuse the buffer behind ``value`` (a gradient it handed
        here), without waiting for its answer."""
        if not isinstance(value, cuda_ipc.IpcTensor) or self.next is None:
            return
        task = asyncio.ensure_future(_quietly(self._next_call("ipc_ack", req, [value.buffer])))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    def _stopped(self, msg: dict[str, Any], saved: int) -> dict[str, Any]:
        """The message for the next stage (the reply, on the last) of a pass that a stopping
        plan ended on this stage or an earlier one: no hidden state, nothing to run."""
        if self.span.is_last:
            return {"saved": saved}
        return {**_passed_on(msg), "stopped": True, "carry": to_wire({}), "saved": saved}

    def _finish(self, st: _Request, steps_run: int) -> StageOutput:
        st.runner.check_complete(steps_run)
        grads = st.runner.gradients
        return StageOutput(saves=to_wire(self._keep_remote(st, st.runner.results())),
                           node_seconds=dict(st.runner.node_seconds),
                           autograd_bytes=0 if grads is None else grads.autograd_bytes,
                           backward_seconds=0.0 if grads is None else grads.seconds)

    def _keep_remote(self, st: _Request, saves: dict[int, Any]) -> dict[int, Any]:
        """Remote saves stay in this worker's store (:mod:`.remote_store`); a handle for
        each (one per generation step) goes back in their place."""
        ids = [n.id for n in st.plan.nodes
               if n.op == SAVE and n.kwargs.get("remote") and n.id in saves]
        if not ids:
            return saves
        parts = [(i, v) for i in ids for v in (saves[i] if isinstance(saves[i], list)
                                               else [saves[i]])]
        try:
            arrays = [to_array(v) for _, v in parts]
        except TypeError as e:
            raise ExecutionError(str(e)) from None
        limits: Limits = st.extra["limits"]
        handles = iter(STORE.put(self.store_name, st.extra["owner"], st.extra["req"], arrays,
                                 worker=self.address or "", max_bytes=limits.max_remote_bytes,
                                 max_values=limits.max_remote_values,
                                 torch_dtypes=[str(v.dtype).removeprefix("torch.")
                                               for _, v in parts]))
        out = dict(saves)
        for i in ids:
            out[i] = ([next(handles) for _ in saves[i]] if isinstance(saves[i], list)
                      else next(handles))
        return out

    async def remote_usage(self) -> dict[str, dict[str, int]]:
        """Remote saves held on this stage: ``{owner: {"bytes", "values", "untaken"}}``."""
        return STORE.usage(self.store_name)

    # -- the chain ---------------------------------------------------------------------------------
    async def _state(self, msg: dict[str, Any], deadline: float) -> _Request:
        req = msg["req"]
        st = self.requests.get(req)
        if st is not None:
            return st
        if msg["step"] != 0:
            raise ExecutionError(f"stage {self.span.index} has no state for this request "
                                 "(its worker was restarted?)")
        # the plan comes with the client's collect call, usually already decoded by now
        slot = self._slot(req, deadline)
        plan, schedule, limits = _raise_if_error(await _await_within(
            slot.plan if slot.plan.done() else asyncio.shield(slot.plan), deadline,
            f"the plan for stage {self.span.index}"))
        st = self.requests[req] = self._new_request(plan, schedule, msg["layout"], msg["generate"],
                                                    limits, req=req, handover=slot.handover,
                                                    deadline=deadline, owner=msg.get("owner"))
        return st

    async def step(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Run one step here and hand it to the next stage; return the next stage's reply
        (empty, or the next tokens while generating) with this stage's timings appended.
        On a trace's last step (``msg["final"]``) this stage's output is set aside for the
        client's ``collect`` (stage 0: returned in ``reply["output"]``) as soon as its own
        layers ran."""
        req = msg["req"]
        t0, arrived = time.perf_counter(), time.time()
        deadline = time.monotonic() + msg["timeout"]
        st = None
        packing: asyncio.Future | None = None
        try:
            st = await self._state(msg, deadline)
            t1 = time.perf_counter()
            loop = asyncio.get_running_loop()
            sent = loop.create_future() if self.next is not None else None
            context = contextvars.copy_context()  # Dask finds its worker through a context variable

            sent_at = 0.0

            def send(out: dict[str, Any]) -> None:  # on the event loop
                nonlocal sent_at
                sent_at = time.time()
                try:
                    sent.set_result(self._next_call("step", out))
                except BaseException as e:  # noqa: BLE001 - raised by the awaiting coroutine
                    sent.set_exception(e)

            # a trace's last step and a backward have work left in the stage's thread after the
            # hidden state is on its way (saves, the backward): the thread sends it; a decode
            # step has none, and is sent from here once the thread is done (one wake-up of the
            # event loop per step instead of two)
            send_early = bool(msg.get("final")) or st.runner.gradients is not None

            def work() -> tuple[dict[str, Any], Any, float, float, Any]:
                # one hop to the stage's thread: the layers, then (once the hidden state is on
                # its way to the next stage) this stage's saves; on the last stage of a
                # backward, its backward too (it has nothing to wait for)
                try:
                    t = time.perf_counter()
                    out = self._forward(st, msg)
                    t_fwd = time.perf_counter() - t
                    if sent is not None:
                        out["timeout"] = deadline - time.monotonic()
                        if send_early:
                            loop.call_soon_threadsafe(send, out, context=context)
                    backward = st.runner.gradients is not None and msg.get("final")
                    if backward and sent is None:
                        self.ipc_in.settle(req)  # the hidden state's copy is done
                        t = time.perf_counter()
                        back, output = stage_backward(self, st, {})
                        return out, output, t_fwd, 0.0, (back, time.perf_counter() - t)
                    output = self._finish(st, 1) if msg.get("final") and not backward else None
                    return out, output, t_fwd, time.perf_counter() - t - t_fwd, None
                finally:  # the reply (or error) acknowledges the hidden state's buffer
                    self.ipc_in.settle(req)

            out, output, t_fwd, t_saves, done = await self._compute(work)
            t2 = time.perf_counter()
            if output is not None and self.span.is_first and sent is not None:
                # stage 0's saves go into shared memory while the later stages compute, off
                # the request's path (a GPU stage's saves that found no registered segment
                # ready are copied into one here)
                packing = loop.run_in_executor(None, self._pack_early, st, req, output, loop)
            if sent is not None and not send_early:
                send(out)
            t_back, back = 0.0, None
            if done is not None:  # the last stage ran its backward in the same hop
                back, t_back = done
                t_fwd_hop = t2 - t1 - t_back
                self.requests.pop(req, None)
                if not self.span.is_first:  # as a forward's: the reply first
                    loop.call_soon(self._hand_over, req, output)
            elif output is not None:
                self.requests.pop(req, None)
                if sent is not None and not self.span.is_first:
                    self._hand_over(req, output)  # its saves travel while later stages compute
                elif sent is None and not self.span.is_first:
                    # the last stage's reply is on the request's critical path and its output
                    # is not: the reply is written (as this coroutine returns) before the
                    # client's collect wakes up
                    loop.call_soon(self._hand_over, req, output)
            hops = {}
            if sent is not None:
                pending = await sent
                reply = await _await_within(pending, deadline, f"stage {self.span.index + 1}")
                if reply.get("ipc_refused"):  # the hidden state again, through host memory
                    out = {**out, "timeout": deadline - time.monotonic(),
                           "hidden": to_wire(await self._compute(self.ipc_next.refused,
                                                                 out["hidden"], req))}
                    reply = await _await_within(self._next_call("step", out), deadline,
                                                f"stage {self.span.index + 1}")
                self.ipc_next.release(req)  # the reply acknowledged the hidden state
                # one-way times to the next stage and back (wall clocks: exact on one host)
                nxt = reply["timings"][0]
                hops = {"hop out": nxt.pop("arrived") - sent_at,
                        "hop back": time.time() - nxt.pop("left")}
            else:
                reply = {**out, "timings": []}
            t3 = time.perf_counter()
            if done is not None:
                reply = {**reply, **back}
                t_hop = t_fwd_hop - t_fwd - t_saves
            else:
                t_hop = (t2 - t1) - t_fwd - t_saves
                if st.runner.gradients is not None and msg.get("final"):
                    # the next stage's reply brought the gradient of our output: backward
                    # here, then hand the gradient of our input to the previous stage with
                    # the reply
                    t = time.perf_counter()
                    grad = reply.get("grad")
                    try:
                        back, output = await self._compute(stage_backward, self, st, reply)
                    except cuda_ipc.Refused:  # the gradient again, through host memory
                        reply = {**reply, "grad": await _await_within(
                            self.next.ipc_fetch(req, grad), deadline,
                            f"stage {self.span.index + 1}")}
                        back, output = await self._compute(stage_backward, self, st, reply)
                    finally:
                        self._ack(req, grad)
                    reply = {**reply, **back}
                    self.requests.pop(req, None)
                    if not self.span.is_first:
                        self._hand_over(req, output)
                    t_back = time.perf_counter() - t
            if back is not None and isinstance(back.get("grad"), cuda_ipc.IpcTensor):
                # our input's gradient, held in a device buffer until acknowledged
                loop.call_later(max(deadline - time.monotonic(), 0) + GRACE,
                                self.ipc_prev.release, req)
            parts, st.times = st.times, {}
            reply["timings"].insert(0, {"state": t1 - t0, "forward": t_fwd, "saves": t_saves,
                                        "thread": t_hop, "wait": t3 - t2, "backward": t_back,
                                        **parts, **hops, "arrived": arrived})
            if output is not None and self.span.is_first:
                if packing is not None:
                    output, reply["timings"][0]["pack"] = await packing
                reply["output"] = output
            if st.runner.kept:  # values a session's later trace reads go up the chain
                reply["kept"] = {**reply.get("kept", {}), **to_wire(st.runner.kept)}
                st.runner.kept = {}
            if self.span.is_first and "kept" in reply:  # held for the session's driver
                self.kept.setdefault(req, {}).update(reply.pop("kept"))
            reply["timings"][0]["left"] = time.time()
            return reply
        except cuda_ipc.Refused:  # nothing ran: the previous stage sends the value again
            return {"ipc_refused": True}
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # its frames' tensors (a graph) go now
            if packing is not None:  # what it put in shared memory is freed with the request
                await asyncio.wait([packing])
            self._drop(req, e if isinstance(e, Exception) else ExecutionError("cancelled"), st)
            self.ipc_prev.release(req)  # a gradient handed back that no one will take
            raise
        finally:
            self.ipc_next.release(req)  # answered or failed: the hidden state's buffer is free

    def _pack_early(self, st: _Request, req: str, output: StageOutput,
                    loop: asyncio.AbstractEventLoop) -> tuple[StageOutput, float]:
        """Stage 0's saves of a trace (``output``) packed for the client (:meth:`run` packs
        what is left: a generation's tokens); how long that took (seconds)."""
        t = time.perf_counter()
        packed = self.segments.pack(output, req, st.extra["handover"], st.extra["deadline"], loop)
        return packed, time.perf_counter() - t

    async def finish(self, req: str, steps_run: int, timeout: float) -> StageOutput | None:
        """End a generation: check every node ran, set this stage's output aside for the
        client (stage 0: return it), free the KV caches; then the same on later stages."""
        deadline = time.monotonic() + timeout
        st = self.requests.pop(req, None)
        if st is None:
            raise ExecutionError(f"stage {self.span.index} has no state for this request")
        output = await self._compute(self._finish, st, steps_run)
        if not self.span.is_first:
            self._hand_over(req, output)
        if self.next is not None:
            await _await_within(self._next_call("finish", req, steps_run, timeout), deadline,
                                f"stage {self.span.index + 1}")
        return output if self.span.is_first else None

    async def collect(self, blob: bytes, req: str, timeout: float,
                      limits: dict[str, Any] | None = None,
                      handover: Token | None = None) -> StageOutput:
        """Stages after the first: take the request's plan (decoded here, validated by stage 0)
        and limits, wait for this stage's output and hand it over (large saves in shared
        memory if the client holding ``handover`` shares this host, :mod:`.handover`);
        nothing of the request stays here."""
        deadline = time.monotonic() + timeout
        self._sweep()
        slot = self._slot(req, deadline)
        try:
            if not slot.plan.done():
                slot.handover = handover
                try:
                    held = request_limits(self.limits, limits_from_wire(limits))

                    def follow() -> tuple[Plan, Schedule]:
                        plan = request.decode(blob, held)[0]
                        return plan, request.follow(plan, self.info)

                    slot.plan.set_result((*self.plans.get(blob, ("follow", held), follow), held))
                except Exception as e:  # stage 0 rejects the plan with the same error
                    slot.plan.set_result(e)
            output = _raise_if_error(await _await_within(
                asyncio.shield(slot.output), deadline, f"stage {self.span.index}'s saves"))
            return self.segments.pack(output, req, handover, deadline)
        finally:
            if self.slots.get(req) is slot:
                del self.slots[req]
            self._let_go(req)

    async def run(self, blob: bytes, req: str, timeout: float,
                  limits: dict[str, Any] | None = None,
                  handover: Token | None = None, owner: str | None = None) -> dict[str, Any]:
        """Stage 0 only: run a plan blob through the pipeline under the request's ``limits``
        (:func:`~tpmlab.runtime.limits.limits_to_wire`; tightened to this stage's own).
        ``owner``: whose remote saves the request keeps (each stage accounts them per owner).
        Returns ``{"values": ..., "saves": ..., "meta": ...}``: stage 0's saves and the values
        only the driver makes (generated tokens), and the metadata, whose ``node_seconds``
        are stage 0's; later stages' outputs are collected from them by the client.
        Large values go in shared memory as in :meth:`collect`."""
        arrived = time.time()
        self._sweep()
        deadline = time.monotonic() + timeout
        try:
            out = await self._run(blob, req, timeout,
                                  request_limits(self.limits, limits_from_wire(limits)), handover,
                                  owner)
            out = self.segments.pack(out, req, handover, deadline)
            out["stamps"] = (arrived, time.time())  # the client's one-way hop times
            return out
        except BaseException:
            await self.abort(req)
            raise

    async def _run(self, blob: bytes, req: str, timeout: float, limits: Limits,
                   handover: Token | None = None, owner: str | None = None) -> dict[str, Any]:
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        t_decode = start

        def admit() -> tuple[Plan, tuple[Schedule, str]]:  # a plan seen before skips this
            nonlocal t_decode
            plan = request.decode(blob, limits)[0]
            t_decode = time.perf_counter()
            schedule = request.admit(plan, model=self.spec["model"], info=self.info,
                                     limits=limits, meta_module=self._meta_modules().get)
            return plan, (schedule, request.plan_digest(plan))

        plan, (schedule, digest) = self.plans.get(blob, ("admit", limits), admit)
        t_validate = time.perf_counter()
        kwargs, layout = build_batch(plan, pad_id=self.pad_id, device=torch.device("cpu"),
                                     embed_dtype=self.dtype)
        generate = plan.mode != "trace"
        self.requests[req] = self._new_request(plan, schedule, layout, generate, limits, req=req,
                                               handover=handover, deadline=deadline, owner=owner)
        t_batch = time.perf_counter()
        base = {"req": req, "owner": owner, "layout": layout, "generate": generate, "carry": {},
                "saved": 0,
                "attention_mask": kwargs["attention_mask"],
                "position_ids": kwargs["position_ids"]}
        values: dict[int, Any] = {}

        def left() -> float:
            return deadline - time.monotonic()

        if not generate:
            msg = {**base, "step": 0, "final": True, "timeout": left(),
                   "input_ids": kwargs.get("input_ids"), "inputs_embeds": kwargs.get("inputs_embeds")}
            reply = await self.step(msg)
            output, timings = reply["output"], reply["timings"]
            for t in timings[:1]:
                t.pop("arrived"), t.pop("left")
        else:
            generated, output, per_step = await self._generate(plan, base, kwargs, layout, left)
            if generated is not None:
                values[request.GENERATED] = generated
            timings = []
        meta = request.result_meta(plan, model=self.spec["model"], info=self.info, started=start,
                                   node_seconds=output["node_seconds"], device=self.device,
                                   digest=digest, stages=self.span.n_stages)
        if schedule.gradients is not None:
            meta["autograd_bytes"] = [output["autograd_bytes"]]  # per stage; later ones added
            meta["backward_seconds"] = output["backward_seconds"]  # later stages' added
        phases = {"decode": t_decode - start, "validate": t_validate - t_decode,
                  "batch+state": t_batch - t_validate}
        for k, t in enumerate(timings):
            phases.update({f"stage{k} {name}": v for name, v in t.items()})
        if generate:
            phases.update({f"step {name}": v for name, v in per_step.items()})
        return {"values": to_wire(values), "saves": output["saves"], "meta": meta,
                "phases": {k: round(v * 1e3, 3) for k, v in phases.items()}}

    async def run_session(self, blob: bytes, req: str, timeout: float,
                          limits: dict[str, Any] | None = None,
                          handover: Token | None = None, owner: str | None = None
                          ) -> list[dict[str, Any]]:
        """Stage 0 only: run a session envelope (:mod:`tpmlab.ir.session`) as one request,
        validated as a whole first. Trace ``k`` runs as request ``f"{req}.{k}"`` (later stages
        hand its saves to the client's ``collect`` of that id). The values a trace keeps come
        up the chain in the replies to this stage and stay in this coroutine's store until a
        later trace's ``from_trace`` nodes read them here (they travel down with the hidden
        state where needed); the store is dropped when the session ends or fails. Returns
        each trace's ``{"values", "saves", "meta"}`` as :meth:`run`."""
        self._sweep()
        deadline = time.monotonic() + timeout
        subs = [f"{req}.{k}" for k in range(MAX_TRACES)]
        try:
            limits_ = request_limits(self.limits, limits_from_wire(limits))
            plans = decode_session(blob, max_bytes=limits_.max_plan_bytes)
            subs = subs[:len(plans)]
            schedules = check_session(plans, self.info, model=self.spec["model"], limits=limits_,
                                      meta_module=self._meta_modules().get)
            store: dict[tuple[int, int], Any] = {}
            outs = []
            for k, (plan, schedule) in enumerate(zip(plans, schedules)):
                imports = {i: store[src] for i, src in imports_of(plans, k).items()}
                out, kept = await self._run_trace(plan, schedule, subs[k], deadline, limits_,
                                                  handover, owner, imports)
                store.update({(k, i): v for i, v in kept.items()})
                outs.append(self.segments.pack(out, subs[k], handover, deadline))
            return outs
        except BaseException:
            for sub in subs:
                await self.abort(sub)
            raise

    async def _run_trace(self, plan: Plan, schedule: Schedule, req: str, deadline: float,
                         limits: Limits, handover: Token | None, owner: str | None,
                         imports: dict[int, Any]) -> tuple[dict[str, Any], dict[int, Any]]:
        """One validated trace of a session through the pipeline (as :meth:`_run`); its
        output and the values it keeps (gathered from every stage)."""
        start = time.perf_counter()
        kwargs, layout = build_batch(plan, pad_id=self.pad_id, device=torch.device("cpu"),
                                     embed_dtype=self.dtype)
        generate = plan.mode != "trace"
        st = self.requests[req] = self._new_request(plan, schedule, layout, generate, limits,
                                                    req=req, handover=handover,
                                                    deadline=deadline, owner=owner)
        st.runner.imports = imports
        base = {"req": req, "owner": owner, "layout": layout, "generate": generate, "carry": {},
                "saved": 0, "attention_mask": kwargs["attention_mask"],
                "position_ids": kwargs["position_ids"]}
        values: dict[int, Any] = {}

        def left() -> float:
            return deadline - time.monotonic()

        if not generate:
            reply = await self.step({**base, "step": 0, "final": True, "timeout": left(),
                                     "input_ids": kwargs.get("input_ids"),
                                     "inputs_embeds": kwargs.get("inputs_embeds")})
            output = reply["output"]
        else:
            generated, output, _ = await self._generate(plan, base, kwargs, layout, left)
            if generated is not None:
                values[request.GENERATED] = generated
        meta = request.result_meta(plan, model=self.spec["model"], info=self.info, started=start,
                                   node_seconds=output["node_seconds"], device=self.device,
                                   stages=self.span.n_stages)
        if schedule.gradients is not None:
            meta["autograd_bytes"] = [output["autograd_bytes"]]
            meta["backward_seconds"] = output["backward_seconds"]
        kept = from_wire(self.kept.pop(req, {}), self.device)
        return {"values": to_wire(values), "saves": output["saves"], "meta": meta}, kept

    def _tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use (stop strings need it; most requests
        do not, so a stage does not load it with its weights)."""
        if self._tok is None:
            self._tok = self.source.tokenizer()
        return self._tok

    async def _generate(self, plan: Plan, base: dict[str, Any], kwargs: dict[str, Any],
                        layout: BatchLayout, left: Any
                        ) -> tuple[list[torch.Tensor] | None, StageOutput, dict[str, float]]:
        """The decoding loop (:class:`~tpmlab.runtime.decoding.Decoding`) over the pipeline:
        each step goes down the chain, each stage's KV cache stays on its worker, and the
        last stage picks the next tokens from its logits. Each row's tokens (``None`` where
        the plan's ``tracer.stop()`` ended the generation: the step it was reached in came
        back without tokens, later stages did no work in it and no later step ran) and
        stage 0's output, and the median of each phase over the decode steps (seconds:
        :func:`_step_timings`)."""
        opts = plan.generate
        eos = eos_ids(opts, self.stage.model.generation_config)
        decoding = Decoding(opts, kwargs.get("input_ids"), kwargs["attention_mask"],
                            kwargs["position_ids"], eos=eos, pad_id=self.pad_id,
                            tokenizer=self._tokenizer() if opts.stop else None)
        history = needs_history(opts)  # the last stage reads the sequences so far
        saved = 0
        steps: list[dict[str, float]] = []  # each decode step's timings (seconds)
        for feed in decoding:
            t0 = time.perf_counter()
            if feed.step == 0:
                msg = {**base, "step": 0, "final": False, "timeout": left(), "saved": saved,
                       "attention_mask": feed.attention_mask, "position_ids": feed.position_ids,
                       "input_ids": feed.input_ids, "inputs_embeds": kwargs.get("inputs_embeds")}
            else:  # each stage extends its own mask and positions (_step_inputs)
                msg = {"req": base["req"], "step": feed.step, "final": False,
                       "timeout": left(), "saved": saved, "carry": {},
                       "input_ids": feed.input_ids}
            if history:  # the prompt, then the tokens appended since (_history)
                msg["ids"] = decoding.ids if feed.step == 0 else decoding.ids[:, -1:]
            t1 = time.perf_counter()
            reply = await self.step(msg)
            t2 = time.perf_counter()
            saved = reply["saved"]
            if "tokens" in reply:
                decoding.advance(torch.tensor(reply["tokens"], dtype=torch.long))
            else:  # a stopped pass (tracer.stop()): no later step runs
                decoding.halt()
            if feed.step:  # the prompt pass is not a decode step
                steps.append(_step_timings(reply["timings"], t0, t1, t2))
        output = await self.finish(base["req"], decoding.steps_run, left())
        timings = _medians(steps)
        if decoding.halted:
            return None, output, timings
        return decoding.outputs([n for ls in layout.lengths for n in ls]), output, timings


def pad_token_id(tokenizer: Any) -> int:
    """The id rows are padded with: the tokenizer's pad token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


#: what a stage's message carries for this stage alone: the next one gets its own
_STAGE_OWN = ("hidden", "carry", "input_ids", "inputs_embeds")


def _passed_on(msg: dict[str, Any]) -> dict[str, Any]:
    """The fields of a stage's message that travel on unchanged to the next stage, tensors
    (a first step's mask and positions, a prompt's ids) as numpy arrays: pickling a torch
    tensor took ≈ 0.35 ms each, the whole first step's message 0.8 ms against 0.07 ms for a
    decode step's."""
    return {k: to_wire(v) if isinstance(v, torch.Tensor) else v
            for k, v in msg.items() if k not in _STAGE_OWN}


def _step_timings(timings: list[dict[str, float]], t0: float, t1: float, t2: float
                  ) -> dict[str, float]:
    """One decode step's timings (seconds): ``message`` (stage 0 building it), ``step`` (its
    trip down the chain and back), each stage's own (``stage{k} ...``: see
    :meth:`StageActor.step`) and ``driver`` (picking up the reply: the tokens' bookkeeping)."""
    out = {"message": t1 - t0, "step": t2 - t1, "driver": time.perf_counter() - t2}
    for k, t in enumerate(timings):
        out.update({f"stage{k} {name}": v for name, v in t.items()
                    if name not in ("arrived", "left")})
    return out


def _medians(steps: list[dict[str, float]]) -> dict[str, float]:
    """Each key's median over ``steps`` (a key missing in a step counts as 0)."""
    if not steps:
        return {}
    keys = list(dict.fromkeys(k for s in steps for k in s))
    return {k: statistics.median(s.get(k, 0.0) for s in steps) for k in keys}


def _release(st: _Request) -> None:
    """Drop a request's gradient state (the graph's ends), in the stage's thread."""
    st.runner.gradients.release()
    st.extra.clear()


def _worker() -> Any:
    """The Dask worker this runs on (``None`` outside one)."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


async def _quietly(awaitable: Any) -> None:
    """Await ``awaitable`` for its effect alone (an acknowledgement: a lost one is swept)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(awaitable, 30)


def _dev(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
