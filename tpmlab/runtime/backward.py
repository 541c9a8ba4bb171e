"""One request's backward pass on one runner (a whole model, or one pipeline stage).

Only a plan with a ``backward`` node gets a :class:`Backprop`; every other request runs
its forward under ``torch.inference_mode`` and pays nothing for gradients.

During the forward (:meth:`Backprop.forward`, under ``torch.enable_grad``):

* the first tracked point whose value needs no gradient yet becomes a fresh leaf (a
  clone, so the plan may still write it in place); later values then track it;
* a tensor hook on each tracked point's value runs, during the backward, the nodes
  waiting for that point's gradient (:attr:`GradientSchedule.by_event`) and returns
  the gradient they changed, if they changed it;
* parameters asked for (``.param(name).grad``) are, for the forward only, leaves that
  share the deployed weight's memory and version counter (so the
  :class:`~tpmlab.runtime.weights.WeightGuard` still sees any write); the weights
  themselves never get a ``.grad``, and nothing is ever applied to them;
* the bytes autograd keeps for the backward (its saved tensors, weights excluded)
  are counted, and a request past ``Limits.max_autograd_bytes`` fails. The model's own
  ops are counted tensor by tensor (``saved_tensors_hooks``) the first time a request of
  its shape runs; a later one of the same shape, well under its limit, counts the figure
  measured then and runs the model without the hooks
  (:class:`~tpmlab.runtime.footprints.Footprints`). The plan's nodes are always counted.

:meth:`Backprop.backward` runs autograd from this runner's roots (the loss, or the
stage's output with the gradient the next stage sent back), fills with zeros the
gradients that did not reach a tracked point, then runs the late nodes (gradients of
parameters and constants). Everything is released with the request: :meth:`Backprop.release`
drops the graph's ends (the runner's values, the leaves, the tensor hooks) whether the
request finished, failed or ran past its deadline; a failure's traceback lets go of the
frames' locals (which would hold the graph), and what autograd saved under the hooks is
dropped even where something still holds the graph. :func:`held` is what an engine
reports of the gradient state it still holds. A request with a ``deadline`` stops its
backward at the first tracked point or plan node past it (:class:`RequestTimeoutError`).
"""

from __future__ import annotations

import contextlib
import time
import traceback
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ..errors import ExecutionError, LimitError, RequestTimeoutError
from ..ir.gradients import GradientSchedule
from ..ir.plan import POINT, Node
from .batching import invoke_view
from .footprints import Footprints, shape_key

if TYPE_CHECKING:
    from .runner import PlanRunner, _Cell


