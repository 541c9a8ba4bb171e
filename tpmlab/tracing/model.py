"""The client's handle on a deployed model: module tree, tokenizer, trace and generate."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import TpmlabError
from ..ir.model_info import ModelInfo
from ..ir.validate import Limits
from .edits import Edits, EditTrace
from .envoy import Envoy
from .generate import Generate
from .scan import Scan
from .session import Session
from .tracer import Trace

# Runs plan bytes on the engine: ``run_plan(blob, timeout)`` -> (saved values by node id, meta).
RunPlan = Callable[[bytes, "float | None"], "tuple[dict[int, Any], dict[str, Any]]"]
# Runs a session envelope as one request: ``run_session(blob, timeout)`` -> each trace's
# (saved values by node id, meta), in order (tpmlab.ir.session).
RunSession = Callable[[bytes, "float | None"], "list[tuple[dict[int, Any], dict[str, Any]]]"]


class TraceStack:
    """The traces being recorded on one model, innermost last: module proxies record into
    the innermost one."""

    def __init__(self) -> None:
        self._stack: list[Trace] = []
        self.session: Session | None = None  # the open ``with model.session()``, if any

    def push(self, tracer: Trace) -> None:
        self._stack.append(tracer)

    def pop(self, tracer: Trace) -> None:
        if self._stack and self._stack[-1] is tracer:
            self._stack.pop()

    def current(self, path: str = "") -> Trace:
        """The trace a value of module ``path`` belongs to."""
        if not self._stack:
            raise TpmlabError(f"{path or 'model'} values exist only inside `with model.trace(...)` "
                              "or `with model.generate(...)`")
        return self._stack[-1]


class LabModel:
    """A deployed model as seen from the notebook. Holds no weights.

    ``model.layers[5].output`` and every native path work inside
    ``with model.trace(...)`` or ``with model.generate(...)``.
    """

    def __init__(self, name: str, info: ModelInfo, source: Any, *, run_plan: RunPlan,
                 limits: Limits | None = None, lab: Any = None,
                 run_session: RunSession | None = None) -> None:
        self.run_plan = run_plan  # the one way a trace reaches the engine
        # a session as one request, where the engine runs them (None: trace by trace)
        self.run_session = run_session
        self.lab = lab  # the connection this handle came from (for the user; never called here)
        self.limits = limits or Limits()  # the engine's: a trace splits its invokes to fit
        self.name = name
        self.info = info
        self.source = source
        self.adapter = source.adapter
        self.config = source.config
        self._tokenizer = None
        self.tracing = TraceStack()
        self.edits = Edits()  # what every trace of this handle starts with (model.edit)
        self._root = Envoy(self, "", source.meta_model())

    # -- facts ------------------------------------------------------------------------------------
    @property
    def version(self) -> str:
        """Content digest of the deployed weights."""
        return self.info.version

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.source.tokenizer()
        return self._tokenizer

    @property
    def d_model(self) -> int:
        return self.adapter.d_model

    @property
    def meta_model(self):
        return self._root.module

    def adapter_alias(self, name: str) -> str | None:
        return {"embed": self.adapter.embed, "layers": self.adapter.layers,
                "final_norm": self.adapter.final_norm, "unembed": self.adapter.unembed}.get(name)

    def envoy(self, path: str) -> Envoy:
        """The module proxy for a native or aliased dotted path."""
        env = self._root
        for part in self.adapter.resolve(path).split(".") if path else []:
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    # -- requests ---------------------------------------------------------------------------------
    def trace(self, inputs: Any = None, **kwargs: Any) -> Trace:
        """Record a forward pass: ``with model.trace("prompt") as tr: ...``."""
        return Trace(self, inputs, **kwargs)

    def session(self) -> Session:
        """Several traces as one request: ``with model.session(): with model.trace(a): h = ...;
        with model.trace(b): ... = h``. When the block ends the traces run in order on the
        engine; a value of an earlier trace used in a later one needs no ``.save()`` and stays
        on the engine (see :mod:`tpmlab.tracing.session`)."""
        return Session(self)

    def scan(self, inputs: Any = None, **kwargs: Any) -> Scan:
        """A dry run: ``with model.scan("prompt"): shape = model.layers[0].output.save()``
        validates the plan here, without the engine, and each saved value is a meta tensor
        (its shape and dtype)."""
        return Scan(self, inputs, **kwargs)

    def generate(self, inputs: Any = None, *, max_new_tokens: int = 1, **kwargs: Any) -> Generate:
        """Record a generation: ``with model.generate("prompt", max_new_tokens=5) as gen: ...``."""
        return Generate(self, inputs, max_new_tokens=max_new_tokens, **kwargs)

    def attention_probs(self, layer: int):
        """Layer ``layer``'s attention probabilities inside a trace, ``[rows, heads, query pos,
        key pos]`` (float32), computed on the engine from the layer's query and key
        projections (nnsight reads them through ``.source``); see :mod:`tpmlab.tracing.source`."""
        from .source import attention_probs

        return attention_probs(self, layer)

    # -- persistent edits ------------------------------------------------------------------------
    @contextlib.contextmanager
    def edit(self, *, inplace: bool = False) -> Iterator[Any]:
        """Record interventions that every later trace of a handle applies (at every
        generation step), on the whole batch, as nnsight 0.8 does::

            with model.edit() as (tracer, edited):
                edited.layers[1].output[:, -1] += v
            with edited.trace(prompt): ...      # edited; `model` is not

        With ``inplace=True`` the edit is this handle's own (``with model.edit(inplace=True)
        as tracer:``) until :meth:`clear_edits`. Inside the block either handle's modules
        record into the edit. The deployment is never changed: other handles and other
        users see no edit. An edit cannot save values."""
        target = self if inplace else self.handle()

        def done(edits: Edits) -> None:
            target.edits = edits

        tracer = EditTrace(self, done)
        with tracer:
            if target is self:
                yield tracer
                return
            target.tracing.push(tracer)
            try:
                yield tracer, target
            finally:
                target.tracing.pop(tracer)

    def clear_edits(self) -> None:
        """Forget this handle's edits."""
        self.edits = Edits()

    def handle(self) -> LabModel:
        """Another handle on the same deployment, with this one's edits."""
        other = LabModel(self.name, self.info, self.source, run_plan=self.run_plan,
                         limits=self.limits, lab=self.lab, run_session=self.run_session)
        other._tokenizer, other.edits = self._tokenizer, self.edits
        return other

    # -- the module tree ----------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._root, name)

    def __getitem__(self, index: int) -> Envoy:
        return self._root[index]

    @property
    def output(self):
        """The whole model's output (``.logits`` ``[batch, pos, vocab]``)."""
        return self._root.output

    @property
    def input(self):
        return self._root.input

    def __repr__(self) -> str:
        return f"<LabModel {self.name} {self.version[:19]} on {self.info.n_stages} stage(s)>"
