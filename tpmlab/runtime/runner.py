"""Running a plan's nodes alongside a forward pass, with forward hooks.

A :class:`PlanRunner` holds one request's state (its values, saves and the
current generation step). It installs hooks only on the modules the plan reads
or writes (none at all for a plan without nodes), and at each event runs the
nodes anchored there (see :mod:`tpmlab.ir.schedule`). The same runner drives a
whole model in-process and one pipeline stage on a Dask worker: a stage owns a
range of events, receives the values earlier stages made that it needs
(``carry``) and hands on those later stages need.

Each invoke's module points see only its rows (:func:`~tpmlab.runtime.batching.invoke_view`),
so its writes reach nothing else; a write to a value that all rows share is refused
(:mod:`tpmlab.ir.rows`). While it runs, the runner holds the request to its
:class:`~tpmlab.ir.validate.Limits` (bytes saved over all steps, and stages; bytes of any
one value a node makes) and measures each node's own time (:attr:`PlanRunner.node_seconds`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ExecutionError, LimitError, PlanError
from ..ir.args import SCALARS, leaves, rebuild
from ..ir.model_info import START, ModelInfo, event_key
from ..ir.ops import OPS, named_fields
from ..ir.plan import (
    CALL_MODULE,
    FROM_TRACE,
    GRAD,
    PARAM,
    POINT,
    SAVE,
    SET_POINT,
    Node,
    Plan,
    Ref,
    TensorRef,
)
from ..ir.rows import written_parts
from ..ir.schedule import Schedule
from ..ir.validate import Limits, check_plain_operands, new_nbytes, value_nbytes
from .backward import Backprop
from .batching import BatchLayout, invoke_view, shared_tensors
from .bounds import check_bounds
from .footprints import Footprints
from .plan_cache import derived


class StopForward(Exception):
    """Raised by a hook once the last event a stopping plan (``tracer.stop()``) needs has
    run: the forward pass ends there. The engine (or pipeline stage) catches it."""


def stopping() -> contextlib.AbstractContextManager:
    """Around a forward pass: a :class:`StopForward` ends it without an error."""
    return contextlib.suppress(StopForward)


class _Cell:
    """The value of one event while its nodes run; ``replaced`` when a node set it anew.
    At an input event, ``call`` is the call's ``(args, kwargs)`` (``value`` is its first)."""

    __slots__ = ("value", "replaced", "call")

    def __init__(self, value: Any, call: tuple[tuple, dict] | None = None) -> None:
        self.value = value
        self.replaced = False
        self.call = call

    def inputs(self) -> tuple[tuple, dict]:
        """The call's inputs as a plan sees them (``.inputs``): positional arguments and the
        keyword arguments that are data (a KV cache object is left out, and kept as it is)."""
        args, kwargs = self._current()
        return tuple(args), {k: v for k, v in kwargs.items() if _is_data(v)}

    def set_inputs(self, new: Any) -> None:
        """Replace the whole call (``module.inputs = (args, kwargs)``)."""
        if not (isinstance(new, (tuple, list)) and len(new) == 2
                and isinstance(new[0], (tuple, list)) and isinstance(new[1], dict)):
            raise TypeError(f"a module's inputs are (args, kwargs), not {_describe(new)}")
        args, kwargs = tuple(new[0]), dict(new[1])
        if not args and not kwargs:
            raise TypeError("a module's inputs cannot be empty")
        _, old = self.call
        kwargs.update({k: v for k, v in old.items() if not _is_data(v) and k not in kwargs})
        self.call = (args, kwargs)
        self.value = args[0] if args else next(iter(kwargs.values()))
        self.replaced = True

    def _current(self) -> tuple[tuple, dict]:
        """The call with its first input as it stands now (``.input`` may have been set)."""
        args, kwargs = self.call
        if args:
            return (self.value, *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: self.value}


