"""The intervention plan: a graph of nodes that is plain data.

A plan is what the tracing API records and what every executor runs. It never
holds code: each node is an op name from the whitelist (:mod:`tpmlab.ir.ops`),
its arguments (constants, references to other nodes, indices) and, for module
points, where in the forward pass it reads.

Argument values inside ``Node.args`` / ``Node.kwargs`` are built from
``None``, bools, ints, floats, strings, lists, dicts with string keys, and the
small marker classes of :mod:`tpmlab.ir.args`, the module of the argument grammar
(:class:`Ref`, :class:`TensorRef`, :class:`Slice`, :class:`Tuple`, :class:`EllipsisArg`,
:class:`DType`; importable from here too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .args import DType, EllipsisArg, Ref, Slice, TensorRef, Tuple, refs  # noqa: F401 (re-exported)

SCHEMA_VERSION = 1

# Node ops that are not tensor ops (see tpmlab.ir.ops for the tensor ops).
POINT = "point"  # the input or output of a module at an event of the pass
SET_POINT = "set_point"  # replace a module's input or output
CALL_MODULE = "call_module"  # apply a model module to a value
SAVE = "save"  # send a value back to the client
PARAM = "param"  # read a module's parameter (args: [name]), e.g. an attention output weight
BACKWARD = "backward"  # back-propagate a scalar (args: [loss]); see tpmlab.ir.gradients
GRAD = "grad"  # the gradient of a point, a parameter (args: [node]) or a constant (args: [tensor])
# a value an earlier trace of the same session kept on the engine (args: [trace, its save
# node]; that save has ``keep=True``); see tpmlab.ir.session
FROM_TRACE = "from_trace"
STRUCTURAL_OPS = (POINT, SET_POINT, CALL_MODULE, SAVE, PARAM, BACKWARD, GRAD, FROM_TRACE)

# "inputs": every positional and keyword input of the call, ``(args, kwargs)``, read at the
# same event as "input" (the first input)
IO_KINDS = ("output", "input", "inputs")


@dataclass(frozen=True)
class Steps:
    """Generation steps a node runs at: ``start <= step < stop``; ``stop=None`` means all later steps."""

    start: int = 0
    stop: int | None = 1

    def contains(self, step: int) -> bool:
        return step >= self.start and (self.stop is None or step < self.stop)

    @property
    def single(self) -> bool:
        return self.stop is not None and self.stop == self.start + 1


@dataclass
class Node:
    """One step of a plan.

    ``op``: a whitelisted tensor op or one of :data:`STRUCTURAL_OPS`.
    ``path``/``io``: the module and side for ``point``, ``set_point`` and ``call_module``.
    ``invoke``: the batch entry (``tr.invoke``) whose rows a point reads; ``None`` = all rows.
    ``steps``: the generation steps it runs at (a trace is step 0).
    ``line``: the user's source line that created it, for error messages.
    """

    id: int
    op: str
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    path: str | None = None
    io: str | None = None
    invoke: int | None = None
    steps: Steps = field(default_factory=Steps)
    line: str | None = None

    def refs(self) -> list[int]:
        """Ids of the nodes this node reads."""
        return refs([self.args, self.kwargs])

    def describe(self) -> str:
        target = f" {self.path}.{self.io}" if self.io else (f" {self.path}" if self.path else "")
        return f"node {self.id} ({self.op}{target})"


@dataclass
class Invoke:
    """One entry of the batch: token ids (a list of 1-D int tensors, one per row) or
    input embeddings ``[rows, pos, d_model]``, named in the plan's tensor table."""

    kind: str  # "tokens" | "embeds"
    tensors: list[str]


@dataclass
class GenerateOptions:
    """How a generation decodes (:mod:`tpmlab.runtime.decoding`); an option left ``None``
    takes Hugging Face's default (``top_k``: 50 when sampling, ``0`` for none; the others off).

    ``repetition_penalty``: divides (multiplies, if negative) the score of every token already
    in the sequence; ``stop``: strings that end a row once its text ends in one of them;
    ``eos_token_id``: the token ids that end a row (``None``: the model's end-of-sequence
    tokens; ``[]``: none, every row runs ``max_new_tokens``)."""

    max_new_tokens: int = 1
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] | None = None
    eos_token_id: list[int] | None = None


@dataclass
class Plan:
    """A whole request: the model it targets, the batch, the nodes and their constants."""

    model: str
    model_version: str
    invokes: list[Invoke]
    nodes: list[Node]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    mode: str = "trace"  # "trace" | "generate"
    generate: GenerateOptions | None = None
    schema: int = SCHEMA_VERSION
    # tracer.stop(): the run ends once the last event with nodes of the last step with nodes
    # has run (Schedule.stop_point), so later layers, pipeline stages and generation steps do
    # no work; the values saved are the same, and a stopped generation returns no tokens
    stop: bool = False

    def node(self, node_id: int) -> Node:
        return self.nodes_by_id[node_id]

    @property
    def nodes_by_id(self) -> dict[int, Node]:
        cached = self.__dict__.get("_by_id")
        if cached is None or len(cached) != len(self.nodes):
            cached = {n.id: n for n in self.nodes}
            self.__dict__["_by_id"] = cached
        return cached

    def replace(self, **changes: Any) -> Plan:
        return dataclasses.replace(self, **changes)
