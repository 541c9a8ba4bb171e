"""Measure a model's events (module inputs and outputs in the order they happen)
and their shapes, with two tiny forward passes where the weights are.

The two passes use different batch sizes and lengths, so a dimension that
follows the batch becomes ``"B"``, one that follows the positions ``"T"``, and
one that stays put its number. Everything else is left unknown (``None``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ir.codec import dtype_name
from ..ir.model_info import event_key
from .batching import row_positions

PROBES = ((2, 5), (3, 7))  # (rows, positions) of the two probe passes


def _structure(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": dtype_name(value.dtype)}
    if isinstance(value, dict):  # ModelOutput
        return {"$dict": {k: _structure(v) for k, v in value.items()
                          if isinstance(v, (torch.Tensor, tuple, list, dict))}}
    if isinstance(value, (tuple, list)):
        return {"$tuple": [_structure(v) for v in value]}
    return None


def _merge(a: Any, b: Any, probes=PROBES) -> Any:
    (b1, t1), (b2, t2) = probes
    if a is None or b is None:
        return None
    if "shape" in a and "shape" in b:
        if len(a["shape"]) != len(b["shape"]):
            return None
        dims: list[Any] = []
        for x, y in zip(a["shape"], b["shape"]):
            if x == y:
                dims.append(x)
            elif (x, y) == (b1, b2):
                dims.append("B")
            elif (x, y) == (t1, t2):
                dims.append("T")
            else:
                dims.append(None)
        return {"shape": dims, "dtype": a["dtype"]}
    for key in ("$tuple", "$dict"):
        if key in a and key in b:
            if key == "$tuple":
                if len(a[key]) != len(b[key]):
                    return None
                return {key: [_merge(x, y) for x, y in zip(a[key], b[key])]}
            return {key: {k: _merge(a[key][k], b[key].get(k)) for k in a[key]}}
    return None


def _record(model: nn.Module, run) -> tuple[list[str], dict[str, Any]]:
    events: list[str] = []
    shapes: dict[str, Any] = {}
    handles = []

    def pre(name):
        def hook(module, args, kwargs):
            key = event_key(name, "input")
            if key not in shapes:
                events.append(key)
                first = args[0] if args else next(iter(kwargs.values()), None)
                shapes[key] = _structure(first)
        return hook

    def post(name):
        def hook(module, args, output):
            key = event_key(name, "output")
            if key not in shapes:
                events.append(key)
                shapes[key] = _structure(output)
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post(name)))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return events, shapes


def probe_events(model: nn.Module, run_with_shape) -> tuple[list[str], dict[str, Any]]:
    """Events in forward order and their shape templates.

    ``run_with_shape(rows, positions)`` runs one forward pass of that size.
    """
    results = [_record(model, lambda r=r, t=t: run_with_shape(r, t)) for r, t in PROBES]
    (events, s1), (_, s2) = results
    shapes = {e: _merge(s1.get(e), s2.get(e)) for e in events}
    return events, shapes


def probe_causal_lm(model: nn.Module) -> tuple[list[str], dict[str, Any]]:
    """Probe a whole Hugging Face causal LM with token ids, called as the engine calls it
    (:func:`tpmlab.runtime.batching.build_batch`: a mask and per-row position ids), so the
    templates show the shapes plans will see."""
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))

    def run(rows: int, positions: int) -> None:
        ids = torch.ones(rows, positions, dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        model(input_ids=ids, attention_mask=mask, position_ids=row_positions(mask),
              use_cache=False)

    return probe_events(model, run)