class Backprop:
    """The gradient state of one request on one runner (see the module docstring).

    ``frozen``: storage pointers of the weights (never counted as autograd memory).
    ``max_bytes``: the most bytes autograd may keep for this request here.
    ``deadline``: :func:`time.monotonic` past which the backward stops (set by the engine).
    ``footprints``: the engine's measured bytes of the model's own saved tensors by request
    shape (``None``: always count them tensor by tensor).
    """

    def __init__(self, runner: PlanRunner, grads: GradientSchedule, *,
                 frozen: frozenset[int] = frozenset(), max_bytes: int | None = None,
                 footprints: Footprints | None = None) -> None:
        # the runner owns this state (runner.gradients); a strong reference back would make
        # a cycle that kept the request's saves (pinned host memory on a GPU) until the
        # garbage collector ran
        self._runner = weakref.ref(runner)
        self.g = grads
        self.frozen, self.max_bytes = frozen, max_bytes
        self.deadline: float | None = None
        self.released = False
        self.fired: dict[int, torch.Tensor] = {}  # event -> the batch's gradient there
        self.like: dict[int, tuple[torch.Size, torch.dtype]] = {}  # event -> its value's shape
        self.params: dict[int, torch.Tensor] = {}  # grad node -> its parameter's leaf
        self.embeds: torch.Tensor | None = None  # the input embeddings' leaf (first stage)
        self.incoming: dict[str, torch.Tensor] = {}  # constants' gradients from later stages
        self.autograd_bytes = 0  # bytes autograd keeps for the backward, weights excluded
        self.footprints = footprints
        # the figure the model's own ops were counted at (None: counted tensor by tensor)
        self.measured: int | None = None
        self.model_bytes = 0  # of autograd_bytes, what the model's own ops saved (counted)
        self._in_nodes = False  # the plan's nodes are running (their saves are theirs)
        self._node_events: set[int] | None = None  # events with nodes that may save tensors
        self.seconds = 0.0  # the backward's own time here, the plan's nodes not included
        self.forward_seconds = 0.0  # the forward's time here, with its nodes (in process)
        self._storages: set[int] = set()
        self._kept: list[tuple[StorageWeakRef, int, int]] = []  # what autograd kept, weakly
        self._slots: list[list[torch.Tensor]] = []  # autograd's saved tensors (see _pack)
        self._handles: list[Any] = []
        names = set(grads.constants.values())
        for name in names & set(runner._constants):
            runner._constants[name] = runner._constants[name].detach().requires_grad_()

    @property
    def runner(self) -> PlanRunner:
        runner = self._runner()
        if runner is None:
            raise ExecutionError("the request's runner is gone (its backward state outlived it)")
        return runner

    # -- the forward -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Around this runner's forward: autograd on, its memory counted, parameters as leaves.

        The model's own saved tensors are counted by the hooks unless the engine measured
        this request's shape before, well under the limit (:meth:`Footprints.usable`): then
        that figure counts for them and only the plan's nodes run under the hooks
        (:meth:`counting`). A forward counted in full records its figure for later requests.
        The caller lets go of a failure's frames (:func:`forget_frames`)."""
        key = None if self.footprints is None else shape_key(self.runner.plan)
        self.measured = None if key is None else self.footprints.usable(key, self.max_bytes)
        if self.measured is not None:
            self.autograd_bytes += self.measured
            with torch.enable_grad(), self._parameter_leaves():
                yield
        else:
            with torch.enable_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack), \
                    self._parameter_leaves():
                yield
            if key is not None:
                self.footprints.record(key, self.model_bytes)

    def counting(self, event: int) -> contextlib.AbstractContextManager[None]:
        """Around the plan's nodes at ``event`` in the forward: what they save is theirs, and
        counted tensor by tensor even where the model's own ops run without the hooks."""
        if self._node_events is None:
            self._node_events = {e for e, nodes in self.runner.schedule.by_event.items()
                                 if any(n.op != POINT for n in nodes)}
        return self._counting() if event in self._node_events else _NOTHING

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        self._in_nodes = True
        try:
            if self.measured is None:
                yield
            else:
                with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                    yield
        finally:
            self._in_nodes = False

    def input_leaf(self, embeds: torch.Tensor | None) -> torch.Tensor | None:
        """The input embeddings, as a leaf if their gradient is asked for."""
        if embeds is None or not self._embed_rows():
            return embeds
        self.embeds = embeds.detach().requires_grad_()
        return self.embeds.clone()  # not the leaf itself: the plan may write it in place

    def _embed_rows(self) -> list[str]:
        rows = {n for inv in self.runner.plan.invokes if inv.kind == "embeds" for n in inv.tensors}
        return [name for name in self.g.constants.values() if name in rows]

    def _pack(self, t: torch.Tensor) -> list[torch.Tensor]:
        """What autograd keeps of ``t``: a slot :meth:`release` empties (so the request's
        saved tensors go with it even where something still holds the graph's nodes)."""
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):
            return [t]
        if ptr in self.frozen:
            return [t]
        slot = [t]
        self._slots.append(slot)
        if ptr not in self._storages:
            self._storages.add(ptr)
            nbytes = storage.nbytes()
            self.autograd_bytes += nbytes
            if not self._in_nodes:
                self.model_bytes += nbytes
            self._kept.append((StorageWeakRef(storage), nbytes, ptr))
            if self.max_bytes is not None and self.autograd_bytes > self.max_bytes:
                raise LimitError(f"the backward would keep {self.autograd_bytes:,} bytes on this "
                                 f"stage, over the limit of {self.max_bytes:,} bytes: use fewer "
                                 "or shorter prompts per request")
        return slot

    @contextlib.contextmanager
    def _parameter_leaves(self) -> Iterator[None]:
        swapped = []
        try:
            for node_id, (path, name) in self.g.params.items():
                param_node = self.runner.plan.node(self.runner.plan.node(node_id).args[0].id)
                if not self.runner._owns(self.runner.schedule.anchor[param_node.id]):
                    continue
                module = self.runner.module_lookup(path)
                if node_id not in self.params:
                    self.params[node_id] = torch.nn.Parameter(module._parameters[name].detach())
                swapped.append((module, name, module._parameters[name]))
                module._parameters[name] = self.params[node_id]
            yield
        finally:
            for module, name, original in reversed(swapped):
                module._parameters[name] = original

    def before_event(self, event: int, cell: _Cell) -> None:
        """A tracked point's value must be part of the graph before the plan's nodes use it."""
        v = cell.value
        if event in self.g.tracked and isinstance(v, torch.Tensor) and v.is_floating_point() \
                and not v.requires_grad:
            cell.value, cell.replaced = v.detach().requires_grad_().clone(), True

    def after_event(self, event: int, cell: _Cell) -> None:
        """Hook the tracked point's final value (after the plan's writes)."""
        v = cell.value
        if event not in self.g.tracked or not isinstance(v, torch.Tensor):
            return
        self.like[event] = (v.shape, v.dtype)
        if v.requires_grad:
            self._handles.append(v.register_hook(self._hook(event)))
            if self.measured is not None:
                self._witness(v)

    def _witness(self, v: torch.Tensor) -> None:
        """Without the hooks, the tracked points' values stand for what autograd keeps in
        :meth:`alive_bytes`: each is an input the next ops saved, alive as long as the graph."""
        storage = v.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.frozen and ptr not in self._storages:
            self._storages.add(ptr)
            self._kept.append((StorageWeakRef(storage), storage.nbytes(), ptr))

    def _hook(self, event: int):
        written = event in self.g.written
        nodes = self._owned(self.g.by_event.get(event, []))  # decided once, not per gradient

        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            if event in self.fired:  # a value used twice in the graph: once is enough
                return None
            self.check_deadline()
            g = grad.clone() if written else grad
            self.fired[event] = g
            self._run_owned(nodes)
            return g if written else None
        return hook

    def _owned(self, nodes: list[Node]) -> list[Node]:
        """Of ``nodes``, those this runner runs (anchored at an event it owns)."""
        runner = self.runner
        if runner.owned is None:
            return nodes
        return [n for n in nodes if runner.schedule.anchor[n.id] in runner.owned]

    # -- the backward ------------------------------------------------------------------------------
    def backward(self, roots: list[tuple[torch.Tensor | None, torch.Tensor | None]],
                 incoming: dict[str, torch.Tensor] | None = None) -> None:
        """Back-propagate ``roots`` (``(tensor, its gradient or None for the scalar loss)``),
        then run what waited for gradients that never came (zeros) and the late nodes.
        ``roots`` is emptied (a failure's traceback then holds no end of the graph)."""
        self.incoming = dict(incoming or {})
        tensors = [t for t, _ in roots if t is not None and t.requires_grad]
        grads = [g for t, g in roots if t is not None and t.requires_grad]
        roots.clear()
        start, nodes_before = time.perf_counter(), sum(self.runner.node_seconds.values())
        try:
            if tensors:
                with torch.enable_grad():
                    torch.autograd.backward(tensors, grads)
            for event in sorted(self.g.tracked, reverse=True):
                if self.runner._owns(event) and event not in self.fired:
                    self._run_nodes(self.g.by_event.get(event, []))
            self._run_nodes(self.g.late_nodes)
            self.runner._ran.add((self.g.backward, 0))
            nodes = sum(self.runner.node_seconds.values()) - nodes_before
            self.seconds = max(0.0, time.perf_counter() - start - nodes)  # nodes are timed apart
        except BaseException as e:
            tensors = grads = []
            forget_frames(e)
            raise
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def _run_nodes(self, nodes: list[Node]) -> None:
        self._run_owned(self._owned(nodes))

    def _run_owned(self, nodes: list[Node]) -> None:
        run = self.runner._run
        for node in nodes:
            self.check_deadline()
            run(node, None)

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RequestTimeoutError("the request ran past its deadline in the backward pass "
                                      "(pass a larger timeout= to trace, or save fewer "
                                      "gradients)")

    def release(self) -> None:
        """Drop what autograd keeps for this request here (idempotent): the tensor hooks, the
        leaves, the gradients, the runner's values (which hold the graph). Saves are host
        copies and stay with the runner."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for slot in self._slots:
            slot.clear()
        self._slots.clear()
        self.fired.clear()
        self.params.clear()
        self.incoming.clear()
        self.embeds = None
        self.runner.env.clear()
        for name in set(self.g.constants.values()) & set(self.runner._constants):
            self.runner._constants[name] = self.runner._constants[name].detach()
        self.released = True

    def alive_bytes(self) -> int:
        """Bytes of what autograd kept for this request that are still in memory (0 once the
        graph is gone: the proof that :meth:`release` freed it). Where the model ran without
        the hooks, its tracked points' values stand for its saved tensors (:meth:`_witness`)."""
        return sum(n for ref, n, _ in self._kept if not ref.expired())

    def value(self, node: Node) -> torch.Tensor:
        """The gradient a ``grad`` node reads (zeros where none reached its target)."""
        if node.id in self.g.params:
            leaf = self.params[node.id]
            return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        name = self.g.constants.get(node.id)
        if name is not None:
            return self._constant(name)
        runner = self.runner
        point = runner.plan.node(node.args[0].id)
        event = self.g.event_of[node.id]
        g = self.fired.get(event)
        if g is None:
            shape, dtype = self.like[event]
            g = self.fired[event] = torch.zeros(shape, dtype=dtype, device=runner.device)
        return invoke_view(g, runner.layout, point.invoke, prompt_pass=True,
                           template=runner._templates.get(point.id))

    def _constant(self, name: str) -> torch.Tensor:
        layout = self.runner.layout
        for k, inv in enumerate(self.runner.plan.invokes):
            if name in inv.tensors and inv.kind == "embeds":
                row = layout.rows[k][0] + inv.tensors.index(name)
                n = self.runner.plan.tensors[name].shape[0]
                if self.embeds is None or self.embeds.grad is None:
                    return torch.zeros_like(self.runner._constants[name])
                return self.embeds.grad[row, layout.seq_len - n:]
        total = self.local_constants().get(name)
        if name in self.incoming:
            extra = self.incoming[name].to(self.runner.device)
            total = extra if total is None else total + extra
        return total if total is not None else torch.zeros_like(self.runner._constants[name])

    def local_constants(self) -> dict[str, torch.Tensor]:
        """This runner's part of each constant's gradient (summed over stages on the way back)."""
        out = {}
        for name in set(self.g.constants.values()):
            leaf = self.runner._constants.get(name)
            if leaf is not None and leaf.grad is not None:
                out[name] = leaf.grad
        return out

    def outgoing(self) -> dict[str, torch.Tensor]:
        """The constants' gradients so far, for the previous stage: later stages' plus ours."""
        out = dict(self.incoming)
        for name, g in self.local_constants().items():
            out[name] = g if name not in out else out[name].to(g.device) + g
        return out

    def carry_back(self, first_event: int) -> dict[int, Any]:
        """Values made here or later that backward nodes before ``first_event`` still read."""
        sched, env = self.runner.schedule, self.runner.env
        out = {}
        for node_id, readers in sched.consumers.items():
            if node_id in env and sched.anchor[node_id] >= first_event and any(
                    r in self.g.phase and sched.anchor[r] < first_event for r in readers):
                out[node_id] = env[node_id]
        return out


