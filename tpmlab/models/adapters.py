"""Architecture adapters: where each family keeps its embedding, layers, norm,
unembedding and attention projections.

Everything above this module speaks in architecture-neutral aliases
(``embed``, ``layers``, ``final_norm``, ``unembed``); an :class:`Adapter` is the
one place that maps them to a family's native Hugging Face paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from tpmlab.models.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Adapter:
    """Native module paths and shape facts of one architecture family.

    Model-level paths (``embed``, ``layers``, ``final_norm``, ``unembed``,
    ``position_embed``) are dotted paths from the ``*ForCausalLM`` root. ``attn``,
    ``mlp`` and ``o_proj`` (the attention's output projection, whose input is the heads'
    outputs side by side, ``[pos, n_heads * head_dim]``) are relative to one decoder
    layer (``layer_path(i) + "." + attn``).

    ``weight_layout`` says how the family's projections hold their weights:

    * ``"linear"`` (llama, GPT-NeoX): ``nn.Linear``, weight ``[out_features, in_features]``,
      ``y = x @ W.T + b``;
    * ``"conv1d"`` (GPT-2): ``Conv1D``, weight ``[in_features, out_features]``,
      ``y = x @ W + b``.
    """

    family: str
    embed: str
    layers: str
    final_norm: str
    unembed: str
    position_embed: str | None
    attn: str
    mlp: str
    o_proj: str
    weight_layout: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int

    ALIASES: ClassVar[tuple[str, ...]] = ("embed", "layers", "final_norm", "unembed")

    def layer_path(self, i: int) -> str:
        """Native path of decoder layer ``i`` (negative indices count from the end)."""
        if not -self.n_layers <= i < self.n_layers:
            raise IndexError(f"layer {i} out of range: the model has {self.n_layers} layers")
        return f"{self.layers}.{i % self.n_layers}"

    def resolve(self, path: str) -> str:
        """Map an alias-first dotted path to the native one.

        ``"layers.3.mlp"`` -> ``"model.layers.3.mlp"`` (llama); native paths and the
        root ``""`` come back unchanged.
        """
        head, sep, rest = path.partition(".")
        if head in self.ALIASES:
            native: str = getattr(self, head)
            return native + sep + rest
        return path

    def module_paths(self) -> dict[str, str]:
        """Every configured path, model-level ones as given and layer-relative
        ones under layer 0, keyed by field name (for validation and display)."""
        paths = {
            "embed": self.embed,
            "layers": self.layers,
            "final_norm": self.final_norm,
            "unembed": self.unembed,
            "position_embed": self.position_embed,
        }
        layer0 = self.layer_path(0) if self.n_layers else None
        for field in ("attn", "mlp", "o_proj"):
            rel = getattr(self, field)
            paths[field] = f"{layer0}.{rel}" if rel and layer0 else None
        return {k: v for k, v in paths.items() if v is not None}

    def check(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedArchitectureError` naming the first configured
        path that ``model`` does not have."""
        for field, path in self.module_paths().items():
            try:
                model.get_submodule(path)
            except AttributeError:
                raise UnsupportedArchitectureError(
                    f"adapter for family {self.family!r} expects {field} at {path!r}, "
                    f"but {type(model).__name__} has no such module"
                ) from None


# Per-family layout: paths only; shape facts come from the config.
_LLAMA_LAYOUT = dict(
    family="llama",
    embed="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    position_embed=None,
    attn="self_attn",
    mlp="mlp",
    o_proj="self_attn.o_proj",
    weight_layout="linear",
)

_GPT2_LAYOUT = dict(
    family="gpt2",
    embed="transformer.wte",
    layers="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    position_embed="transformer.wpe",
    attn="attn",
    mlp="mlp",
    o_proj="attn.c_proj",
    weight_layout="conv1d",
)

_NEOX_LAYOUT = dict(
    family="gpt_neox",
    embed="gpt_neox.embed_in",
    layers="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    position_embed=None,
    attn="attention",
    mlp="mlp",
    o_proj="attention.dense",
    weight_layout="linear",
)

#: model_type -> layout. mistral and qwen2 share llama's module tree exactly.
LAYOUTS: dict[str, dict] = {
    "llama": _LLAMA_LAYOUT,
    "mistral": {**_LLAMA_LAYOUT, "family": "mistral"},
    "qwen2": {**_LLAMA_LAYOUT, "family": "qwen2"},
    "gpt2": _GPT2_LAYOUT,
    "gpt_neox": _NEOX_LAYOUT,
}


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values :func:`adapter_for` accepts."""
    return sorted(LAYOUTS)


def _shape_facts(config: PretrainedConfig) -> dict[str, int]:
    # PretrainedConfig.attribute_map already aliases gpt2's n_embd/n_layer/n_head
    # to hidden_size/num_hidden_layers/num_attention_heads.
    d_model = int(config.hidden_size)
    n_heads = int(config.num_attention_heads)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or d_model // n_heads
    return dict(
        n_layers=int(config.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        d_model=d_model,
        vocab_size=int(config.vocab_size),
    )


def adapter_for(config: PretrainedConfig, model: nn.Module | None = None) -> Adapter:
    """Build the adapter for ``config``'s architecture and check its paths.

    ``model`` is the module tree to check the paths against; when omitted a
    weightless one is built on the meta device (cheap: no memory is allocated).
    """
    model_type = getattr(config, "model_type", None) or type(config).__name__
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise UnsupportedArchitectureError(
            f"no adapter for model_type {model_type!r}: tpmlab needs embed, layers, "
            "final_norm, unembed and attention projections; supported: "
            + ", ".join(supported_model_types())
        )
    adapter = Adapter(**layout, **_shape_facts(config))
    if model is None:
        from tpmlab.models.materialize import meta_model

        model = meta_model(config)
    adapter.check(model)
    return adapter
