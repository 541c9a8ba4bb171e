"""Model sources: what a model is (name, config, adapter) and how to load it.

A source is cheap to make (no weights are read), so the client can build the
module tree and validate plans while only the workers ever call :meth:`load`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from tpmlab.models.adapters import Adapter, adapter_for
from tpmlab.models.digest import (
    CURRENT,
    LEGACY,
    META_FILE,
    PREFIX,
    PieceHasher,
    cache_key,
    cached_digest,
    scheme_of,
    store_digest,
    tree_version,
    weights_digest,
)
from tpmlab.models.materialize import KeyFilter, build, meta_model, tie_groups
from tpmlab.models.tensor_files import TensorEntry, TensorReader, pread_into, read_header
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


#: the dtypes a model's weights and activations may be loaded in, by name
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "float64": torch.float64}


def model_dtype(value: str | torch.dtype) -> torch.dtype:
    """A model's dtype from a torch dtype or its name (``"bfloat16"``, ``"torch.float16"``);
    ``TypeError`` naming the choices for anything else (an integer dtype, a typo)."""
    name = value if isinstance(value, str) else str(value)
    name = name.strip().removeprefix("torch.")
    if name not in MODEL_DTYPES:
        raise TypeError(f"a model cannot be loaded in dtype {value!r}; "
                        f"choose one of {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


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

    def _tensors(
        self, names: list[str], device: torch.device, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors for ``names``, one at a time, ideally already on ``device`` in
        ``dtype`` (floating ones). Sources that can read one tensor at a time override
        this; the default reads them all with :meth:`_read` and lets each go once it
        has been handed over."""
        tensors = dict(self._read(names, device))
        for name in list(tensors):
            yield name, tensors.pop(name)

    @abstractmethod
    def _compute_version(self) -> str:
        """The weights' content digest (may be slow; called at most once)."""

    def _digest_in(self, scheme: str) -> str:
        """The weights' digest in ``scheme``, however the version was made: by default, every
        tensor read on the CPU, one at a time (sources that can do better override this)."""
        tree = self.meta_model()
        stored = set(tree.state_dict())
        names = sorted({c for n, c in tie_groups(tree).items() if n in stored})  # tied: once
        return weights_digest(self._tensors(names, torch.device("cpu"), None), scheme)

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

    def version_in(self, scheme: str) -> str:
        """The weights' digest in digest ``scheme`` (``"v2"``, or ``"sha256"`` to verify a
        version recorded before v2: :func:`tpmlab.models.digest.same_weights`)."""
        if scheme_of(self.version) == scheme:
            return self.version
        return self._digest_in(scheme)

    def assume_version(self, version: str) -> None:
        """Take the version from whoever computed it (the client that deployed a stage):
        a stage reads only its own tensors, and digesting would read them all."""
        self._version = version

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
            lambda names: self._tensors(names, device, dtype),
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
        self._key_files: dict[str, TensorEntry] | None = None

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

    def _index(self) -> dict[str, TensorEntry]:
        """Every stored tensor, by stored name (reads each file's header only)."""
        if self._key_files is None:
            index: dict[str, TensorEntry] = {}
            for path in self.weight_files():
                index.update(read_header(path))
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
        return dict(self._tensors(names, device, None))

    def _tensors(
        self, names: list[str], device: torch.device, dtype: torch.dtype | None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        # Positioned reads of exactly these tensors, in file order, each placed and cast
        # on its way (tensor_files): the process reads, and holds, its own bytes only.
        index = self._index()
        found = [(name, key) for name in names if (key := self._file_key(name)) is not None]
        found.sort(key=lambda nk: (str(index[nk[1]].path), index[nk[1]].offset))
        device = torch.device("cpu") if device.type == "meta" else device
        with TensorReader(device, dtype) as reader:
            for name, key in found:
                yield name, reader.read(index[key])

    def _recorded_version(self) -> str | None:
        """The version a converter wrote next to the weights (any scheme), if any."""
        meta = self.folder() / META_FILE
        if meta.is_file():
            return json.loads(meta.read_text()).get("version") or None
        return None

    def _compute_version(self) -> str:
        # A recorded version keeps its meaning (and its scheme); else the current scheme.
        return self._recorded_version() or self._digest_in(CURRENT)

    def _digest_in(self, scheme: str) -> str:
        recorded = self._recorded_version()
        if recorded and scheme_of(recorded) == scheme:
            return recorded
        files = self.weight_files()
        key = cache_key(
            {
                "folder": str(self.folder()),
                "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
            },
            scheme,
        )
        version = cached_digest(key)
        if version is None:
            version = folder_weights_digest(files, scheme)
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


def folder_weights_digest(files: list[Path], scheme: str = CURRENT,
                          threads: int | None = None) -> str:
    """:func:`~tpmlab.models.digest.weights_digest` of safetensors files in ``scheme``, read
    from the files' bytes with positioned reads: the process holds one piece buffer per
    thread (``v2``, pieces hashed on ``threads`` threads, all cores unless told) or one
    staging buffer (``sha256``), never the checkpoint."""
    entries: dict[str, TensorEntry] = {}
    for path in files:
        entries.update(read_header(path))
    if scheme == LEGACY:
        return _legacy_folder_digest(entries)
    scheme_of(scheme + ":")  # an unknown scheme is refused here, not after the reads
    contents: dict[str, str] = {}
    with PieceHasher(threads) as hasher:
        for path in files:  # one file's pieces at a time, in file order: reads stay local
            own = sorted((e.offset, n) for n, e in entries.items() if e.path == path)
            fd = os.open(path, os.O_RDONLY)
            try:
                reads = [(entries[n].nbytes, _piece_reader(fd, entries[n])) for _, n in own]
                contents.update(zip((n for _, n in own), hasher.contents(reads)))
            finally:
                os.close(fd)
    return tree_version((n, str(entries[n].dtype).removeprefix("torch."), entries[n].shape,
                         contents[n]) for n in sorted(entries))


def _piece_reader(fd: int, entry: TensorEntry):
    def read(start: int, buffer: memoryview) -> memoryview:
        pread_into(fd, buffer, entry.offset + start, entry.path)
        return buffer
    return read


def _legacy_folder_digest(entries: dict[str, TensorEntry]) -> str:
    h = hashlib.sha256()
    with TensorReader(torch.device("cpu")) as reader:
        for name in sorted(entries):
            e = entries[name]
            dtype = str(e.dtype).removeprefix("torch.")
            h.update(f"{name}\0{dtype}\0{list(e.shape)}\0".encode())
            for chunk in reader.read_chunks(e):
                h.update(chunk)
    return PREFIX + h.hexdigest()
