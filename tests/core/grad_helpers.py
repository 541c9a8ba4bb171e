"""Plain PyTorch autograd references for gradients, on the same weights (never changed)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call


def metric(logits: torch.Tensor, a: int = 7, b: int = 11) -> torch.Tensor:
    """A logit difference at the last position, summed over rows: a scalar."""
    return (logits[:, -1, a] - logits[:, -1, b]).sum()


def torch_grads(hf, adapter, ids: torch.Tensor | None = None, *,
                embeds: torch.Tensor | None = None, add: tuple[int, torch.Tensor] | None = None,
                scale: tuple[int, float] | None = None, params: tuple[str, ...] = (),
                loss_fn: Callable[[torch.Tensor], torch.Tensor] = metric) -> dict:
    """Gradients of ``loss_fn(logits)`` with respect to every decoder layer's output, the
    input embeddings, ``add=(layer, v)`` (a vector added to a layer's output) and ``params``
    (given to the model as fresh leaves: the model's own tensors get no ``.grad``).
    ``scale=(layer, f)`` multiplies the gradient flowing back through a layer's output."""
    device = next(hf.parameters()).device
    layers = list(hf.get_submodule(adapter.layers))
    outs: dict[int, torch.Tensor] = {}
    leaves = {n: p.detach().requires_grad_() for n, p in hf.named_parameters() if n in params}
    v = None if add is None else add[1].detach().clone().to(device).requires_grad_()

    def hook(module, args, out, i):
        if add is not None and add[0] == i:
            out = out + v
        if scale is not None and scale[0] == i:
            out.register_hook(lambda g: g * scale[1])
        out.retain_grad()
        outs[i] = out
        return out

    handles = [layer.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
               for i, layer in enumerate(layers)]
    try:
        if embeds is None:
            embeds = hf.get_input_embeddings()(ids.to(device))
        x = embeds.detach().clone().to(device).requires_grad_()
        out = functional_call(hf, leaves, args=(), kwargs={"inputs_embeds": x, "use_cache": False})
        loss = loss_fn(out.logits)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {"loss": loss.detach().cpu(), "layers": [outs[i].grad.cpu() for i in range(len(layers))],
            "embeds": x.grad.cpu(), "add": None if v is None else v.grad.cpu(),
            "params": {n: p.grad.cpu() for n, p in leaves.items()}}


def slow_backward(model, prompt: str, *, timeout: float, matmuls: int = 300, size: int = 1500):
    """A trace whose backward spends long in plan nodes at the last layer's gradient (a chain
    of ``size`` x ``size`` matmuls, 0.05-0.2 s each on two CPU cores: 15 s or more), so that
    a ``timeout`` of a second or two passes in the middle of the backward."""
    w = torch.randn(size, size, generator=torch.Generator().manual_seed(0)) / size ** 0.5
    with model.trace(prompt, timeout=timeout):
        metric(model.output.logits).backward()
        y = model.layers[model.adapter.n_layers - 1].output.grad.sum() * w
        for _ in range(matmuls):
            y = y @ w
        y.sum().save()
