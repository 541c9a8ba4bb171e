"""Model sources: what a model is (name, config, adapter) and how to load it.

A source is cheap to make (no weights are read), so the client can build the
module tree and validate plans while only the workers ever call :meth:`load`.
"""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from tpmlab.models.adapters import Adapter, adapter_for
from tpmlab.models.digest import META_FILE, cached_digest, json_digest, store_digest, weights_digest
from tpmlab.models.materialize import KeyFilter, build, meta_model
from tpmlab.models.tokenization import has_tokenizer, load_tokenizer

#: model_type -> (current prefix, prefix in checkpoints written before transformers 5)
LEGACY_PREFIXES: dict[str, list[tuple[str, str]]] = {"gpt_neox": [("lm_head.", "embed_out.")]}


@dataclass
class LoadedModel:
    """A model with (some of) its weights on a device, ready to run.

    ``model`` is in eval mode with ``requires_grad`` off; tensors not selected
    by the load's ``keys`` are on the meta device. The tokenizer is read on first
    use (a pipeline stage never needs it).
    """

    model: PreTrainedModel
    adapter: Adapter
    version: str
    source: ModelSource

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.source.tokenizer()


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (no fast bf16 matmul there), bfloat16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


class ModelSource(ABC):
    """Where a model's config, tokenizer and weights come from.

    Subclasses say how to read tensors, compute the version and find the
    tokenizer; building the tree, partial loads and tied weights live here once.
    """

    def __init__(self, name: str, config: PretrainedConfig) -> None:
        self.name = name
        self.config = config
        # kept for shape/name questions; callers get fresh trees from meta_model()
        self._skeleton = self.meta_model()
        self.adapter: Adapter = adapter_for(config, self._skeleton)
        #: e.g. "model" or "transformer": checkpoints sometimes store names without it
        self.base_model_prefix: str = self._skeleton.base_model_prefix
        self._version: str | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, family={self.adapter.family!r})"

    # -- what subclasses provide -------------------------------------------------
    @abstractmethod
    def _read(self, names: list[str], device: torch.device) -> Mapping[str, torch.Tensor]:
        """Tensors for the given canonical state-dict names (only those: a stage
        must not read the rest)."""

    @abstractmethod
    def _compute_version(self) -> str:
        """The weights' content digest (may be slow; called at most once)."""

    @abstractmethod
    def _load_tokenizer(self) -> PreTrainedTokenizerBase: ...

    # -- the public API -----------------------------------------------------------
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The fast tokenizer, left-padded with a pad token; one instance per source."""
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def meta_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """A fresh module tree on the meta device (no weights), in eval mode."""
        return meta_model(self.config, dtype)

    @property
    def version(self) -> str:
        """``"sha256:<hex>"`` content digest of the stored weights."""
        if self._version is None:
            self._version = self._compute_version()
        return self._version

    def load(
        self,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        keys: KeyFilter | None = None,
    ) -> LoadedModel:
        """Materialize the weights selected by ``keys`` (all when ``None``) on ``device``.

        ``keys`` is a predicate on state-dict names (``"model.layers.3.mlp.up_proj.weight"``);
        only the selected tensors are read and allocated, every other one stays on
        meta. Non-persistent buffers (rotary ``inv_freq``) are always computed on
        ``device``. ``dtype`` defaults to float32 on CPU and bfloat16 elsewhere.
        """
        device = torch.device(device)
        dtype = dtype or default_dtype(device)
        model = build(
            self.config,
            lambda names: self._read(names, device),
            device=device,
            dtype=dtype,
            keys=keys,
        )
        return LoadedModel(
            model=model,
            adapter=self.adapter,
            version=self.version,
            source=self,
        )


class FolderSource(ModelSource):
    """A Hugging Face model folder: ``config.json``, safetensors weights (one file
    or sharded with ``model.safetensors.index.json``) and, usually, tokenizer files.

    A folder without tokenizer files gets the default model's tokenizer, with a
    warning (random-init folders are saved that way).
    """

    def __init__(self, folder: str | Path, name: str | None = None) -> None:
        self._folder = Path(folder).expanduser().resolve()
        config = AutoConfig.from_pretrained(str(self._folder))
        super().__init__(name or str(self._folder), config)
        self._key_files: dict[str, Path] | None = None

    def folder(self) -> Path:
        """The folder holding the files (subclasses may create it on demand)."""
        return self._folder

    def weight_files(self) -> list[Path]:
        folder = self.folder()
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({folder / f for f in weight_map.values()})
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"no safetensors weights in {folder} (tpmlab reads model.safetensors "
                "or a sharded model.safetensors.index.json; convert .bin checkpoints first)"
            )
        return files

    def _index(self) -> dict[str, Path]:
        if self._key_files is None:
            index: dict[str, Path] = {}
            for path in self.weight_files():
                with safe_open(str(path), framework="pt") as f:
                    index.update(dict.fromkeys(f.keys(), path))
            self._key_files = index
        return self._key_files

    def _file_key(self, name: str) -> str | None:
        """The stored key for a model state-dict name; older checkpoints may lack
        (or add) the base model prefix, e.g. ``h.0.attn...`` for ``transformer.h.0.attn...``,
        or use a pre-transformers-5 name (:data:`LEGACY_PREFIXES`)."""
        index = self._index()
        prefix = self.base_model_prefix + "."
        candidates = [name, name.removeprefix(prefix), prefix + name]
        for new, old in LEGACY_PREFIXES.get(self.config.model_type, []):
            if name.startswith(new):
                candidates.append(old + name.removeprefix(new))
        return next((c for c in candidates if c in index), None)

    def _read(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        index = self._index()
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name in names:
            key = self._file_key(name)
            if key is not None:
                by_file.setdefault(index[key], []).append((name, key))
        out: dict[str, torch.Tensor] = {}
        # Read straight onto an accelerator when there is one: no host copy.
        read_device = "cpu" if device.type in ("cpu", "meta") else str(device)
        for path, pairs in by_file.items():
            with safe_open(str(path), framework="pt", device=read_device) as f:
                for name, key in pairs:
                    out[name] = f.get_tensor(key)
        return out

    def _compute_version(self) -> str:
        meta = self.folder() / META_FILE
        if meta.is_file():
            version = json.loads(meta.read_text()).get("version")
            if version:
                return version
        files = self.weight_files()
        key = json_digest(
            {
                "folder": str(self.folder()),
                "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
            }
        )
        version = cached_digest(key)
        if version is None:
            version = folder_weights_digest(files)
            store_digest(key, version, folder=str(self.folder()))
        return version

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if has_tokenizer(self.folder()):
            return load_tokenizer(self.folder())
        from tpmlab.models.default import default_tokenizer

        warnings.warn(
            f"{self.folder()} has no tokenizer files; using the default model's tokenizer",
            stacklevel=3,
        )
        return default_tokenizer()


def folder_weights_digest(files: list[Path]) -> str:
    """:func:`weights_digest` of safetensors files, reading one tensor at a time."""
    handles = [safe_open(str(path), framework="pt") for path in files]
    where = {name: h for h in handles for name in h.keys()}
    return weights_digest((name, where[name].get_tensor(name)) for name in sorted(where))
