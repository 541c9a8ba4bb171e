"""Lens artifacts: trained lens parameters on disk, tied to the model they belong to.

An artifact is one safetensors file; its ``__metadata__`` holds a JSON document
under the key ``"tpmlab_lens"``::

    {"format": "tpmlab-lens/1", "kind": "tuned" | "attention" | ...,
     "model": "smollm2-135m", "model_version": "sha256:...", "d_model": 576,
     ... anything the lens needs (row labels, rank, training settings)}

Tensor names are the lens's own (``"12.bias"``, ``"3.4.up"``...). Loading checks the
format and, given a model, that the artifact was made for that model's weights
(:class:`ArtifactMismatchError` otherwise): a lens trained on other weights
decodes garbage without any visible error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import TpmlabError
from .contract import LensInputError

FORMAT = "tpmlab-lens/1"
META_KEY = "tpmlab_lens"


class ArtifactMismatchError(TpmlabError, ValueError):
    """The artifact belongs to another model, another version of its weights, or another lens."""

    http_status = 409


def save_artifact(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` (which must name ``kind``, ``model``, ``model_version``)."""
    for key in ("kind", "model", "model_version"):
        if not meta.get(key):
            raise LensInputError(f"artifact metadata needs {key!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, **meta}
    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp), metadata={META_KEY: json.dumps(doc, sort_keys=True)})
    tmp.replace(path)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise ArtifactMismatchError(f"{path} is not a tpmlab lens artifact (no {META_KEY!r} metadata)")
    doc = json.loads(raw)
    if doc.get("format") != FORMAT:
        raise ArtifactMismatchError(f"{path} has format {doc.get('format')!r}; this tpmlab reads {FORMAT!r}")
    return doc


def load_artifact(path: str | Path, *, kind: str, model: Any = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of an artifact, checked against ``kind`` and, if given,
    ``model`` (its weights must be those the artifact's ``model_version`` names)."""
    meta = read_meta(path)
    if meta.get("kind") != kind:
        raise ArtifactMismatchError(f"{path} holds a {meta.get('kind')!r} lens, not a {kind!r} lens")
    if model is not None:
        check_model(meta, model, where=str(path))
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def check_model(meta: dict[str, Any], model: Any, *, where: str = "the artifact") -> None:
    """Raise :class:`ArtifactMismatchError` unless ``meta`` was made for ``model``'s weights.

    A ``model_version`` of another digest scheme (an artifact made before version digests
    became ``v2:``) is verified in its own scheme (:func:`~tpmlab.models.digest.same_weights`)."""
    from tpmlab.models.digest import same_weights

    if not same_weights(str(meta.get("model_version") or ""), model):
        raise ArtifactMismatchError(
            f"{where} was trained on {meta.get('model')!r} version {meta.get('model_version')}, "
            f"but this model is {model.name!r} version {model.version}: a lens only fits the "
            "weights it was trained on (train one for these weights)")
    if meta.get("d_model") not in (None, model.adapter.d_model):
        raise ArtifactMismatchError(f"{where} has d_model {meta['d_model']}, the model "
                                    f"{model.adapter.d_model}")
