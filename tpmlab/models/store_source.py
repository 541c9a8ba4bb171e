"""A model source whose weights are one version of the weight store (``"name@ref"``)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from tpmlab.models.default import default_tokenizer
from tpmlab.models.digest import TREE, tree_version
from tpmlab.models.materialize import tie_groups
from tpmlab.models.sources import ModelSource
from tpmlab.models.tokenization import has_tokenizer, load_tokenizer
from tpmlab.store import Store, default_store


def config_from_dict(config: dict) -> PretrainedConfig:
    """A Hugging Face config from a stored config dict (needs its ``model_type``)."""
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"stored config has model_type {model_type!r}, which transformers does not know; "
            "commit the model's config.to_dict()"
        )
    return CONFIG_MAPPING[model_type].from_dict(copy.deepcopy(config))


class StoreSource(ModelSource):
    """Model ``name`` with the weights and config of store version ``ref``.

    ``version`` is ``sha256:`` + the full store digest, fixed when the source is made.
    Loads read only the selected tensors' chunks. The tokenizer comes from the
    folder in the config's ``_name_or_path`` when it has one, else the default model's.
    """

    def __init__(self, name: str, ref: str, store: Store) -> None:
        self.store = store
        self.digest = store.resolve(ref)
        self._config_dict = store.config(self.digest)
        self._stored = set(store.manifest(self.digest)["tensors"])
        super().__init__(name, config_from_dict(self._config_dict))

    def __repr__(self) -> str:
        return f"StoreSource({self.name!r}, {self.digest[:12]}, family={self.adapter.family!r})"

    def _read(self, names: list[str], device: torch.device) -> Mapping[str, torch.Tensor]:
        wanted = [n for n in names if n in self._stored]
        target = "cpu" if device.type in ("cpu", "meta") else device
        return self.store.load(self.digest, keys=wanted, device=target)

    def _compute_version(self) -> str:
        # "sha256:" + the store's digest of the version (weights and config), the form store
        # versions have always had: results that recorded it keep naming it.
        return f"sha256:{self.digest}"

    def _digest_in(self, scheme: str) -> str:
        # v2 from the manifest alone: the store records each tensor's content digest, which
        # is v2's digest of the tensor's bytes, so no tensor is read.
        if scheme != TREE:
            return super()._digest_in(scheme)
        tensors = self.store.manifest(self.digest)["tensors"]
        canonical = tie_groups(self.meta_model())
        names = sorted(n for n in tensors if canonical.get(n, n) == n)
        return tree_version((n, tensors[n]["dtype"], tensors[n]["shape"], tensors[n]["content"])
                            for n in names)

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        folder = self._config_dict.get("_name_or_path")
        if folder and Path(folder).is_dir() and has_tokenizer(Path(folder)):
            return load_tokenizer(Path(folder))
        warnings.warn(
            f"store version {self.digest[:12]} has no tokenizer; using the default model's",
            stacklevel=3,
        )
        return default_tokenizer()


def source_for(name: str, ref: str, store: Store | None = None) -> StoreSource:
    """Model ``name`` whose weights are version ``ref`` of ``store``.

    ``ref`` is resolved once, here: the source's ``version`` is that full store digest
    even if a tag moves later. ``store`` defaults to ``tpmlab.store.default_store()``.
    """
    return StoreSource(name, ref, store if store is not None else default_store())
