"""Random-init models: real architectures with seeded random weights, for tests
(tiny, fast) and benchmarks (real shapes such as Llama-3-8B) without any
download.

Every tensor is drawn from its own generator seeded by ``(seed, name)``, so a
pipeline stage can create just its slice and still get exactly the tensors a
full load would. Initialisation follows Hugging Face's rule of thumb: norms
weight 1, biases 0, everything else ``normal(0, config.initializer_range)``.

Version digests: models up to :data:`DIGEST_BY_WEIGHTS_MAX` parameters are
digested from their materialized float32 weights (like any checkpoint); they are
drawn in float32 on the CPU, one tensor at a time, and each is cast and moved
before the next is drawn. Larger ones (``llama-3-8b-shape``) would take minutes
to draw on a CPU, so each of their tensors is drawn directly in the load dtype on
the load device (CUDA's generator: the bits differ from a CPU draw), one at a
time, so that a load never holds more than its weights; their version is the
digest of ``(family, seed, config, init scheme)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from tpmlab.models.digest import (
    CURRENT,
    cache_key,
    cached_digest,
    json_digest,
    store_digest,
    weights_digest,
)
from tpmlab.models.materialize import tie_groups
from tpmlab.models.sources import ModelSource

#: bump when the drawing rule changes: it changes every random-init version
INIT_SCHEME = "tpmlab-random-init-v2"  # v2: large models drawn in the load dtype
DIGEST_BY_WEIGHTS_MAX = 2**28

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "gpt2": GPT2Config,
    "gpt_neox": GPTNeoXConfig,
}

#: special tokens of the default tokenizer, which random-init models use
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)

#: hidden 64, 4 layers, 4 heads, intermediate 128, vocab of the default tokenizer
TINY: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_inner=128, vocab_size=49152, n_positions=1024),
    "gpt_neox": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=49152,
        max_position_embeddings=2048,
    ),
}

#: the published Meta-Llama-3-8B shape (no rope scaling: that came with 3.1)
LLAMA3_8B: dict[str, Any] = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

#: the published Llama-2-34B / CodeLlama-34B shape (48 layers, grouped-query attention with
#: 8 KV heads), ~34B parameters: a model that needs several GPUs in bf16 (~68 GB).
#: Vocabulary: the default tokenizer's 49152 ids, not the published 32000, so that any
#: prompt it tokenizes is a valid input.
LLAMA2_34B: dict[str, Any] = dict(
    hidden_size=8192,
    num_hidden_layers=48,
    num_attention_heads=64,
    num_key_value_heads=8,
    intermediate_size=22016,
    vocab_size=49152,
    rope_theta=1000000.0,
    max_position_embeddings=16384,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RandomInitSource(ModelSource):
    """A model whose weights are a deterministic function of (family, seed, config)."""

    def __init__(self, family: str, config: PretrainedConfig, *, seed: int, name: str) -> None:
        self.family = family
        self.seed = seed
        super().__init__(name, config)
        tree = self._skeleton
        self._kinds = {name: _kind(tree, name) for name in tie_groups(tree)}
        self._shapes = {n: t.shape for n, t in tree.state_dict(keep_vars=True).items()}
        self.n_params = sum(p.numel() for p in tree.parameters())

    def describe(self) -> dict[str, Any]:
        """Everything that determines the weights."""
        config = self.config.to_dict()
        for volatile in ("transformers_version", "_name_or_path", "dtype"):
            config.pop(volatile, None)
        return {"family": self.family, "seed": self.seed, "config": config, "init": INIT_SCHEME}

    @property
    def digest_by_weights(self) -> bool:
        return self.n_params <= DIGEST_BY_WEIGHTS_MAX

    def _draw(self, name: str, shape: torch.Size, device: torch.device,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        kind = self._kinds[name]
        if kind == "ones":
            return torch.ones(shape, device=device, dtype=dtype)
        if kind == "zeros":
            return torch.zeros(shape, device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(_tensor_seed(self.seed, name))
        std = float(getattr(self.config, "initializer_range", 0.02))
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)

    def _draw_device(self, device: torch.device) -> torch.device:
        small = self.digest_by_weights or device.type in ("cpu", "meta")
        return torch.device("cpu") if small else device

    def _read(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        return dict(self._tensors(names, device, torch.float32))

    def _tensors(
        self, names: list[str], device: torch.device, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        # Small models: float32 on the CPU, the draws their version digests. Large ones:
        # straight in the load dtype on the load device. One tensor at a time either way.
        where = self._draw_device(device)
        draw_dtype = torch.float32 if self.digest_by_weights else dtype
        for name in names:
            yield name, self._draw(name, self._shapes[name], where, draw_dtype)

    def _compute_version(self) -> str:
        if not self.digest_by_weights:
            return json_digest(self.describe())
        return self._digest_in(CURRENT)

    def _digest_in(self, scheme: str) -> str:
        if not self.digest_by_weights:  # named by what makes the weights, not by them
            raise NotImplementedError("large random-init models are named by their recipe")
        key = cache_key(self.describe(), scheme)
        version = cached_digest(key)
        if version is None:
            canonical = sorted(set(tie_groups(self._skeleton).values()) & set(self._shapes))
            cpu = torch.device("cpu")
            version = weights_digest(((n, self._draw(n, self._shapes[n], cpu)) for n in canonical),
                                     scheme)
            store_digest(key, version, name=self.name)
        return version

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        from tpmlab.models.default import default_tokenizer

        return default_tokenizer()


def _kind(tree: torch.nn.Module, name: str) -> str:
    owner_path, _, attr = name.rpartition(".")
    owner = tree.get_submodule(owner_path)
    if "Norm" in type(owner).__name__:
        return "ones" if attr == "weight" else "zeros"
    return "zeros" if attr == "bias" else "normal"


def random_init_source(
    family: str, *, seed: int = 0, name: str | None = None, **config_overrides: Any
) -> RandomInitSource:
    """A tiny random-init model of ``family`` (``llama``, ``gpt2``, ``gpt_neox``).

    ``config_overrides`` are config attributes (``num_hidden_layers=2``...) applied
    on top of the tiny defaults; the tokenizer is the default model's.
    """
    if family not in CONFIG_CLASSES:
        raise ValueError(
            f"unknown random-init family {family!r}; expected one of {sorted(CONFIG_CLASSES)}"
        )
    settings = {**TINY[family], **TOKEN_IDS, **config_overrides}
    config = CONFIG_CLASSES[family](**settings)
    if name is None:
        name = f"random-{family}-seed{seed}"
        if config_overrides:
            name += "-" + json_digest(config_overrides)[len("sha256:") :][:8]
    return RandomInitSource(family, config, seed=seed, name=name)


def known_random_models() -> Mapping[str, dict[str, Any]]:
    """Registry names of the random-init models, with their arguments."""
    return {
        "tiny-llama": dict(family="llama"),
        "tiny-gpt2": dict(family="gpt2"),
        "tiny-gpt-neox": dict(family="gpt_neox"),
        "llama-3-8b-shape": dict(family="llama", **LLAMA3_8B),
        "llama-2-34b-shape": dict(family="llama", **LLAMA2_34B),
    }
