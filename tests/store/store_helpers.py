"""Helpers shared by the store tests."""

import torch


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A few tensors shaped like a 2-layer model, float32."""
    g = torch.Generator().manual_seed(seed)
    sd = {"embed.weight": torch.randn(64, 16, generator=g)}
    for i in range(2):
        sd[f"layers.{i}.attn.weight"] = torch.randn(16, 16, generator=g)
        sd[f"layers.{i}.mlp.weight"] = torch.randn(32, 16, generator=g)
        sd[f"layers.{i}.norm.weight"] = torch.ones(16)
    sd["norm.weight"] = torch.ones(16)
    return sd


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN-safe, -0.0-sensitive)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8).numpy()
    )
