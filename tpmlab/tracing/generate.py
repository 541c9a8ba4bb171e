"""``with model.generate(...)``: a trace over generation steps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..ir.plan import GenerateOptions, Steps
from .steps import StepBlock, StepIter
from .tracer import Trace

if TYPE_CHECKING:
    from .model import LabModel


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
        super().__init__(model, inputs, timeout=timeout, seed=seed, **input_kwargs)
        self.options = GenerateOptions(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, repetition_penalty=repetition_penalty,
            stop=[stop] if isinstance(stop, str) else stop,
            eos_token_id=[eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        self.output_ids: list[torch.Tensor] = []
        self._blocks: list[tuple[int, Steps]] = []  # open step blocks: (first node id, steps)
        self._never_reached = False  # a tracer.stop() after a block of every step, or a
        # loop past the last step, is never reached

    def _generate_options(self) -> GenerateOptions:
        return self.options

    @contextlib.contextmanager
    def steps(self, start: int, stop: int | None) -> Iterator[StepBlock]:
        """Nodes recorded in the block run at steps ``start <= step < stop``."""
        previous = self._steps
        self._steps = Steps(start, stop)
        self._blocks.append((len(self.nodes), self._steps))
        try:
            yield StepBlock(start, stop)
        finally:
            self._blocks.pop()
            self._steps = previous

    def step(self, i: int):
        return self.steps(i, i + 1)

    def all(self):
        return self.steps(0, None)

    @property
    def iter(self) -> StepIter:
        """``for step in gen.iter[a:b]:`` runs the loop's body once per step, recording it
        for that step alone (``step`` is the step's number, so ``if step == 2:`` works);
        a value saved in the body is one value per iteration. An open end stops at
        ``max_new_tokens``."""
        return StepIter(self.steps, self.options.max_new_tokens,
                        stopped=lambda: self._stopped_at is not None, past_end=self._ran_out)

    def _ran_out(self) -> None:
        """A ``gen.iter`` loop asked for steps past ``max_new_tokens``: in nnsight it waits
        for a step that never comes, so a later ``tracer.stop()`` is never reached."""
        self._never_reached = True

    def stop(self) -> None:
        """End the generation where nnsight's ``tracer.stop()`` ends it: right after the last
        module value recorded before it, at its step. Layers after it in that step's pass
        (and later pipeline stages) and every later step do no work; the values saved so
        far come back, and no generated tokens do (:attr:`output_ids` stays empty, as
        nnsight's ``generate`` returns nothing once stopped). Recording anything after it is
        an error.

        In ``for step in gen.iter[...]`` the loop ends with the step that called it. In a
        ``with`` block of several steps (``gen.all()``, ``gen.steps(a, b)``) the block's
        nodes run at its first step only, as nnsight's block form runs its body once before
        the stop: a value saved there is one value, not a list. After a block of every step
        to the end (``gen.all()`` left before the stop) or a loop that asked for steps past
        ``max_new_tokens`` (``gen.iter[:]``) the stop is never reached, as in nnsight: the
        generation runs to its end. A persistent edit (:meth:`LabModel.edit`)
        applies at every step until the stop."""
        super().stop()
        nodes = list(self.nodes.values())
        inside = self._blocks[0][0] if self._blocks else len(nodes)
        if any(n.steps.stop is None for n in nodes[self._edit_nodes:inside]):
            self._never_reached = True  # the engine runs the generation to its end
        if self._never_reached:
            return
        for first, steps in self._blocks:
            once = Steps(steps.start, steps.start + 1)
            for node in nodes[first:]:
                if node.steps == steps:
                    node.steps = once

    def _stops(self) -> bool:
        return super()._stops() and not self._never_reached

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
