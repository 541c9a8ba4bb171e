"""The decoding loop every engine runs: next tokens from logits, and when to stop.

One :class:`Decoding` per generation request holds the loop's state, the same on a
whole model in this process and on a Dask pipeline; an engine only supplies the
forward pass. Iterating it gives each step's input (:class:`Feed`); the engine runs
the forward for it, picks tokens from the last position's logits with
:func:`next_tokens` and hands them back with :meth:`Decoding.advance`::

    decoding = Decoding(options, prompt_ids, mask, positions, eos=..., pad_id=..., tokenizer=...)
    for feed in decoding:
        logits = forward(feed)                               # [rows, vocab]
        decoding.advance(next_tokens(options, decoding.ids, logits, feed.step))

The steps are those of Hugging Face's ``generate`` (``transformers`` 5), so the same
options and seed give the same tokens:

1. scores = logits in float32, then in this order: repetition penalty (over every
   token of the sequence so far, prompt included), temperature, top-k, top-p (the last
   three only when sampling), each with Hugging Face's own processor;
2. greedy: ``argmax``; sampling: one ``torch.multinomial`` draw per row from
   ``softmax(scores)``, with ``torch.manual_seed(seed)`` before the first step when a
   seed is given;
3. a row that has finished (end-of-sequence) goes on with the pad token;
4. a row finishes at an end-of-sequence token (the plan's ``eos_token_id``, else the
   model's) or when its text so far ends
   in one of the stop strings (Hugging Face's ``StopStringCriteria``); decoding ends when
   every row has finished or after ``max_new_tokens`` steps;
5. a plan's ``tracer.stop()`` ends decoding in the pass where it is reached (the engine
   calls :meth:`Decoding.halt` instead of :meth:`Decoding.advance`): that step chooses no
   tokens, no later step runs, and, as nnsight's ``generate`` returns nothing once stopped,
   no tokens come back.

Options the plan does not give take Hugging Face's library defaults (sampling keeps the
top 50 tokens unless ``top_k`` says otherwise, ``top_k=0`` keeps all; the others are
off); a model's own shipped generation defaults (a ``repetition_penalty``, say) do not
apply, only its end-of-sequence tokens where the plan names none.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..ir.plan import GenerateOptions

DEFAULT_TOP_K = 50  # Hugging Face's top_k when sampling and none is given


@dataclass
class Feed:
    """One step's input. ``input_ids`` ``[rows, pos]`` (the prompt at step 0, then each row's
    last token) is ``None`` at step 0 of a prompt given as embeddings; ``attention_mask``
    ``[rows, past + pos]`` covers the cached positions; ``position_ids`` ``[rows, pos]``."""

    step: int
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


#: logits dtypes whose values float32 holds exactly (so the order of the scores is theirs)
_EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


def needs_history(options: GenerateOptions) -> bool:
    """Whether choosing a token reads the sequence so far (a repetition penalty does)."""
    return options.repetition_penalty is not None and options.repetition_penalty != 1.0


def next_tokens(options: GenerateOptions, ids: torch.Tensor | None, logits: torch.Tensor,
                step: int) -> torch.Tensor:
    """The next token of each row ``[rows]`` from the last position's logits ``[rows, vocab]``.

    ``ids`` ``[rows, length]``: the sequences so far (:attr:`Decoding.ids`); read only where
    :func:`needs_history`. Runs where the logits are (a pipeline's last stage), so the
    sampler's random state is that device's."""
    if (not options.do_sample and not needs_history(options)
            and logits.dtype in _EXACT_IN_FLOAT32):
        # greedy on scores no processor changes: float32 holds these logits exactly, so their
        # argmax is that of the float32 scores (the same maximum, the first index of it)
        # without a copy of the whole vocabulary each step
        return logits.argmax(-1)
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.to(dtype=torch.float32, copy=True)
    if needs_history(options):
        scores = RepetitionPenaltyLogitsProcessor(options.repetition_penalty)(
            ids.to(scores.device), scores)
    if not options.do_sample:
        return scores.argmax(-1)
    if step == 0 and options.seed is not None:
        torch.manual_seed(options.seed)
    if options.temperature is not None and options.temperature != 1.0:
        scores = TemperatureLogitsWarper(options.temperature)(None, scores)
    top_k = DEFAULT_TOP_K if options.top_k is None else options.top_k
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if options.top_p is not None and options.top_p < 1.0:
        scores = TopPLogitsWarper(options.top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)


def next_step_inputs(attention_mask: torch.Tensor, position_ids: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention mask ``[rows, past + pos + 1]`` and position ids ``[rows, 1]`` of the
    step after one whose were ``attention_mask`` ``[rows, past + pos]`` and ``position_ids``
    ``[rows, pos]``: one more position, attended by every row (a finished row's pad token too,
    as in Hugging Face's ``generate``). The driver's :class:`Decoding` and each pipeline stage
    (which keeps its own, so a step's message need not carry them) both use this."""
    ones = torch.ones(attention_mask.shape[0], 1, dtype=attention_mask.dtype,
                      device=attention_mask.device)
    return torch.cat([attention_mask, ones], dim=1), position_ids[:, -1:] + 1


def eos_ids(options: GenerateOptions, generation_config: Any) -> list[int]:
    """The token ids that end a row: the plan's ``eos_token_id``, else the model's
    end-of-sequence tokens (its ``generation_config``)."""
    if options.eos_token_id is not None:
        return list(options.eos_token_id)
    eos = getattr(generation_config, "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


class Decoding:
    """One generation request's decoding state (on the engine that drives the loop).

    ``prompt_ids`` ``[rows, pos]``: the padded prompt batch, or ``None`` for a prompt given
    as embeddings (then :attr:`ids` starts empty, as in Hugging Face's ``generate``);
    ``attention_mask``/``position_ids`` ``[rows, pos]``: the prompt pass's. ``eos``: the
    model's end-of-sequence ids; ``tokenizer``: needed for stop strings only.
    """

    def __init__(self, options: GenerateOptions, prompt_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor, position_ids: torch.Tensor, *, eos: list[int],
                 pad_id: int, tokenizer: Any = None) -> None:
        self.options = options
        rows = attention_mask.shape[0]
        self.prompt_ids = prompt_ids
        self.ids = (prompt_ids.cpu() if prompt_ids is not None
                    else torch.zeros(rows, 0, dtype=torch.long))
        self.unfinished = torch.ones(rows, dtype=torch.long)
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.pad_id = pad_id
        self.step = 0
        self.new: list[torch.Tensor] = []
        self.halted = False  # tracer.stop() ended decoding: no tokens come back
        self._stop = None
        if options.stop:
            from transformers import StopStringCriteria

            self._stop = StopStringCriteria(tokenizer, list(options.stop))
        self._feed: Feed | None = Feed(0, prompt_ids, attention_mask, position_ids)

    def __iter__(self) -> Iterator[Feed]:
        while self._feed is not None:
            yield self._feed

    def advance(self, tokens: torch.Tensor) -> bool:
        """Take the step's chosen tokens ``[rows]``; True while decoding goes on."""
        tokens = tokens.cpu()
        if len(self.eos):  # a finished row goes on with the pad token
            tokens = tokens * self.unfinished + self.pad_id * (1 - self.unfinished)
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=-1)
        self.new.append(tokens)
        done = torch.zeros_like(self.unfinished, dtype=torch.bool)
        if self._stop is not None:
            done |= self._stop(self.ids, None).cpu()
        if len(self.eos):
            done |= torch.isin(tokens, self.eos)
        self.unfinished = self.unfinished & ~done
        self.step += 1
        last = self._feed
        if self.step >= self.options.max_new_tokens or int(self.unfinished.max()) == 0:
            self._feed = None
            return False
        mask, positions = next_step_inputs(last.attention_mask, last.position_ids)
        self._feed = Feed(self.step, tokens[:, None].to(mask.device), mask, positions)
        return True

    def halt(self) -> None:
        """End decoding in the current step's pass (``tracer.stop()`` was reached in it):
        the step chooses no tokens and no later step runs."""
        self.halted = True
        self._feed = None

    @property
    def steps_run(self) -> int:
        """Steps whose pass ran: whole, or (a halted step) up to its stop."""
        return self.step + self.halted

    def outputs(self, lengths: list[int]) -> list[torch.Tensor]:
        """Each row's tokens ``[n + new]``: its prompt without padding (``lengths``: each row's
        real prompt length) then its new tokens; for embeddings, the new tokens only."""
        out = torch.stack(self.new, dim=1)
        if self.prompt_ids is None:
            return [out[i] for i in range(out.shape[0])]
        ids = self.prompt_ids.cpu()
        return [torch.cat([ids[i, ids.shape[1] - n:], out[i]]) for i, n in enumerate(lengths)]
