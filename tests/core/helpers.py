"""Plain Hugging Face references (forward hooks only) to compare tpmlab against."""

from __future__ import annotations

import torch


def hf_model(lab_model):
    """The live Hugging Face model behind an in-process deployment."""
    return lab_model.lab.backend.host(lab_model.name).model


def layer_modules(hf, adapter):
    return list(hf.get_submodule(adapter.layers))


def ids_of(lab_model, prompt: str) -> torch.Tensor:
    return torch.tensor([lab_model.tokenizer(prompt)["input_ids"]])


@torch.inference_mode()
def hf_forward(hf, adapter, ids, *, patch=None):
    """Run ``hf`` with hooks that save every layer output; ``patch=(layer, fn)`` edits one output."""
    saved = []
    handles = []
    for i, layer in enumerate(layer_modules(hf, adapter)):
        def hook(module, args, output, i=i):
            if patch is not None and patch[0] == i:
                output = patch[1](output.clone().cpu()).to(output.device)
            saved.append(output.clone())
            return output
        handles.append(layer.register_forward_hook(hook))
    device = next(hf.parameters()).device
    try:
        out = hf(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [s.cpu() for s in saved], out.logits.cpu()
