"""Persistent edits: interventions recorded once and applied to every later trace of one
model handle (nnsight's ``model.edit()``).

An edit is plan data like any trace: its nodes read and write module values of the whole
batch, and each later trace of the handle starts with a copy of them (at every step of a
generation). Nothing changes on the engine: the deployment other users share is untouched,
and another handle of the same model sees no edit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NotSupportedError
from ..ir.plan import SAVE, Node, Steps
from .proxy import Proxy
from .tracer import WHOLE_BATCH, Trace

if TYPE_CHECKING:
    from .model import LabModel


@dataclass(frozen=True)
class Edits:
    """The nodes (ids from 0) and constants a trace of an edited handle starts with."""

    nodes: tuple[Node, ...] = ()
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def replay_into(self, trace: Trace) -> None:
        """Add the edit to an empty ``trace``, for every step of a generation."""
        steps = Steps(0, None) if trace.mode == "generate" else Steps()
        for node in self.nodes:
            trace.nodes[node.id] = dataclasses.replace(node, steps=steps)
        trace.tensors.update(self.tensors)


class EditTrace(Trace):
    """``with model.edit() as edited:`` records into this; nothing runs at the end. Module
    values in it are those of the whole batch of each later trace."""

    def __init__(self, model: LabModel, on_done: Any) -> None:
        super().__init__(model)
        self._invoke = WHOLE_BATCH
        self._on_done = on_done

    def record(self, op: str, args: list, kwargs: dict | None = None, **fields: Any) -> Proxy:
        if op == SAVE:
            raise NotSupportedError("an edit cannot save values: save them in the traces that "
                                    "use the edited model")
        return super().record(op, args, kwargs, **fields)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.model.tracing.pop(self)
        if exc_type is None:
            self._on_done(Edits(tuple(self.nodes.values()), dict(self.tensors)))
        return None
