"""One pipeline stage: decoder layers ``first..last`` of a Hugging Face causal LM on one device.

The stage runs the model's *own* forward (so masks for left padding, position ids,
rotary embeddings and the KV cache are computed exactly as in a whole-model pass),
with the layers it does not hold swapped for stand-ins:

* layers before ``first`` pass the hidden state through untouched;
* on a stage that is not the last, the layer after ``last`` stops the pass and
  hands back the hidden state ``[batch, pos, d_model]``;
* stages after the first receive that hidden state as ``inputs_embeds`` (a GPT-2
  style position embedding, already added on stage 0, becomes zero there).

The stage's real submodules run exactly as in a whole-model forward, so forward
hooks (the plan runner's) fire on them in the same order. The KV cache of a
generation is a ``DynamicCache`` whose layers outside the stage are dummies, so the
mask is sized from the stage's first own layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer

from ..runtime.batching import row_positions
from ..runtime.probe import probe_events
from .partition import StageSpan, stage_keys


class _StageExit(Exception):
    """Raised by the stand-in after the stage's last layer, carrying the hidden state."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("stage done")
        self.hidden = hidden


class PassThrough(nn.Module):
    """Stand-in for a decoder layer held by an earlier stage: returns its input."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class StopHere(nn.Module):
    """Stand-in for the first decoder layer of the next stage: ends this stage's pass."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise _StageExit(hidden_states)


class ZeroPositions(nn.Module):
    """Stand-in for a learned position embedding already applied on stage 0."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.get_default_dtype(), device=position_ids.device)


class StageModel:
    """The weights of one stage, loaded on its device, and its forward pass.

    Only the stage's state-dict keys are materialized (``source.load(keys=...)``);
    every other tensor stays on the meta device.
    """

    def __init__(self, source: Any, span: StageSpan, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.source, self.span, self.device, self.dtype = source, span, device, dtype
        self.adapter = adapter = source.adapter
        loaded = source.load(dtype=dtype, device=device, keys=stage_keys(adapter, span))
        self.model = loaded.model
        self.version = loaded.version
        self.modules: dict[str, nn.Module] = dict(self.model.named_modules())  # the real ones
        layers = self.model.get_submodule(adapter.layers)
        for i in range(adapter.n_layers):
            if i < span.first:
                layers[i] = PassThrough()
            elif i == span.last + 1:
                layers[i] = StopHere()
        if not span.is_first and adapter.position_embed:
            self.model.set_submodule(adapter.position_embed, ZeroPositions())
        self.first_event = None if span.is_first else f"{adapter.layers}.{span.first}:input"
        self.last_event = None if span.is_last else f"{adapter.layers}.{span.last}:output"

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this stage holds for real (not on meta)."""
        seen, n = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if not t.is_meta and id(t) not in seen:
                seen.add(id(t))
                n += t.numel() * t.element_size()
        return n

    def new_cache(self) -> DynamicCache:
        """A KV cache holding this stage's layers only."""
        cache = DynamicCache(config=self.model.config)
        for i in range(len(cache.layers)):
            if not self.span.first <= i <= self.span.last:
                cache.layers[i] = DummyLayer()
        return cache

    def forward(self, *, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, cache: DynamicCache | None = None,
                logits_to_keep: int = 0) -> Any:
        """Run the stage. Stage 0 takes ``input_ids`` ``[batch, pos]`` or ``inputs_embeds``
        ``[batch, pos, d_model]``, later stages ``hidden`` ``[batch, pos, d_model]``.
        ``attention_mask`` covers the cached positions too: ``[batch, past + pos]``.

        Returns the hidden state after the stage's last layer, or on the last stage the
        model's output (``logits`` ``[batch, pos or logits_to_keep, vocab]``).
        """
        # the input first: the model's ``:input`` event is its first argument, as in process
        kwargs: dict[str, Any] = {}
        if self.span.is_first:
            if input_ids is not None:
                kwargs["input_ids"] = input_ids
            else:
                kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["inputs_embeds"] = hidden
        kwargs.update(attention_mask=attention_mask, position_ids=position_ids,
                      cache=cache, use_cache=cache is not None)
        if self.span.is_last:
            kwargs["logits_to_keep"] = logits_to_keep
        try:
            return self.model(**kwargs)
        except _StageExit as done:
            return done.hidden

    def probe(self) -> tuple[list[str], dict[str, Any]]:
        """This stage's events in forward order and their shape templates
        (see :func:`tpmlab.runtime.probe.probe_events`)."""
        d_model = self.adapter.d_model

        def run(rows: int, positions: int) -> None:
            mask = torch.ones(rows, positions, dtype=torch.long, device=self.device)
            pos = row_positions(mask)
            if self.span.is_first:
                ids = torch.ones(rows, positions, dtype=torch.long, device=self.device)
                self.forward(input_ids=ids, attention_mask=mask, position_ids=pos)
            else:
                h = torch.zeros(rows, positions, d_model, dtype=self.dtype, device=self.device)
                self.forward(hidden=h, attention_mask=mask, position_ids=pos)

        events, shapes = probe_events(self.model, run)
        lo = events.index(self.first_event) if self.first_event else 0
        hi = events.index(self.last_event) + 1 if self.last_event else len(events)
        events = events[lo:hi]
        return events, {e: shapes[e] for e in events}
