"""The random-init model shapes the GPU benchmarks use resolve without drawing weights."""

from __future__ import annotations

import torch

from tpmlab.models import resolve


def test_llama_2_34b_shape_resolves_on_meta():
    source = resolve("llama-2-34b-shape")
    config = source.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (8192, 48, 64, 8, 22016)
    assert config.vocab_size >= len(source.tokenizer())  # every tokenized prompt is valid
    assert 33e9 < source.n_params < 35e9
    assert not source.digest_by_weights  # drawn on the load device, version from its description
    assert source.version == resolve("llama-2-34b-shape").version
    meta = source.meta_model(torch.bfloat16)
    assert all(p.is_meta for p in meta.parameters())
    assert source.adapter.n_layers == 48