def _is_data(value: Any) -> bool:
    """Whether a plan can hold ``value``: tensors, numbers, strings, None, and containers."""
    return all(v is None or isinstance(v, (torch.Tensor, *SCALARS)) for v in leaves(value))


#: where a stage puts a save's copy: an empty tensor of that shape and dtype, or ``None``
#: for ordinary memory (a CPU stage) or a pinned copy (a GPU stage)
#: (:meth:`tpmlab.cluster.handover.Segments.allocator`)
HostAlloc = Callable[[tuple[int, ...], torch.dtype], "torch.Tensor | None"]


def host_copy(value: Any, pinned: bool, alloc: HostAlloc | None = None) -> Any:
    """A copy of a saved value that later writes cannot change.

    On a GPU the copy goes to pinned host memory without blocking the stream
    (call :func:`torch.cuda.synchronize` before reading it): into memory from ``alloc``
    where it gives some (a shared-memory segment registered with CUDA, which the notebook
    maps), else a new pinned tensor. On the CPU it is a clone, into memory from ``alloc``
    where it gives some (shared memory the notebook maps).
    """
    if isinstance(value, torch.Tensor):
        if value.device.type == "cuda":
            out = alloc(tuple(value.shape), value.dtype) if alloc is not None else None
            if out is None:
                out = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
            out.copy_(value, non_blocking=pinned)
            return out
        out = alloc(tuple(value.shape), value.dtype) if alloc is not None else None
        if out is None:
            return value.detach().clone()
        return out.copy_(value.detach())
    if isinstance(value, dict):
        return {k: host_copy(v, pinned, alloc) for k, v in value.items()}
    if named_fields(value):
        items = [host_copy(v, pinned, alloc) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v, pinned, alloc) for v in value)
    return value


