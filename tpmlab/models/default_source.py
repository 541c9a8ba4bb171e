"""The default model's source: resolving it reads a config, never waits for its weights."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tpmlab.home import tpmlab_home
from tpmlab.models.default import (
    DEFAULT_NAME,
    default_config,
    default_tokenizer,
    ensure_model,
    model_dir,
)
from tpmlab.models.sources import FolderSource, ModelSource


class DefaultSource(FolderSource):
    """The default model; its folder is created on first need, so resolving it
    (config and adapter only) never waits for the conversion.

    The tpmlab home is fixed when the source is made: later changes of
    ``$TPMLAB_HOME`` do not move an existing source's files.
    """

    def __init__(self) -> None:
        self._home = tpmlab_home()
        if model_dir(self._home).is_dir():
            super().__init__(model_dir(self._home), name=DEFAULT_NAME)
            return
        ModelSource.__init__(self, DEFAULT_NAME, default_config())
        self._folder = model_dir(self._home)
        self._key_files = None

    def folder(self) -> Path:
        return ensure_model(self._home)

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        return default_tokenizer(self._home)
