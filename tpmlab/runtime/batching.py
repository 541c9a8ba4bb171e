"""Turning a plan's invokes into one padded batch, and each invoke's view of it.

Prompts of different lengths are padded on the left, so position ``-1`` is every
row's last real token; the attention mask hides the padding and position ids
count real tokens only, so each row computes exactly what it would alone.
Every invoke sees its own rows with its padding cut off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ir.ops import named_fields
from ..ir.plan import Plan


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


def build_batch(plan: Plan, *, pad_id: int, device: torch.device,
                embed_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], BatchLayout]:
    """Model keyword arguments (``input_ids`` or ``inputs_embeds``, ``attention_mask``,
    ``position_ids``) for the whole batch, and its layout."""
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
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
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
    layout = BatchLayout(rows=layout_rows, pads=pads, lengths=lengths, seq_len=seq_len, n_rows=n_rows)
    if layout.padded:  # without padding the model's own defaults are the same and cost less
        kwargs["attention_mask"] = mask.to(device)
        kwargs["position_ids"] = position_ids.to(device)
    return kwargs, layout


def invoke_view(value: Any, layout: BatchLayout, invoke: int | None, *, prompt_pass: bool) -> Any:
    """The part of a batch value that belongs to one invoke (a view: writes reach the batch).

    Tensors whose first dimension is the batch are cut to the invoke's rows; in the
    prompt pass, those whose second dimension is the padded length also lose the
    invoke's left padding. Containers are mapped element by element.
    """
    if invoke is None:
        return value
    start, stop = layout.rows[invoke]
    pad = layout.pads[invoke] if prompt_pass else 0
    if start == 0 and stop == layout.n_rows and pad == 0:
        return value
    return _cut(value, layout, start, stop, pad)


def _cut(value: Any, layout: BatchLayout, start: int, stop: int, pad: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == layout.n_rows:
            value = value[start:stop]
            if pad and value.dim() >= 2 and value.shape[1] == layout.seq_len:
                value = value[:, pad:]
        return value
    if isinstance(value, dict):
        cut = {k: _cut(v, layout, start, stop, pad) for k, v in value.items()}
        try:
            return type(value)(**cut)
        except TypeError:
            return cut
    if isinstance(value, tuple) and not named_fields(value):
        return tuple(_cut(v, layout, start, stop, pad) for v in value)
    return value


def unpad_tokens(ids: torch.Tensor, layout: BatchLayout, prompt_len: int) -> list[torch.Tensor]:
    """Generated sequences per row, without left padding: ``[len_i + new]`` each."""
    out = []
    for rows in layout.lengths:
        for length in rows:
            out.append(length)
    return [ids[i, prompt_len - length:] for i, length in enumerate(out)]
