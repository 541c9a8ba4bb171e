"""Turning a plan's invokes into one padded batch, and each invoke's view of it.

Prompts of different lengths are padded on the left, so position ``-1`` is every
row's last real token; the attention mask hides the padding and position ids
count real tokens only, so each row computes what it would alone.

The position ids are always passed, one row each (never one row broadcast over the
batch): the values made from them (rotary ``cos``/``sin``, learned position
embeddings) then belong to each row, so an invoke can write its own and the shape it
sees does not depend on which other prompts share the batch.

Every invoke sees its own rows with its padding cut off, as a view: its writes reach
its rows of the batch and nothing else (see :mod:`tpmlab.ir.rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ir.ops import named_fields
from ..ir.plan import Plan
from ..ir.rows import Path, subtemplate, tensor_dims


@dataclass
class BatchLayout:
    rows: list[tuple[int, int]]  # per invoke: [start, stop) rows of the batch
    pads: list[int]  # per invoke: left padding columns common to all its rows
    lengths: list[list[int]]  # per invoke: each row's real length
    seq_len: int  # padded length of the prompt pass
    n_rows: int

    @property
    def padded(self) -> bool:
        return any(length != self.seq_len for rows in self.lengths for length in rows)

    def owns_all(self, invoke: int, *, prompt_pass: bool) -> bool:
        """Whether ``invoke``'s view of a batch value is the whole value."""
        start, stop = self.rows[invoke]
        return start == 0 and stop == self.n_rows and not (prompt_pass and self.pads[invoke])


def row_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[rows, pos]`` for an attention mask ``[rows, pos]`` (1 = real token):
    each row counts its real tokens from 0; padding gets 0. A tensor of its own per row."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def build_batch(plan: Plan, *, pad_id: int, device: torch.device,
                embed_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], BatchLayout]:
    """Model keyword arguments (``input_ids`` or ``inputs_embeds`` first, then
    ``attention_mask`` and ``position_ids``, each ``[rows, pos]``) and the layout."""
    rows_of = [[plan.tensors[n] for n in inv.tensors] for inv in plan.invokes]
    seq_len = max(t.shape[0] for rows in rows_of for t in rows)
    layout_rows, pads, lengths = [], [], []
    start = 0
    for rows in rows_of:
        layout_rows.append((start, start + len(rows)))
        row_lengths = [t.shape[0] for t in rows]
        lengths.append(row_lengths)
        pads.append(seq_len - max(row_lengths))
        start += len(rows)
    n_rows = start
    flat = [t for rows in rows_of for t in rows]
    mask = torch.zeros(n_rows, seq_len, dtype=torch.long)
    for i, t in enumerate(flat):
        mask[i, seq_len - t.shape[0]:] = 1
    kwargs: dict[str, Any] = {}
    if plan.invokes[0].kind == "tokens":
        ids = torch.full((n_rows, seq_len), pad_id, dtype=torch.long)
        for i, t in enumerate(flat):
            ids[i, seq_len - t.shape[0]:] = t.long()
        kwargs["input_ids"] = ids.to(device)
    else:
        d_model = flat[0].shape[-1]
        dtype = embed_dtype or flat[0].dtype
        embeds = torch.zeros(n_rows, seq_len, d_model, dtype=dtype)
        for i, t in enumerate(flat):
            embeds[i, seq_len - t.shape[0]:] = t.to(dtype)
        kwargs["inputs_embeds"] = embeds.to(device)
    kwargs["attention_mask"] = mask.to(device)
    kwargs["position_ids"] = row_positions(mask).to(device)
    layout = BatchLayout(rows=layout_rows, pads=pads, lengths=lengths, seq_len=seq_len, n_rows=n_rows)
    return kwargs, layout


def invoke_view(value: Any, layout: BatchLayout, invoke: int | None, *, prompt_pass: bool,
                template: Any = None) -> Any:
    """The part of a batch value that belongs to one invoke (a view: writes reach the batch).

    ``template`` is the event's shape template (:attr:`ModelInfo.shapes`): in each tensor,
    the ``"B"`` dimension is cut to the invoke's rows and, in the prompt pass, the ``"T"``
    dimensions lose the invoke's left padding. A tensor without a ``"B"`` dimension is
    shared by all rows and passed as it is (it is read-only to the invoke). Where the
    template does not describe the value, the first dimension is taken as the batch if it
    has the batch's size, and the second as the positions if it has their length.
    Containers are mapped element by element.
    """
    if invoke is None or layout.owns_all(invoke, prompt_pass=prompt_pass):
        return value
    start, stop = layout.rows[invoke]
    pad = layout.pads[invoke] if prompt_pass else 0
    return _cut(value, template, layout, start, stop, pad)


def batch_dims(value: torch.Tensor, template: Any, layout: BatchLayout) -> list:
    """Per dimension of ``value``: ``"B"``, ``"T"`` or something else, from the template
    where it describes the value, else guessed from the sizes."""
    dims = tensor_dims(template)
    if dims is not None and len(dims) == value.dim():
        return dims
    guess: list = [None] * value.dim()
    if value.dim() >= 1 and value.shape[0] == layout.n_rows:
        guess[0] = "B"
        if value.dim() >= 2 and value.shape[1] == layout.seq_len:
            guess[1] = "T"
    return guess


def _cut(value: Any, template: Any, layout: BatchLayout, start: int, stop: int, pad: int) -> Any:
    if isinstance(value, torch.Tensor):
        for d, kind in enumerate(batch_dims(value, template, layout)):
            if kind == "B" and value.shape[d] == layout.n_rows:
                value = value.narrow(d, start, stop - start)
            elif kind == "T" and pad and value.shape[d] == layout.seq_len:
                value = value.narrow(d, pad, layout.seq_len - pad)
        return value
    if isinstance(value, dict):
        cut = {k: _cut(v, subtemplate(template, k), layout, start, stop, pad)
               for k, v in value.items()}
        try:
            return type(value)(**cut)
        except TypeError:
            return cut
    if isinstance(value, tuple) and not named_fields(value):
        return tuple(_cut(v, subtemplate(template, i), layout, start, stop, pad)
                     for i, v in enumerate(value))
    return value


def shared_tensors(value: Any, template: Any, layout: BatchLayout, path: Path | None
                   ) -> list[tuple[Path, torch.Tensor]]:
    """The tensors of a live batch value (under ``path``; ``None``: anywhere) that all rows
    share: without a batch dimension, or with one whose rows are one memory (stride 0)."""
    node, tmpl, prefix = value, template, ()
    for key in path or ():
        try:
            node = node[key] if not isinstance(key, str) or isinstance(node, dict) \
                else getattr(node, key)
        except (KeyError, IndexError, TypeError, AttributeError):
            return []
        tmpl, prefix = subtemplate(tmpl, key), prefix + (key,)
    out: list[tuple[Path, torch.Tensor]] = []
    _collect_shared(node, tmpl, layout, prefix, out)
    return out


def _collect_shared(value: Any, template: Any, layout: BatchLayout, path: Path,
                    out: list[tuple[Path, torch.Tensor]]) -> None:
    if isinstance(value, torch.Tensor):
        dims = batch_dims(value, template, layout)
        rows = [d for d, kind in enumerate(dims) if kind == "B" and value.shape[d] == layout.n_rows]
        if not rows or (layout.n_rows > 1 and value.stride(rows[0]) == 0):
            out.append((path, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            _collect_shared(v, subtemplate(template, k), layout, path + (k,), out)
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _collect_shared(v, subtemplate(template, i), layout, path + (i,), out)

