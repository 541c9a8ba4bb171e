"""Build a model tree without weights and fill in only the tensors asked for.

A pipeline stage must hold its slice of the weights and nothing else, so a
load starts from a meta-device tree (no memory) and assigns real tensors one
state-dict name at a time. Tensors that were not asked for stay on ``meta``.

Tensors arrive one at a time from the reader and each is cast, placed and
assigned before the next is read: a load's peak memory is the weights plus one
tensor in flight, not the whole set in the reader's dtype next to its cast.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

KeyFilter = Callable[[str], bool]
#: ``reader(canonical_names) -> (name, tensor), ...``: each name once, in any order, tensors
#: on any device and dtype (ideally already the load's: then nothing is copied). Consumed
#: lazily, one tensor at a time.
TensorReader = Callable[[list[str]], Iterable[tuple[str, torch.Tensor]]]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Hugging Face builds models under the target default dtype; doing the same
    # gives buffers the same dtypes a from_pretrained load would.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config`` on the meta device, in eval mode."""
    with _default_dtype(dtype), torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A copy: from_config writes into the config (attention implementation,
        # dtype) and the source's config must not change under other callers.
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def tie_groups(model: nn.Module) -> dict[str, str]:
    """Map every parameter/buffer name to its canonical name.

    Tied tensors (e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``) are
    one object under several names; the canonical name is the first one in
    module order, which is also the name Hugging Face keeps when it saves.
    """
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        canonical[name] = first.setdefault(id(tensor), name)
    return canonical


def persistent_names(model: nn.Module) -> list[str]:
    """State-dict names: parameters and persistent buffers, tied names included."""
    non_persistent = {name for name, _ in model.named_non_persistent_buffers()}
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False) if n not in non_persistent]
    return names


def recompute_non_persistent_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Give non-persistent buffers (rotary ``inv_freq``...) real values on ``device``.

    They are not in any checkpoint, so Hugging Face recomputes them with the
    model's own ``_init_weights``; we do the same, before any weight is loaded, so
    that re-initialising the owning module cannot overwrite a loaded parameter.
    """
    owners: dict[str, nn.Module] = {}
    for name, buf in list(model.named_non_persistent_buffers()):
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        owner._buffers[attr] = torch.empty_like(buf, device=device)
        owners[owner_path] = owner
    with torch.no_grad():
        for owner in owners.values():
            model._init_weights(owner)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path)
    if attr in owner._parameters:
        owner._parameters[attr] = value  # type: ignore[assignment]
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(f"{name!r} is neither a parameter nor a buffer of {type(owner).__name__}")


def materialize(
    model: PreTrainedModel,
    reader: TensorReader,
    *,
    device: torch.device,
    dtype: torch.dtype,
    keys: KeyFilter | None = None,
) -> list[str]:
    """Assign real tensors to the state-dict names selected by ``keys``.

    Names of one tie group share one tensor, so a full load keeps weights tied;
    a partial load that selects only ``lm_head.weight`` materializes it alone and
    leaves ``model.embed_tokens.weight`` on meta. Floating tensors are cast to
    ``dtype``. Returns the selected names.
    """
    canonical = tie_groups(model)
    selected = [n for n in persistent_names(model) if keys is None or keys(n)]
    names_of: dict[str, list[str]] = {}
    for name in selected:
        names_of.setdefault(canonical[name], []).append(name)
    wanted = sorted(names_of)
    done: set[str] = set()
    for canon, t in reader(wanted) if wanted else ():
        if canon not in names_of or canon in done:
            continue
        names = names_of[canon]
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        value: torch.Tensor | nn.Parameter = t
        param = next((n for n in names if _is_parameter(model, n)), None)
        if param is not None:
            current = model.get_parameter(param)
            if tuple(current.shape) != tuple(t.shape):
                raise ValueError(
                    f"{param}: expected shape {tuple(current.shape)}, weights have {tuple(t.shape)}"
                )
            value = nn.Parameter(t, requires_grad=False)
        for name in names:
            _set_tensor(model, name, value)
        done.add(canon)
        del t, value  # the next tensor is read only once this one is in place
    missing = [n for n in wanted if n not in done]
    if missing:
        raise KeyError(f"weights missing for {len(missing)} tensors, e.g. {missing[:5]}")
    return selected


def _is_parameter(model: nn.Module, name: str) -> bool:
    owner_path, _, attr = name.rpartition(".")
    return attr in model.get_submodule(owner_path)._parameters


def build(
    config: PretrainedConfig,
    reader: TensorReader,
    *,
    device: torch.device,
    dtype: torch.dtype,
    keys: KeyFilter | None = None,
) -> PreTrainedModel:
    """A model of ``config`` with the selected weights on ``device`` and the rest on meta."""
    model = meta_model(config, dtype)
    recompute_non_persistent_buffers(model, device)
    materialize(model, reader, device=device, dtype=dtype, keys=keys)
    model.config.dtype = dtype
    return model