_NOTHING = contextlib.nullcontext()  # an event with points only: nothing of the plan's to count


def forget_frames(error: BaseException) -> None:
    """Drop the frames ``error`` passed through (the model's, autograd's, the plan's nodes'),
    and its causes' and contexts': their locals and closures hold the request's graph, and a
    traceback kept for the user (a notebook keeps the last one) would keep it alive. Call it
    where the failure is handled, then ``raise``: the traceback starts again there. The
    dropped frames' text stays in the error's ``engine_traceback``."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if e.__traceback__ is not None:
            with contextlib.suppress(Exception):  # only the text: never fail the failure
                e.engine_traceback = "".join(traceback.format_tb(e.__traceback__))
            e.__traceback__ = None
        e = e.__cause__ or e.__context__


def _unpack(slot: list[torch.Tensor]) -> torch.Tensor:
    if not slot:
        raise ExecutionError("the request's backward state was released (it failed or ran "
                             "past its deadline)")
    return slot[0]


def held(states: Iterable[Backprop]) -> dict[str, int]:
    """What an engine still holds for backward passes, from its (weak) set of the
    :class:`Backprop` objects it made: ``autograd_states``, those not yet released, and
    ``autograd_bytes``, the bytes autograd kept for them that are still in memory."""
    states = list(states)
    return {"autograd_states": sum(not b.released for b in states),
            "autograd_bytes": sum(b.alive_bytes() for b in states)}


def registry() -> weakref.WeakSet[Backprop]:
    """A set an engine keeps its requests' :class:`Backprop` objects in, for :func:`held`
    (weak: a collected request leaves it by itself)."""
    return weakref.WeakSet()


def weight_storages(model: torch.nn.Module) -> frozenset[int]:
    """Storage pointers of a model's real weights (autograd saves them; they are not its memory)."""
    out = set()
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_meta:
            out.add(t.untyped_storage().data_ptr())
    return frozenset(out)


def run_with_backward(model: torch.nn.Module, kwargs: dict[str, Any], runner: PlanRunner) -> float:
    """A trace with a backward on a whole model in this process: forward, then backward.
    Returns the backward's own seconds (:attr:`Backprop.seconds`)."""
    grads = runner.gradients
    if "inputs_embeds" in kwargs:
        kwargs = {**kwargs, "inputs_embeds": grads.input_leaf(kwargs["inputs_embeds"])}
    runner.begin_step(0)
    start = time.perf_counter()
    try:
        with grads.forward(), runner.hooks():
            model(**kwargs, use_cache=False)
    except BaseException as e:
        forget_frames(e)
        raise
    grads.forward_seconds = time.perf_counter() - start
    grads.backward([(runner.env.get(grads.g.loss), None)])
    runner.check_complete(1)
    return grads.seconds
