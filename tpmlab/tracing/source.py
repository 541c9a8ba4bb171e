"""Values inside a module's forward that no submodule returns, recorded as whitelisted ops
from the values around them (nnsight reaches these through ``.source``).

:func:`attention_probs`: the attention probabilities of one layer, ``[rows, heads, query
pos, key pos]`` (float32), computed on the engine from the layer's own query and key
projections as the eager attention of the family computes them::

    p = softmax(mask(q k^T * s))     s = head_dim^-1/2; q, k after rotary embeddings
                                     (Llama, GPT-NeoX: on a leading part of each head)

Within an invoke every position is a real token, so the mask is causal alone.

:class:`Source`: ``module.source``, nnsight's names for values inside a module's forward,
each mapped to module values (no code travels, nothing is re-run):

* ``self_<submodule>_0``: a submodule called in the forward (``mlp.source.self_act_fn_0``,
  the MLP's activation; ``self_attn.source.self_o_proj_0``): that submodule's
  ``.output`` / ``.input`` / ``.inputs``;
* ``attention_interface_<n>`` on the attention of a decoder layer: the attention
  function's output ``(attn_output, attn_weights)``: ``attn_output`` ``[rows, pos, heads,
  head_dim]`` is the output projection's input, unflattened (a view: writes reach it),
  ``attn_weights`` the layer's :func:`attention_probs`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NotSupportedError

if TYPE_CHECKING:
    from .envoy import Envoy
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


_SUBMODULE = re.compile(r"self_(\w+?)_(\d+)$")
_INTERFACE = re.compile(r"attention_interface(_\d+)?$")


class Source:
    """``module.source``: values inside the module's forward, by nnsight's names (see the
    module docstring for those offered)."""

    def __init__(self, envoy: Envoy) -> None:
        object.__setattr__(self, "_envoy", envoy)

    def __getattr__(self, name: str) -> Any:
        envoy = self._envoy
        match = _SUBMODULE.match(name)
        if match and match.group(1) in envoy.module._modules:
            if match.group(2) != "0":
                raise NotSupportedError(f".source.{name}: {match.group(1)} is read once per "
                                        f"forward here; use .source.self_{match.group(1)}_0")
            return getattr(envoy, match.group(1))
        if _INTERFACE.match(name) and _layer_of_attention(envoy) is not None:
            return AttentionInterface(envoy)
        offered = [f"self_{m}_0" for m in envoy.module._modules]
        if _layer_of_attention(envoy) is not None:
            offered.insert(0, "attention_interface_1")
        raise NotSupportedError(
            f"{envoy.path}.source.{name} is not offered: a plan reads values inside a forward "
            f"only where module values give them ({', '.join(offered) or 'none here'}); "
            "otherwise compute it from the submodules' .input/.output (attention "
            "probabilities: model.attention_probs(layer))")

    def __setattr__(self, name: str, value: Any) -> None:
        raise NotSupportedError(f".source.{name} cannot be assigned: set its .output")

    def __repr__(self) -> str:
        return f"<source of {self._envoy.path}>"


def _layer_of_attention(envoy: Envoy) -> int | None:
    """The layer index when ``envoy`` is the attention block of a decoder layer."""
    model = envoy._model
    prefix = model.adapter.layers + "."
    rest = envoy.path[len(prefix):] if envoy.path.startswith(prefix) else ""
    index, _, sub = rest.partition(".")
    return int(index) if index.isdigit() and sub == model.adapter.attn else None


class AttentionInterface:
    """``self_attn.source.attention_interface_1``: the attention function's call."""

    def __init__(self, envoy: Envoy) -> None:
        self._envoy = envoy

    @property
    def output(self) -> InterfaceOutput:
        """``(attn_output, attn_weights)``: index, unpack or ``.save()`` it."""
        return InterfaceOutput(self._envoy)

    @output.setter
    def output(self, value: Any) -> None:
        """``attention_interface_1.output = (attn_output, attn_weights)``: the output
        projection reads the new ``attn_output`` (the weights are not read after the call)."""
        heads = value[0] if isinstance(value, (tuple, list)) else value
        _projection(self._envoy).input = heads.flatten(-2)


class InterfaceOutput:
    """The attention function's output: ``[0]`` the heads' outputs ``[rows, pos, heads,
    head_dim]`` (a view of the output projection's input), ``[1]`` the attention
    probabilities ``[rows, heads, query pos, key pos]``; each recorded when first read."""

    def __init__(self, envoy: Envoy) -> None:
        self._envoy = envoy
        self._parts: dict[int, Proxy] = {}

    def __getitem__(self, index: int) -> Proxy:
        if index not in (0, 1, -1, -2):
            raise IndexError(f"the attention function's output has two parts, not {index}")
        index %= 2
        if index not in self._parts:
            envoy = self._envoy
            if index == 0:
                adapter = envoy._model.adapter
                heads = _projection(envoy).input
                self._parts[0] = heads.unflatten(-1, (adapter.n_heads, adapter.head_dim))
            else:
                self._parts[1] = attention_probs(envoy._model, _layer_of_attention(envoy))
        return self._parts[index]

    def __iter__(self):
        return iter((self[0], self[1]))

    def __len__(self) -> int:
        return 2

    def save(self) -> Proxy:
        """Save both parts (a tuple after the block)."""
        tracer = self._envoy._model.tracing.current(self._envoy.path)
        return tracer.record("make_tuple", [self[0], self[1]]).save()


def _projection(attention: Envoy) -> Envoy:
    """The attention's output projection (its input is the heads' outputs, concatenated)."""
    model = attention._model
    layer_path = attention.path[:-len(model.adapter.attn) - 1]
    return model.envoy(f"{layer_path}.{model.adapter.o_proj}")
