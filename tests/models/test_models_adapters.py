import pytest
from torch import nn
from transformers import BertConfig, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config
from transformers.pytorch_utils import Conv1D

from tpmlab.models import Adapter, UnsupportedArchitectureError, adapter_for, resolve
from tpmlab.models.materialize import meta_model

TINY = ["tiny-llama", "tiny-gpt2", "tiny-gpt-neox"]


@pytest.fixture(scope="module", params=TINY)
def source(request):
    return resolve(request.param)


def test_model_level_paths_point_at_the_right_modules(source):
    a, m = source.adapter, source.meta_model()
    embed = m.get_submodule(a.resolve("embed"))
    assert isinstance(embed, nn.Embedding) and embed.weight.shape == (a.vocab_size, a.d_model)
    layers = m.get_submodule(a.resolve("layers"))
    assert isinstance(layers, nn.ModuleList) and len(layers) == a.n_layers == 4
    assert "Norm" in type(m.get_submodule(a.resolve("final_norm"))).__name__
    unembed = m.get_submodule(a.resolve("unembed"))
    assert isinstance(unembed, nn.Linear) and unembed.out_features == a.vocab_size
    assert m.get_submodule(a.layer_path(2)) is layers[2]
    if a.position_embed:
        assert isinstance(m.get_submodule(a.position_embed), nn.Embedding)


def test_attention_output_projection_has_the_documented_layout(source):
    """``o_proj`` takes the heads side by side and holds its weight as ``weight_layout`` says
    (the attention lens splits it per head on that fact)."""
    a, m = source.adapter, source.meta_model()
    layer = m.get_submodule(a.layer_path(0))
    assert "Attention" in type(layer.get_submodule(a.attn)).__name__
    assert "MLP" in type(layer.get_submodule(a.mlp)).__name__
    o = layer.get_submodule(a.o_proj)
    heads = a.n_heads * a.head_dim
    if a.weight_layout == "conv1d":
        assert isinstance(o, Conv1D) and o.weight.shape == (heads, a.d_model)
    else:
        assert a.weight_layout == "linear"
        assert isinstance(o, nn.Linear) and o.weight.shape == (a.d_model, heads)
    if a.family == "llama":  # grouped-query attention: fewer key/value heads
        attn = layer.get_submodule(a.attn)
        assert attn.q_proj.out_features == heads
        assert attn.k_proj.out_features == attn.v_proj.out_features == a.n_kv_heads * a.head_dim


def test_tiny_shape_facts():
    llama = resolve("tiny-llama").adapter
    assert (llama.d_model, llama.n_layers, llama.n_heads, llama.n_kv_heads) == (64, 4, 4, 2)
    assert (llama.head_dim, llama.vocab_size) == (16, 49152)
    gpt2 = resolve("tiny-gpt2").adapter
    assert (gpt2.family, gpt2.n_kv_heads, gpt2.position_embed) == ("gpt2", 4, "transformer.wpe")


def test_aliases_resolve_to_native_paths():
    a = resolve("tiny-llama").adapter
    assert Adapter.ALIASES == ("embed", "layers", "final_norm", "unembed")
    assert a.resolve("embed") == "model.embed_tokens"
    assert a.resolve("layers") == "model.layers"
    assert a.resolve("layers.3.mlp") == "model.layers.3.mlp"
    assert a.resolve("final_norm") == "model.norm"
    assert a.resolve("unembed.weight") == "lm_head.weight"
    assert a.resolve("model.layers.1.self_attn") == "model.layers.1.self_attn"
    assert a.resolve("") == ""
    assert a.resolve("embedding") == "embedding"  # only whole first components are aliases
    g = resolve("tiny-gpt2").adapter
    assert g.resolve("layers.0.attn.c_attn") == "transformer.h.0.attn.c_attn"
    assert g.resolve("final_norm") == "transformer.ln_f"


def test_layer_path_bounds():
    a = resolve("tiny-gpt-neox").adapter
    assert a.layer_path(0) == "gpt_neox.layers.0"
    assert a.layer_path(-1) == "gpt_neox.layers.3"
    with pytest.raises(IndexError, match="4 layers"):
        a.layer_path(4)


@pytest.mark.parametrize("config_cls", [MistralConfig, Qwen2Config])
def test_llama_layout_relatives(config_cls):
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    a = adapter_for(config)
    assert a.embed == "model.embed_tokens" and a.n_kv_heads == 2 and a.head_dim == 8


def test_unsupported_architecture_names_model_type_and_needs():
    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for(BertConfig())
    msg = str(err.value)
    assert "'bert'" in msg
    assert "embed, layers, final_norm, unembed" in msg
    assert "gpt2" in msg and "gpt_neox" in msg and "llama" in msg


def test_unknown_model_type_is_rejected():
    class FakeConfig(PretrainedConfig):
        model_type = "not-a-model"

    with pytest.raises(UnsupportedArchitectureError, match="'not-a-model'"):
        adapter_for(FakeConfig())


def test_missing_configured_path_is_named():
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
    )
    model = meta_model(config)
    del model.model.norm
    with pytest.raises(UnsupportedArchitectureError, match="'model.norm'"):
        adapter_for(config, model)


def test_adapter_is_frozen():
    a = resolve("tiny-llama").adapter
    with pytest.raises(AttributeError):
        a.embed = "x"
    assert hash(a) == hash(resolve("tiny-llama").adapter)  # usable as a dict key
