"""``with model.trace(...)``: recording a plan, then running it (``model.generate`` is a
trace too: :mod:`tpmlab.tracing.generate`).

Inside the block, module values are proxies and every operation on them is a
node of the plan. When the block ends the plan is encoded, sent to the model's
backend (in-process, Dask stages or a gateway), and the saved proxies receive
their values. Nothing runs if the block raised.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import CodeType
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NotSupportedError, TpmlabError
from ..ir.args import from_native
from ..ir.codec import encode_plan
from ..ir.ops import RANDOM_OPS
from ..ir.plan import (
    FROM_TRACE,
    GRAD,
    SAVE,
    SET_POINT,
    GenerateOptions,
    Invoke,
    Node,
    Plan,
    Ref,
    Steps,
    TensorRef,
)
from .passes import run_in_passes
from .proxy import PairProxy, Proxy, deliver, node_of, owner
from .saves import SaveTracker
from .unsupported import MODULE_ALTERNATIVES

if TYPE_CHECKING:
    from .model import LabModel

# the invoke of points recorded in an empty ``tr.invoke()``: every row of the batch
WHOLE_BATCH = -1

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _is_ours(filename: str) -> bool:
    """Whether code of ``filename`` is tpmlab's or torch's (not the user's)."""
    if not os.path.isabs(filename):  # relative to the working directory, which may change
        return os.path.abspath(filename).startswith((_PACKAGE_DIR, _TORCH_DIR))
    return _is_ours_absolute(filename)


@functools.lru_cache(maxsize=1024)
def _is_ours_absolute(filename: str) -> bool:
    return os.path.normpath(filename).startswith((_PACKAGE_DIR, _TORCH_DIR))


#: tpmlab's and torch's code objects met on the way to the user's line: every recorded node
#: walks the stack through a few of them, each then one look-up (only ours are kept, and
#: they live as long as their modules; the user's files are decided each time)
_OUR_CODE: set[CodeType] = set()
_OUR_CODE_MAX = 4096


def _user_line() -> str | None:
    """``file:line: code`` of the first caller outside tpmlab and torch (the user's line)."""
    frame = sys._getframe(2)
    while frame is not None:
        code_object = frame.f_code
        if code_object not in _OUR_CODE:
            if not _is_ours(code_object.co_filename):
                code = linecache.getline(code_object.co_filename, frame.f_lineno).strip()
                return f"{code_object.co_filename}:{frame.f_lineno}" + (f": {code}" if code else "")
            if len(_OUR_CODE) >= _OUR_CODE_MAX:
                _OUR_CODE.clear()
            _OUR_CODE.add(code_object)
        frame = frame.f_back
    return None


class Barrier:
    """What :meth:`Trace.barrier` returns: calling it (once per invoke) records nothing,
    since the invokes of a plan need no meeting point."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<barrier of {self.n} invokes: a plan needs none>"


@dataclass
class TraceResult:
    """What came back: saved values by node id and the provenance of the run."""

    values: dict[int, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model_version(self) -> str:
        return self.meta.get("model_version", "")

    @property
    def plan_digest(self) -> str:
        return self.meta.get("plan_digest", "")

    @property
    def tpmlab_version(self) -> str:
        return self.meta.get("tpmlab_version", "")


class Trace:
    """Records one request's plan. Use through :meth:`LabModel.trace`."""

    mode = "trace"

    def __init__(self, model: LabModel, inputs: Any = None, *, timeout: float | None = None,
                 seed: int | None = None, **input_kwargs: Any) -> None:
        self.model = model
        self.nodes: dict[int, Node] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.invokes: list[Invoke] = []
        self.proxies: dict[int, Proxy] = {}
        self.result: TraceResult | None = None
        self.timeout = timeout
        self._invoke: int | None = None
        self._steps = Steps()
        self._points: dict[tuple, Proxy] = {}
        self._grads: dict[Any, Proxy] = {}  # node id or tensor name -> its grad node
        self._named: dict[int, tuple[torch.Tensor, list[str]]] = {}  # id(tensor) -> plan names
        self._entered = False
        # random ops (torch.randn_like) draw from generators seeded from this; it is recorded
        # in the plan and in the result's metadata, so the result can be reproduced
        self.seed = seed if seed is not None else secrets.randbits(62)
        self._random_nodes = 0
        self._saves = SaveTracker()  # warns of in-place writes after a save
        self._parameters: dict[int, tuple[torch.nn.Parameter, str]] = {}  # constants by identity
        self.session = model.tracing.session  # a session runs the trace when it ends
        self._stopped_at: str | None = None  # the user's line of tracer.stop()
        self._edit_nodes = 0  # nodes of the handle's persistent edit (ids from 0)
        self._carried: dict[str, Proxy] = {}  # constants filled from earlier traces' saves
        self._kept: dict[int, Proxy] = {}  # node id -> its save kept for a later trace
        self._from: dict[tuple, Proxy] = {}  # (trace, save node, steps) -> its from_trace node
        model.edits.replay_into(self)  # a persistent edit of the handle comes first
        self._edit_nodes = len(self.nodes)
        if inputs is not None or input_kwargs:
            self._invoke = self._add_invoke(inputs, **input_kwargs)

    # -- context --------------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        self._entered = True
        self.model.tracing.push(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.model.tracing.pop(self)
        if exc_type is not None:
            return None  # the user's error stands; nothing runs
        if self.session is not None:
            self.session.add(self)
        else:
            self.run()
        return None

    @contextlib.contextmanager
    def recording(self) -> Iterator[Trace]:
        """Record the block's nodes without running them (for callers that send
        :meth:`plan` themselves): ``with model.trace(p).recording(): ...``."""
        self.model.tracing.push(self)
        try:
            yield self
        finally:
            self.model.tracing.pop(self)

    @contextlib.contextmanager
    def invoke(self, inputs: Any = None, **input_kwargs: Any) -> Iterator[Trace]:
        """One entry of the batch: a prompt (or list of prompts), token ids
        ``[pos]``/``[rows, pos]``, or ``inputs_embeds=`` ``[pos, d_model]``/``[rows, pos, d_model]``.
        Interventions inside the block touch only these rows; values come back unpadded.

        With no input, the block addresses the whole batch made by the other invokes (every
        row, padded on the left as the model sees it)."""
        previous = self._invoke
        if inputs is None and not input_kwargs:
            self._invoke = WHOLE_BATCH
        else:
            self._invoke = self._add_invoke(inputs, **input_kwargs)
        try:
            yield self
        finally:
            self._invoke = previous

    def _add_invoke(self, inputs: Any = None, *, input_ids: Any = None,
                    inputs_embeds: Any = None, **other: Any) -> int:
        if "remote" in other:
            raise NotSupportedError("remote=True is not a trace option here: where a trace "
                                    "runs is chosen once, by tpmlab.connect(gateway=url, "
                                    "token=...) for a shared engine")
        if other:
            raise TpmlabError(f"unknown keyword {sorted(other)[0]!r}: an input is a prompt, "
                              "input_ids= or inputs_embeds= (and trace options timeout=, seed=)")
        if sum(x is not None for x in (inputs, input_ids, inputs_embeds)) != 1:
            raise TpmlabError("give exactly one input: a prompt, input_ids= or inputs_embeds=")
        names = []
        if inputs_embeds is not None:
            emb = torch.as_tensor(inputs_embeds).detach()
            if emb.dim() == 2:
                emb = emb[None]
            if emb.dim() != 3 or emb.shape[-1] != self.model.d_model:
                raise TpmlabError(f"inputs_embeds must be [pos, {self.model.d_model}] or "
                                  f"[rows, pos, {self.model.d_model}], got {tuple(emb.shape)}")
            rows, kind = list(emb.cpu()), "embeds"
        else:
            ids = input_ids if input_ids is not None else inputs
            if isinstance(ids, str) or (isinstance(ids, list) and ids and isinstance(ids[0], str)):
                prompts = [ids] if isinstance(ids, str) else ids
                rows = [torch.tensor(self.model.tokenizer(p)["input_ids"], dtype=torch.long)
                        for p in prompts]
            else:
                t = torch.as_tensor(ids)
                if t.dtype.is_floating_point:
                    raise TpmlabError("token ids must be integers; pass float inputs as inputs_embeds=")
                rows = [t.long()] if t.dim() == 1 else [r.long() for r in t]
            kind = "tokens"
        for row in rows:
            name = f"in{len(self.tensors)}"
            self.tensors[name] = row.contiguous()
            names.append(name)
        if inputs_embeds is not None:  # tr.grad(inputs_embeds) finds its rows
            self._named[id(inputs_embeds)] = (inputs_embeds, names)
        self.invokes.append(Invoke(kind, names))
        return len(self.invokes) - 1

    # -- recording ------------------------------------------------------------------------------
    def stop(self) -> None:
        """End the trace here (nnsight's ``tracer.stop()``): values recorded so far come back
        as usual, and recording anything after it is an error. The engine ends the forward
        pass as soon as the last module value the trace reads or writes has been handled:
        later layers, and later pipeline stages, do no work. (In a generation: see
        :meth:`tpmlab.tracing.generate.Generate.stop`.)"""
        self._stopped_at = _user_line() or "tracer.stop()"

    def record(self, op: str, args: list, kwargs: dict | None = None, **fields: Any) -> Proxy:
        if self._stopped_at is not None:
            raise NotSupportedError(f"nothing can be recorded after tracer.stop() (at "
                                    f"{self._stopped_at}): move it to the end of the block")
        kwargs = dict(kwargs or {})
        if op in RANDOM_OPS:
            kwargs = self._seeded(op, kwargs)
        args, kwargs = self._arg(args), self._arg(kwargs)  # may record a session's from_trace
        node_id = len(self.nodes)
        node = Node(id=node_id, op=op, args=args, kwargs=kwargs,
                    steps=self._steps, line=_user_line(), **fields)
        self.nodes[node_id] = node
        self._saves.observe(node)
        proxy = Proxy(self, node_id)
        self.proxies[node_id] = proxy
        return proxy

    def _seeded(self, op: str, kwargs: dict) -> dict:
        if "generator" in kwargs:
            raise NotSupportedError(f"{op}(generator=...): a generator cannot travel in a plan; "
                                    "give the seed as model.trace(..., seed=n)")
        self._random_nodes += 1
        return {**kwargs, "seed": (self.seed + self._random_nodes) % 2**63}

    def point(self, path: str, io: str) -> Proxy:
        if self._invoke is None:
            raise TpmlabError("module values are read inside an invoke: give a prompt to "
                              "trace(...) or use `with tr.invoke(...)`")
        invoke = None if self._invoke == WHOLE_BATCH else self._invoke
        key = (path, io, self._invoke, self._steps)
        if key not in self._points:
            proxy = self.record("point", [], path=path, io=io, invoke=invoke)
            if io == "inputs":  # (args, kwargs): unpacks
                proxy = self.proxies[node_of(proxy)] = PairProxy(self, node_of(proxy))
            self._points[key] = proxy
        return self._points[key]

    @property
    def inputs(self) -> Proxy:
        """The current invoke's inputs as the model receives them, ``(args, kwargs)``
        (``input_ids`` or ``inputs_embeds``, ``attention_mask``, ``position_ids``): the
        invoke's own rows, without padding; the same as ``model.inputs`` in the invoke."""
        return self.point("", "inputs")

    def cache(self, modules: Any = None, *, filter: Callable[[str], bool] | None = None,
              inputs: bool = False) -> dict[str, Proxy]:
        """Save many modules' values in one call: ``{native path: saved proxy}``, read each
        as ``.value`` after the block. ``modules``: module proxies or paths (default: every
        module of the model); ``filter(path)`` keeps those it is true for; ``inputs=True``
        saves first inputs instead of outputs."""
        io = "input" if inputs else "output"
        if modules is None:
            paths = [e.rsplit(":", 1)[0] for e in self.model.info.events
                     if e.endswith(f":{io}") and e.rsplit(":", 1)[0]]
        else:
            paths = [m if isinstance(m, str) else m.path for m in modules]
        return {p: self.point(p, io).save() for p in paths if filter is None or filter(p)}

    def barrier(self, n: int) -> Barrier:
        """nnsight's meeting point of ``n`` invokes (``barrier = tr.barrier(2)``, then
        ``barrier()`` in each invoke). A plan needs none: a value of one invoke may be used
        in a later invoke of the same trace, at the same module point or after it (the nodes
        of one point run in the order they were recorded), so calling it records nothing."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise TpmlabError(f"barrier(n) takes the number of invokes that call it, got {n!r}")
        return Barrier(n)

    def __getattr__(self, name: str) -> Any:
        if name == "next":
            raise NotSupportedError(MODULE_ALTERNATIVES[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def set_point(self, path: str, io: str, value: Any) -> None:
        """Replace the module value ``path``.``io`` (``module.output = value``)."""
        point = self.point(path, io)
        self.record(SET_POINT, [point, value], path=path, io=io)
        # after a whole value was replaced, later reads must see the new one
        self._points.pop((path, io, self._invoke, self._steps), None)

    def _arg(self, value: Any) -> Any:
        if type(value) in (list, dict) and not value:  # a node without (keyword) arguments
            return type(value)()
        if type(value) is list and len(value) == 1 and isinstance(value[0], Proxy) \
                and owner(value[0]) is self:  # most nodes: one value of this trace
            return [Ref(node_of(value[0]))]
        return from_native(value, self._leaf)

    def _leaf(self, value: Any) -> Any:
        if isinstance(value, Proxy):
            if owner(value) is not self:
                return self._carry(value)
            return Ref(node_of(value))
        if isinstance(value, TensorRef) and value.name in self.tensors:
            return value  # a tensor this trace already carries (tr.grad)
        if isinstance(value, torch.Tensor):
            return TensorRef(self._constant(value))
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "__index__"):
            return int(value)
        raise TpmlabError(f"a value of type {type(value).__name__} cannot be part of a plan")

    def _carry(self, value: Proxy) -> Ref | TensorRef:
        """A value of an earlier trace of the same session. Where the engine runs sessions,
        that trace keeps it on the engine (``save(keep=True)``) and this one reads it with a
        ``from_trace`` node; otherwise that trace saves it and this one carries it as a
        constant filled in before it runs (through the notebook)."""
        source = owner(value)
        if self.session is None or source.session is not self.session:
            raise TpmlabError("a value from another trace cannot be used here: save it and "
                              "pass its .value, or record both traces in `with model.session():`")
        if self.session.on_engine:
            if source not in self.session.traces:
                raise TpmlabError("a value of a trace is used in another trace once its block "
                                  "has ended: record the traces one after the other")
            trace = self.session.traces.index(source)
            save = node_of(source.keep_later(value))
            key = (trace, save, self._steps)
            if key not in self._from:
                self._from[key] = self.record(FROM_TRACE, [trace, save])
            return Ref(node_of(self._from[key]))
        name = f"s{len(self._carried)}"
        self._carried[name] = owner(value).save_later(value)
        return TensorRef(name)

    def keep_later(self, value: Proxy) -> Proxy:
        """Keep ``value`` on the engine for a later trace of the session (once per value)."""
        node = node_of(value)
        if not self.nodes[node].steps.single:
            raise NotSupportedError("a value used in a later trace of a session must be one "
                                    "tensor, not a list (a value of several generation steps "
                                    "is a list: index a step)")
        if node not in self._kept:
            stopped, self._stopped_at = self._stopped_at, None  # after tracer.stop() too
            try:
                self._kept[node] = self.save_later(value, keep=True)
            finally:
                self._stopped_at = stopped
        return self._kept[node]

    def save_later(self, value: Proxy, **kwargs: Any) -> Proxy:
        """Save ``value`` after this trace's block has ended (at the steps it is made at)."""
        previous, self._steps = self._steps, self.nodes[node_of(value)].steps
        try:
            return self.record(SAVE, [value], kwargs)
        finally:
            self._steps = previous

    def _constant(self, value: torch.Tensor) -> str:
        """The name of a constant in the plan's tensor table. A parameter of a module used
        several times (an SAE applied at each layer) travels once."""
        if isinstance(value, torch.nn.Parameter):
            known = self._parameters.get(id(value))
            if known is not None and known[0] is value:
                return known[1]
        known_tensor = self._named.get(id(value))  # one constant, however often it is used
        if known_tensor is not None and known_tensor[0] is value and len(known_tensor[1]) == 1 \
                and known_tensor[1][0].startswith("c"):
            return known_tensor[1][0]
        name = f"c{len(self.tensors)}"
        self.tensors[name] = value.detach().cpu().contiguous()
        self._named[id(value)] = (value, [name])  # tr.grad(value) finds it
        if isinstance(value, torch.nn.Parameter):
            self._parameters[id(value)] = (value, name)
        return name

    # -- gradients ------------------------------------------------------------------------------
    def grad_of(self, proxy: Proxy) -> Proxy:
        """The grad node of a module point or parameter proxy (one per value)."""
        if proxy._node not in self._grads:
            self._grads[proxy._node] = self.record(GRAD, [proxy])
        return self._grads[proxy._node]

    def grad(self, tensor: torch.Tensor) -> Proxy:
        """The gradient of the backward's loss with respect to a tensor this trace sent: a
        constant used in it (a soft prompt, a probe) or its ``inputs_embeds``; same shape."""
        known = self._named.get(id(tensor))
        if known is None:
            raise TpmlabError("this tensor is not part of the trace: use it in the trace (or "
                              "pass it as inputs_embeds=) before asking for its gradient")
        names = known[1]
        for name in names:
            if name not in self._grads:
                self._grads[name] = self.record(GRAD, [TensorRef(name)])
        if len(names) == 1 and not (names[0].startswith("in") and tensor.dim() == 3):
            return self._grads[names[0]]
        return self.record("stack", [[self._grads[n] for n in names]])

    # -- running --------------------------------------------------------------------------------
    def plan(self) -> Plan:
        return Plan(model=self.model.name, model_version=self.model.version, invokes=self.invokes,
                    nodes=list(self.nodes.values()), tensors=dict(self.tensors), mode=self.mode,
                    generate=self._generate_options(), stop=self._stops())

    def _generate_options(self) -> GenerateOptions | None:
        return None

    def _stops(self) -> bool:
        """Whether the engine ends the run at the stop (:meth:`stop`)."""
        return self._stopped_at is not None

    def run(self) -> TraceResult:
        """Send the plan to the engine (in several passes where its invokes exceed the
        engine's limit per pass, see :mod:`tpmlab.tracing.passes`); saved proxies get their
        values."""
        return self.deliver(*self.execute(self.final_plan()))

    def final_plan(self) -> Plan:
        """The plan to send, with the values carried from earlier traces filled in."""
        for name, saved in self._carried.items():
            if not isinstance(saved.value, torch.Tensor):
                raise NotSupportedError("a value used in a later trace of a session must be one "
                                        f"tensor, not a {type(saved.value).__name__} (a value "
                                        "of several generation steps is a list: index a step)")
            self.tensors[name] = saved.value.detach().cpu().contiguous()
        return self.plan()

    def deliver(self, values: dict[int, Any], meta: dict[str, Any]) -> TraceResult:
        """Hand the engine's answer to the saved proxies; the trace's result."""
        if self._random_nodes:
            meta = {**meta, "seed": self.seed}
        for node_id, value in values.items():
            if node_id in self.proxies:
                deliver(self.proxies[node_id], value)
        self.result = TraceResult(values, meta)
        self._after_run(values)
        # Proxies point at the trace; dropping the trace's references back breaks the cycle,
        # so saved tensors (pinned host memory on a GPU) are freed as soon as the user lets go.
        # The gradient reads' proxies too: a trace with a backward otherwise kept its saved
        # gradients (pinned host memory on a GPU) until the garbage collector found the cycle,
        # and each request pinned new memory meanwhile.
        self.proxies.clear()
        self._points.clear()
        self._grads.clear()
        return self.result

    def execute(self, plan: Plan) -> tuple[dict[int, Any], dict[str, Any]]:
        """Where the plan runs: the engine (a dry run overrides this)."""
        return run_in_passes(plan, self.model.limits.max_invokes,
                             lambda part: self.model.run_plan(encode_plan(part), self.timeout))

    def _after_run(self, values: dict[int, Any]) -> None:
        pass
