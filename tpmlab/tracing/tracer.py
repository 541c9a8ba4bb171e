"""``with model.trace(...)`` and ``with model.generate(...)``: recording a plan, then running it.

Inside the block, module values are proxies and every operation on them is a
node of the plan. When the block ends the plan is encoded, sent to the model's
backend (in-process, Dask stages or a gateway), and the saved proxies receive
their values. Nothing runs if the block raised.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TpmlabError
from ..ir.args import from_native
from ..ir.codec import encode_plan
from ..ir.plan import (
    GenerateOptions,
    Invoke,
    Node,
    Plan,
    Ref,
    Steps,
    TensorRef,
)
from .proxy import Proxy

if TYPE_CHECKING:
    from .model import LabModel

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _user_line() -> str | None:
    """``file:line: code`` of the first caller outside tpmlab and torch (the user's line)."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
            code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            return f"{frame.f_code.co_filename}:{frame.f_lineno}" + (f": {code}" if code else "")
        frame = frame.f_back
    return None


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
                 **input_kwargs: Any) -> None:
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
        self._entered = False
        if inputs is not None or input_kwargs:
            self._invoke = self._add_invoke(inputs, **input_kwargs)

    # -- context --------------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        self._entered = True
        self.model._push(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.model._pop(self)
        if exc_type is not None:
            return None  # the user's error stands; nothing runs
        self.run()
        return None

    @contextlib.contextmanager
    def invoke(self, inputs: Any = None, **input_kwargs: Any) -> Iterator[Trace]:
        """One entry of the batch: a prompt (or list of prompts), token ids
        ``[pos]``/``[rows, pos]``, or ``inputs_embeds=`` ``[pos, d_model]``/``[rows, pos, d_model]``.
        Interventions inside the block touch only these rows; values come back unpadded."""
        previous = self._invoke
        self._invoke = self._add_invoke(inputs, **input_kwargs)
        try:
            yield self
        finally:
            self._invoke = previous

    def _add_invoke(self, inputs: Any = None, *, input_ids: Any = None,
                    inputs_embeds: Any = None) -> int:
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
        self.invokes.append(Invoke(kind, names))
        return len(self.invokes) - 1

    # -- recording ------------------------------------------------------------------------------
    def record(self, op: str, args: list, kwargs: dict | None = None, **fields: Any) -> Proxy:
        node_id = len(self.nodes)
        node = Node(id=node_id, op=op, args=self._arg(args), kwargs=self._arg(kwargs or {}),
                    steps=self._steps, line=_user_line(), **fields)
        self.nodes[node_id] = node
        proxy = Proxy(self, node_id)
        self.proxies[node_id] = proxy
        return proxy

    def point(self, path: str, io: str) -> Proxy:
        if self._invoke is None:
            raise TpmlabError("module values are read inside an invoke: give a prompt to "
                              "trace(...) or use `with tr.invoke(...)`")
        key = (path, io, self._invoke, self._steps)
        if key not in self._points:
            self._points[key] = self.record("point", [], path=path, io=io, invoke=self._invoke)
        return self._points[key]

    def _forget_point(self, path: str, io: str) -> None:
        """After a whole value was replaced, later reads must see the new one."""
        self._points.pop((path, io, self._invoke, self._steps), None)

    def _arg(self, value: Any) -> Any:
        return from_native(value, self._leaf)

    def _leaf(self, value: Any) -> Any:
        if isinstance(value, Proxy):
            if value._tracer is not self:
                raise TpmlabError("a value from another trace cannot be used here; save it and "
                                  "pass its .value")
            return Ref(value._node)
        if isinstance(value, torch.Tensor):
            name = f"c{len(self.tensors)}"
            self.tensors[name] = value.detach().cpu().contiguous()
            return TensorRef(name)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "__index__"):
            return int(value)
        raise TpmlabError(f"a value of type {type(value).__name__} cannot be part of a plan")

    # -- running --------------------------------------------------------------------------------
    def plan(self) -> Plan:
        return Plan(model=self.model.name, model_version=self.model.version, invokes=self.invokes,
                    nodes=list(self.nodes.values()), tensors=dict(self.tensors), mode=self.mode,
                    generate=self._generate_options())

    def _generate_options(self) -> GenerateOptions | None:
        return None

    def run(self) -> TraceResult:
        blob = encode_plan(self.plan())
        values, meta = self.model._backend_run(blob, timeout=self.timeout)
        for node_id, value in values.items():
            if node_id in self.proxies:
                self.proxies[node_id]._set_value(value)
        self.result = TraceResult(values, meta)
        self._after_run(values)
        # Proxies point at the trace; dropping the trace's references back breaks the cycle,
        # so saved tensors (pinned host memory on a GPU) are freed as soon as the user lets go.
        self.proxies.clear()
        self._points.clear()
        return self.result

    def _after_run(self, values: dict[int, Any]) -> None:
        pass


class Generate(Trace):
    """A generation request: interventions apply at chosen steps.

    Outside any step block a node applies to step 0 (the prompt pass). Use
    ``with gen.step(i)``, ``with gen.steps(start, stop)`` (stop excluded, ``None``
    for the end) or ``with gen.all()``; a value saved at several steps comes back
    as a list, one entry per step.

    Decoding (:mod:`tpmlab.runtime.decoding`, the same on every engine and the same
    tokens as Hugging Face's ``generate`` for the same options and ``seed``): greedy, or
    ``do_sample`` with ``temperature``/``top_k``/``top_p``; ``repetition_penalty``; a row
    ends at ``eos_token_id`` (default: the model's) or once its text ends in a ``stop``
    string.
    """

    mode = "generate"

    def __init__(self, model: LabModel, inputs: Any = None, *, max_new_tokens: int = 1,
                 do_sample: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 repetition_penalty: float | None = None, stop: str | list[str] | None = None,
                 eos_token_id: int | list[int] | None = None, timeout: float | None = None,
                 **input_kwargs: Any) -> None:
        super().__init__(model, inputs, timeout=timeout, **input_kwargs)
        self.options = GenerateOptions(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, repetition_penalty=repetition_penalty,
            stop=[stop] if isinstance(stop, str) else stop,
            eos_token_id=[eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        self.output_ids: list[torch.Tensor] = []

    def _generate_options(self) -> GenerateOptions:
        return self.options

    @contextlib.contextmanager
    def steps(self, start: int, stop: int | None) -> Iterator[Generate]:
        previous = self._steps
        self._steps = Steps(start, stop)
        try:
            yield self
        finally:
            self._steps = previous

    def step(self, i: int):
        return self.steps(i, i + 1)

    def all(self):
        return self.steps(0, None)

    def _after_run(self, values: dict[int, Any]) -> None:
        from ..runtime.request import GENERATED

        self.output_ids = list(values.get(GENERATED, []))

    @property
    def generated_ids(self) -> list[torch.Tensor]:
        """New tokens per row (the prompt removed)."""
        lengths = [self.tensors[n].shape[0] for inv in self.invokes for n in inv.tensors]
        kinds = [inv.kind for inv in self.invokes for _ in inv.tensors]
        return [ids if kind == "embeds" else ids[n:]
                for ids, n, kind in zip(self.output_ids, lengths, kinds)]

    @property
    def text(self) -> list[str]:
        """The generated text per row."""
        return [self.model.tokenizer.decode(ids, skip_special_tokens=True)
                for ids in self.generated_ids]
