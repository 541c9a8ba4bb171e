"""Model names: the names tpmlab knows, and the :class:`ModelSource` each name resolves to."""

from __future__ import annotations

from pathlib import Path

from tpmlab.models.default import DEFAULT_ALIASES, DEFAULT_NAME
from tpmlab.models.default_source import DefaultSource
from tpmlab.models.errors import ModelNotFoundError
from tpmlab.models.random_init import known_random_models, random_init_source
from tpmlab.models.sources import FolderSource, ModelSource


def available_models() -> list[str]:
    """Names :func:`resolve` knows without a path or a store reference."""
    return [DEFAULT_NAME, *known_random_models()]


def resolve(name: str) -> ModelSource:
    """The source for ``name``; cheap: reads a config, never weights.

    ``name`` is one of :func:`available_models` (or a Hub id of the default),
    a local Hugging Face folder containing ``config.json``, or ``"name@ref"``
    for a version in the weight store.
    """
    if name == DEFAULT_NAME or name in DEFAULT_ALIASES:
        return DefaultSource()
    randoms = known_random_models()
    if name in randoms:
        spec = dict(randoms[name])
        return random_init_source(spec.pop("family"), name=name, **spec)
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return FolderSource(folder)
    if "@" in name and not folder.exists():
        return _from_store(name)
    if folder.exists():
        raise ModelNotFoundError(
            f"{name!r} is a path but has no config.json (not a Hugging Face model folder)"
        )
    raise ModelNotFoundError(
        f"unknown model {name!r}; available: {', '.join(available_models())}, "
        "a local Hugging Face folder with config.json, or 'name@ref' from the weight store"
    )


def _from_store(name: str) -> ModelSource:
    base, _, ref = name.rpartition("@")
    try:
        from tpmlab.models.store_source import source_for
    except ImportError as e:
        raise ModelNotFoundError(
            f"{name!r} names a weight-store version, but tpmlab.store is unavailable ({e})"
        ) from e
    return source_for(base, ref)
