"""Model specs, loaders and architecture adapters.

``resolve(name)`` gives a :class:`ModelSource` (config, adapter, tokenizer, a
weightless meta-device tree); ``source.load(keys=...)`` materializes all or a
slice of the weights; an :class:`Adapter` maps the aliases ``embed``,
``layers``, ``final_norm`` and ``unembed`` to each family's native paths.
"""

from tpmlab.home import tpmlab_home
from tpmlab.models.adapters import Adapter, adapter_for, supported_model_types
from tpmlab.models.errors import ModelNotFoundError, UnsupportedArchitectureError
from tpmlab.models.names import available_models, resolve
from tpmlab.models.random_init import random_init_source
from tpmlab.models.sources import FolderSource, LoadedModel, ModelSource

__all__ = [
    "Adapter",
    "FolderSource",
    "LoadedModel",
    "ModelNotFoundError",
    "ModelSource",
    "UnsupportedArchitectureError",
    "adapter_for",
    "available_models",
    "random_init_source",
    "resolve",
    "supported_model_types",
    "tpmlab_home",
]
