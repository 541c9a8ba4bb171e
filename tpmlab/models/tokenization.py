"""Loading tokenizers the way every tpmlab model uses them."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

#: files whose presence means a folder carries its own tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def prepare(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (so the last position of every prompt is the prediction) and
    a pad token (EOS when the tokenizer has none), as batched prompts need."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The fast tokenizer saved in ``folder``, prepared for batching."""
    tok = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    if not tok.is_fast:
        raise TypeError(f"tokenizer in {folder} is not a fast tokenizer (no tokenizer.json)")
    return prepare(tok)