def _kept_copy(value: Any) -> Any:
    """A copy of a value kept for a later trace of a session, where it is (later writes in
    this trace cannot change it)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _kept_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not named_fields(value):
        return type(value)(_kept_copy(v) for v in value)
    return value


def _write_into(current: Any, new: Any) -> bool:
    """Copy ``new`` into ``current`` in place (tensors broadcast and cast as in ``x[...] = v``;
    containers item by item, their other items equal). False, with nothing written, where
    ``new`` does not fit ``current``."""
    if not _fits(current, new):
        return False
    _copy_into(current, new)
    return True


def _fits(current: Any, new: Any) -> bool:
    if isinstance(current, torch.Tensor):
        if not isinstance(new, (torch.Tensor, int, float, bool)):
            return False
        if any(st == 0 and n > 1 for st, n in zip(current.stride(), current.shape)):
            return False  # one memory for several elements (an expanded value)
        shape = new.shape if isinstance(new, torch.Tensor) else ()
        try:
            return torch.broadcast_shapes(shape, current.shape) == current.shape
        except RuntimeError:
            return False
    if isinstance(current, dict):
        return isinstance(new, dict) and set(new) == set(current) and all(
            _fits(current[k], new[k]) for k in current)
    if isinstance(current, (tuple, list)):
        return isinstance(new, (tuple, list)) and len(new) == len(current) and all(
            _fits(c, n) for c, n in zip(current, new))
    return current is new or (current is None and new is None) or (
        isinstance(current, (int, float, bool, str)) and type(current) is type(new)
        and current == new)


def _copy_into(current: Any, new: Any) -> None:
    if isinstance(current, torch.Tensor):
        if isinstance(new, torch.Tensor) and new.device == current.device and _overlaps(current, new):
            new = new.clone()  # e.g. a view of the value itself
        current.copy_(new) if isinstance(new, torch.Tensor) else current.fill_(new)
    elif isinstance(current, dict):
        for k in current:
            _copy_into(current[k], new[k])
    elif isinstance(current, (tuple, list)):
        for c, n in zip(current, new):
            _copy_into(c, n)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list, dict)):
        return f"{type(value).__name__} of {len(value)} items"
    return type(value).__name__


class PlanRunner:
    """One request's execution state over one model or one pipeline stage.

    ``owned``: the event indices this runner executes (``None``: all of them).
    ``module_lookup(path)`` returns the live module for a native path.
    ``limits``: the request's limits, enforced while it runs (``None``: none).
    ``footprints``: the engine's measured autograd bytes by request shape, for a backward
    (:mod:`tpmlab.runtime.footprints`).

    ``node_seconds`` (after the pass): ``{node id: seconds}`` spent running each plan node
    that is not a module point, summed over generation steps, measured with
    :func:`time.perf_counter` around the node's op; the model's own forward is not in it.
    On a GPU the op's kernels run asynchronously, so this is the time to launch them
    (plus any wait the op forces, such as reading a value back), not their run time.
    A plan without nodes times nothing; each node costs two clock reads
    (``benchmarks/node_timing.py`` measures it).
    """

    time_nodes = True  # False leaves node_seconds empty (to measure what timing costs)

    def __init__(self, plan: Plan, info: ModelInfo, schedule: Schedule, layout: BatchLayout,
                 *, module_lookup: Callable[[str], nn.Module], device: torch.device,
                 owned: range | None = None, carry: dict[int, Any] | None = None,
                 pinned: bool = True, limits: Limits | None = None,
                 frozen: frozenset[int] = frozenset(), host_alloc: HostAlloc | None = None,
                 imports: dict[int, Any] | None = None,
                 footprints: Footprints | None = None) -> None:
        self.plan, self.info, self.schedule, self.layout = plan, info, schedule, layout
        self.module_lookup = module_lookup
        self.device = device
        self.owned = owned
        self.env: dict[int, Any] = dict(carry or {})
        self.saves: dict[int, Any] = {}
        # a session (tpmlab.ir.session): values of earlier traces by this plan's from_trace
        # node ids, and the values this plan keeps for later ones (never sent back)
        self.imports: dict[int, Any] = dict(imports or {})
        self.kept: dict[int, Any] = {}
        self.step = 0
        self.pinned = pinned and device.type == "cuda"
        self.host_alloc = host_alloc  # where saves' copies go (None: a clone, a pinned copy)
        self._fired: set[int] = set()
        self._suspended = 0
        self._ran: set[tuple[int, int]] = set()
        self._constants = {name: t.to(device) for name, t in plan.tensors.items()}
        # Sizes validation could not know (later generation steps, data-dependent shapes,
        # modules it cannot run on meta tensors) are held to the same limits here.
        self.max_saved_bytes = limits.max_saved_bytes if limits else None
        self.max_value_bytes = limits.max_intermediate_bytes if limits else None
        self.saved_bytes = 0  # saved by this runner, over all steps
        self.saved_elsewhere = 0  # saved by the request on other pipeline stages (set by them)
        self.node_seconds: dict[int, float] = {}
        # of the save nodes' time, copying to host memory (on a GPU: launching the copies);
        # and how long :meth:`results` waited for the device (all its queued work, on a GPU)
        self.copy_seconds = 0.0
        self.sync_seconds = 0.0
        # the event template of each point, and the points the plan writes (with the writers)
        self._templates = {n.id: info.shapes.get(event_key(n.path or "", n.io or "output"))
                           for n in plan.nodes if n.op == POINT}
        self._writes = written_parts(plan, info, schedule) if schedule.write_target else {}
        # the backward pass, for a plan that has one (frozen: the weights' storages)
        self.gradients = None if schedule.gradients is None else Backprop(
            self, schedule.gradients, frozen=frozen,
            max_bytes=limits.max_autograd_bytes if limits else None, footprints=footprints)
        # tracer.stop(): the (step, event) after which nothing is left to run (event START:
        # that step's pass need not run at all); None: every pass runs whole (no stop, a
        # backward)
        self.stop_at: tuple[int, int] | None = None
        if plan.stop and self.gradients is None:
            self.stop_at = schedule.stop_point()

    # -- which events ---------------------------------------------------------------------------
    def _owns(self, event: int) -> bool:
        return self.owned is None or event in self.owned

    def events(self) -> list[int]:
        """Event indices with nodes that this runner executes."""
        return [e for e in self.schedule.events_used() if self._owns(e)]

    # -- driving --------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Start generation step ``step`` (0 is the prompt pass); run nodes that need no module."""
        self.step = step
        self._fired.clear()
        if self._owns(START):
            for node in self.schedule.by_event.get(START, []):
                if node.steps.contains(step):
                    self._run(node, None)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Install hooks for this runner's events (a generation's driver starts each step
        with :meth:`begin_step`)."""
        handles = []
        try:
            for event in self.events():
                path, io = self.info.events[event].rsplit(":", 1)
                module = self.module_lookup(path)
                if io == "output":
                    handles.append(module.register_forward_hook(self._output_hook(event)))
                else:
                    handles.append(module.register_forward_pre_hook(self._input_hook(event),
                                                                    with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _output_hook(self, event: int):
        def hook(module, args, output):
            if self._suspended or event in self._fired:
                return None
            self._fired.add(event)
            cell = _Cell(output)
            self._run_event(event, cell)
            return cell.value if cell.replaced else None
        return hook

    def _input_hook(self, event: int):
        def hook(module, args, kwargs):
            if self._suspended or event in self._fired:
                return None
            self._fired.add(event)
            cell = _Cell(args[0] if args else next(iter(kwargs.values())), (args, kwargs))
            self._run_event(event, cell)
            if not cell.replaced:
                return None
            return cell._current()
        return hook

    def _run_event(self, event: int, cell: _Cell) -> None:
        grads = self.gradients
        if grads is None:
            self._run_nodes_at(event, cell)
        else:
            grads.before_event(event, cell)
            with grads.counting(event):  # what the plan's nodes save for the backward
                self._run_nodes_at(event, cell)
            grads.after_event(event, cell)
        if self.stop_at == (self.step, event):
            raise StopForward()

    def _run_nodes_at(self, event: int, cell: _Cell) -> None:
        for node in self.schedule.by_event.get(event, []):
            if node.steps.contains(self.step):
                self._run(node, cell)

    def stops_before(self, step: int) -> bool:
        """Whether a stopping plan ends before the first event of step ``step``'s pass (no
        node at any event of that step): the pass need not run, and no later step does."""
        return self.stop_at == (step, START)

    # -- nodes ----------------------------------------------------------------------------------
    def _arg(self, value: Any) -> Any:
        if type(value) is Ref:  # a node's value (what a save or a gradient read takes)
            return self._leaf(value)
        return rebuild(value, self._leaf, native=True)

    def _leaf(self, value: Any) -> Any:
        if isinstance(value, Ref):
            if value.id not in self.env:
                raise ExecutionError(f"the value of node {value.id} is not available here")
            return self.env[value.id]
        if isinstance(value, TensorRef):
            return self._constants[value.name]
        return value

    def _run(self, node: Node, cell: _Cell | None) -> None:
        timed = node.op != POINT and self.time_nodes  # a point hands over the module's value
        start = time.perf_counter() if timed else 0.0
        try:
            self._execute(node, cell)
        except (PlanError, ExecutionError):
            raise
        except Exception as e:  # a failing op names its node and the user's line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExecutionError(f"{node.op} failed: {type(e).__name__}: {msg}",
                                 node=node.id, op=node.op, line=node.line) from e
        if timed:
            self.node_seconds[node.id] = (self.node_seconds.get(node.id, 0.0)
                                          + time.perf_counter() - start)
        if self.max_value_bytes is not None and node.op not in (POINT, SAVE, SET_POINT, PARAM):
            self._check_value_size(node)
        self._ran.add((node.id, self.step))

    def _check_value_size(self, node: Node) -> None:
        nbytes = new_nbytes(self.env.get(node.id))  # tensors, and plain containers and strings
        if nbytes > self.max_value_bytes:
            raise LimitError(f"{node.describe()} made a value of {nbytes:,} bytes, over the "
                             f"limit of {self.max_value_bytes:,} bytes for one value",
                             node=node.id, op=node.op, line=node.line)

    def _point_view(self, node: Node, cell: _Cell) -> Any:
        """The invoke's part of the event's value; refuses, before any node writes it, a
        write to a part that all rows of the batch share (the plan-time check,
        :func:`tpmlab.ir.rows.check_row_ownership`, on the live value: it also sees what the
        event's template does not describe)."""
        template = self._templates.get(node.id)
        prompt_pass = self.step == 0
        writes = self._writes.get(node.id)
        if writes and node.invoke is not None and not self.layout.owns_all(
                node.invoke, prompt_pass=prompt_pass):
            for writer, path in writes:
                shared = shared_tensors(cell.value, template, self.layout, path)
                if shared:
                    where, tensor = shared[0]
                    item = "".join(f"[{k!r}]" for k in where)
                    raise ExecutionError(
                        f"{writer.describe()} writes {node.path or '<model>'}.{node.io}{item}, "
                        f"a value of shape {tuple(tensor.shape)} that all rows of the batch "
                        "share: inside an invoke it is read-only (write a copy)",
                        node=writer.id, op=writer.op, line=writer.line)
        return invoke_view(cell.value, self.layout, node.invoke, prompt_pass=prompt_pass,
                           template=template)

    def _execute(self, node: Node, cell: _Cell | None) -> None:
        op = node.op
        if op == POINT:
            if node.io == "inputs":  # the whole call: a view of it, as of .input
                cell = _Cell(cell.inputs())
            self.env[node.id] = self._point_view(node, cell)
            return
        if op == SET_POINT:
            self._set_point(node, cell)
            return
        if op == FROM_TRACE:
            if node.id not in self.imports:
                raise ExecutionError(f"{node.describe()}: the value of trace {node.args[0]} "
                                     "is not held here", node=node.id, op=op, line=node.line)
            value = self.imports[node.id]
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_inference() and not torch.is_inference_mode_enabled():
                    value = value.clone()  # a tensor autograd may save (this trace's backward)
            self.env[node.id] = value
            return
        if op == SAVE:
            live = self._arg(node.args[0])
            self.env[node.id] = live  # later nodes compute with the live value, on its device
            if node.kwargs.get("keep"):  # for a later trace: stays here, on the device
                self.kept[node.id] = _kept_copy(live)
                return
            remote = bool(node.kwargs.get("remote"))  # kept on the stage: its store's limits
            if not remote:
                self.saved_bytes += value_nbytes(live, scalar_bytes=0)
            total = self.saved_bytes + self.saved_elsewhere
            if self.max_saved_bytes is not None and total > self.max_saved_bytes:
                raise LimitError(f"the plan has saved {total:,} bytes, over the limit "
                                 f"of {self.max_saved_bytes:,} bytes",
                                 node=node.id, op=node.op, line=node.line)
            # a remote save stays in the stage's store: neither pinned nor in a hand-over segment
            start = time.perf_counter()
            copy = host_copy(live, self.pinned and not remote, None if remote else self.host_alloc)
            self.copy_seconds += time.perf_counter() - start
            if node.steps.single:
                self.saves[node.id] = copy
            else:
                self.saves.setdefault(node.id, []).append(copy)
            return
        if op == GRAD:
            self.env[node.id] = self.gradients.value(node)
            return
        args = self._arg(node.args)
        kwargs = self._arg(node.kwargs)
        if op == PARAM:
            self.env[node.id] = self.module_lookup(node.path).get_parameter(args[0])
            return
        if op == CALL_MODULE:
            module = self.module_lookup(node.path)
            self._suspended += 1  # the module's own hooks must not see this call
            try:
                self.env[node.id] = module(*args, **kwargs)
            finally:
                self._suspended -= 1
            return
        spec = OPS[op]
        if spec.factory:
            kwargs["device"] = self.device  # a plan never names a device: the stage's own
        check_bounds(node, args, kwargs)
        if self.max_value_bytes is not None:
            check_plain_operands(op, args, self.max_value_bytes,
                                 {"node": node.id, "op": op, "line": node.line})
        self.env[node.id] = spec.fn(*args, **kwargs)

    def _set_point(self, node: Node, cell: _Cell | None) -> None:
        """Write a new value into a module value, in place, as ``value[...] = new`` would:
        into the invoke's own rows of the batch, and the same whether or not other invokes
        share the batch. Only a point that owns the whole value may instead replace it with
        a value that cannot be written in place (another structure or shape)."""
        point = self.plan.node(node.args[0].id)
        new = self._arg(node.args[1])
        current = self.env[point.id]
        if not _write_into(current, new):
            whole = point.invoke is None or self.layout.owns_all(point.invoke,
                                                                 prompt_pass=self.step == 0)
            inputs = point.io == "inputs" and cell is not None and cell.call is not None
            if not (whole and cell is not None and (inputs or current is cell.value)):
                raise ExecutionError(
                    f"{node.describe()} cannot write a {_describe(new)} into "
                    f"{point.path or '<model>'}.{point.io}, a {_describe(current)}",
                    node=node.id, op=node.op, line=node.line)
            if inputs:
                try:
                    cell.set_inputs(new)
                except TypeError as e:
                    raise ExecutionError(f"{node.describe()}: {e}", node=node.id, op=node.op,
                                         line=node.line) from None
            else:
                cell.value, cell.replaced = new, True
            current = new
        self.env[point.id] = current
        self.env[node.id] = current

    # -- after the pass ---------------------------------------------------------------------------
    def check_complete(self, steps_run: int = 1) -> None:
        """Raise if a node this runner owns should have run but its event never happened."""
        if self._due(steps_run) <= self._ran:  # the common case: one set comparison
            return
        for node in self.plan.nodes:
            anchor = self.schedule.anchor[node.id]
            if not self._owns(anchor):
                continue
            for step in range(node.steps.start, min(node.steps.stop or steps_run, steps_run)):
                if (node.id, step) not in self._ran:
                    event = "the start" if anchor == START else self.info.events[anchor]
                    raise ExecutionError(
                        f"{node.describe()} never ran at step {step}: {event} did not happen "
                        "in this pass (is the module used with these inputs?)",
                        node=node.id, op=node.op, line=node.line)

    def _due(self, steps_run: int) -> frozenset[tuple[int, int]]:
        """``(node id, step)`` of every run this runner owes after ``steps_run`` steps;
        computed once for a plan (and the copies a plan cache hands out of it)."""
        memo = derived(self.plan)
        key = ("due", self.owned, steps_run)
        due = memo.get(key)
        if due is None:
            due = memo[key] = frozenset(
                (node.id, step) for node in self.plan.nodes
                if self._owns(self.schedule.anchor[node.id])
                for step in range(node.steps.start,
                                  min(node.steps.stop or steps_run, steps_run)))
        return due

    def carry_out(self, last_event: int) -> dict[int, Any]:
        """Values made up to ``last_event`` that nodes after it still read (for the next stage)."""
        out = {}
        for node_id, readers in self.schedule.consumers.items():
            if node_id in self.env and self.schedule.anchor[node_id] <= last_event and any(
                    self.schedule.anchor[r] > last_event for r in readers):
                out[node_id] = self.env[node_id]
        return out

    def results(self) -> dict[int, Any]:
        """The saved values (host copies), once the device's copies into pinned memory are
        done (:attr:`sync_seconds`: how long that wait took)."""
        if self.pinned:
            start = time.perf_counter()
            torch.cuda.synchronize(self.device)
            self.sync_seconds = time.perf_counter() - start
        return self.saves
