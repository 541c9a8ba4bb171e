"""Values inside a module's forward that no submodule returns, recorded as whitelisted ops
from the values around them (nnsight reaches these through ``.source``).

:func:`attention_probs`: the attention probabilities of one layer, ``[rows, heads, query
pos, key pos]`` (float32), computed on the engine from the layer's own query and key
projections as the eager attention of the family computes them::

    p = softmax(mask(q k^T * s))     s = head_dim^-1/2; q, k after rotary embeddings
                                     (Llama, GPT-NeoX: on a leading part of each head)

Within an invoke every position is a real token, so the mask is causal alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import NotSupportedError

if TYPE_CHECKING:
    from .model import LabModel
    from .proxy import Proxy

_ROTARY = {"llama": "model.rotary_emb", "mistral": "model.rotary_emb", "qwen2": "model.rotary_emb",
           "gpt_neox": "gpt_neox.rotary_emb"}


def attention_probs(model: LabModel, layer: int) -> Proxy:
    """Layer ``layer``'s attention probabilities, ``[rows, heads, query pos, key pos]``."""
    a = model.adapter
    attn = model.envoy(f"{model.layers[layer].path}.{a.attn}")
    if a.family in _ROTARY:
        if a.family == "gpt_neox":  # one projection: per head [q | k | v]
            qkv = _heads(attn.query_key_value.output, 3 * a.head_dim)
            q, k = qkv[..., :a.head_dim], qkv[..., a.head_dim:2 * a.head_dim]
        else:
            q, k = _heads(attn.q_proj.output, a.head_dim), _heads(attn.k_proj.output, a.head_dim)
        rotary = model.envoy(_ROTARY[a.family]).output
        dims = _rotary_dims(model.config, a.head_dim)
        cos, sin = rotary[0], rotary[1]
        q, k = _rotate(q, cos, sin, dims, a.head_dim), _rotate(k, cos, sin, dims, a.head_dim)
        if a.n_kv_heads != a.n_heads:  # grouped-query: each key head serves n_rep query heads
            k = torch.cat([k.unsqueeze(2)] * (a.n_heads // a.n_kv_heads), dim=2).flatten(1, 2)
        scale = a.head_dim ** -0.5
    elif a.family == "gpt2":
        qkv = attn.c_attn.output.split(a.d_model, dim=-1)
        q, k = _heads(qkv[0], a.head_dim), _heads(qkv[1], a.head_dim)
        scale = a.head_dim ** -0.5
        if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer + 1
    else:
        raise NotSupportedError(f"attention probabilities are not available for the "
                                f"{a.family!r} family yet (llama, mistral, qwen2, gpt2 and "
                                "gpt_neox are)")
    scores = (q @ k.transpose(-1, -2)).float() * scale
    future = ~torch.ones_like(scores).tril().bool()
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def _heads(x: Any, head_dim: int) -> Any:
    """``[rows, pos, heads * head_dim]`` -> ``[rows, heads, pos, head_dim]``."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _rotary_dims(config: Any, head_dim: int) -> int:
    """How many leading dimensions of each head the rotary embedding turns (GPT-NeoX: a part)."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor",
                        getattr(config, "partial_rotary_factor", getattr(config, "rotary_pct", 1.0)))
    return int(head_dim * factor)


def _rotate(x: Any, cos: Any, sin: Any, dims: int, head_dim: int) -> Any:
    """Rotary position embedding on the first ``dims`` dimensions of each head
    (``x cos + rotate_half(x) sin``), the rest passed through."""
    turned, rest = x[..., :dims], x[..., dims:]
    half = dims // 2
    rotated = torch.cat([-turned[..., half:], turned[..., :half]], dim=-1)
    out = turned * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
    return out if dims == head_dim else torch.cat([out, rest], dim=-1)
