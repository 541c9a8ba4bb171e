"""Tensors as bytes, cut into fixed-size chunks named by their SHA-256.

Chunk size: 4 MiB (``CHUNK_SIZE``). Edits to weights happen in place (a fine-tune
or a rank-one edit rewrites a whole matrix; a vocabulary extension appends rows),
so content-defined chunking buys nothing and fixed offsets are enough. Within
that, 4 MiB keeps the object count low (a 135M-parameter fp32 model is ~400
objects, most layer matrices of small models are one chunk) which matters for
object stores where each request costs milliseconds, while hashing throughput
does not depend on the size above ~64 KiB. Smaller chunks would only help edits
that touch a few rows of a big matrix.

Hash: SHA-256, hardware-accelerated on current x86 (SHA-NI) and ARMv8 CPUs
(~1.8 GB/s on one core here, twice blake2b's speed).

Byte layout: a tensor's bytes are its C-contiguous elements in the machine's
native byte order, which tpmlab assumes little-endian (as safetensors does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

CHUNK_SIZE = 4 * 2**20
"""Size of one chunk in bytes (the last chunk of a tensor may be shorter)."""

HASH_NAME = "sha256"

_DTYPE_NAMES = [
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "complex64", "complex128",
    "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64",
    "bool",
]
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
"""Supported dtypes by their stored name."""


def dtype_name(dtype: torch.dtype) -> str:
    """The stored name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    name = str(dtype).removeprefix("torch.")
    if DTYPES.get(name) != dtype:
        raise TypeError(f"dtype {dtype} cannot be stored; supported: {', '.join(DTYPES)}")
    return name


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of a stored dtype name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise TypeError(f"unknown stored dtype {name!r}; supported: {', '.join(DTYPES)}") from None


def hash_bytes(data: bytes | memoryview) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A read-only byte view of ``tensor``'s elements (copies only if not contiguous on CPU)."""
    if tensor.layout != torch.strided:
        raise TypeError(f"only dense (strided) tensors can be stored, got layout {tensor.layout}")
    t = tensor.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(t.numpy()).toreadonly()


def split(data: memoryview, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
    """Consecutive slices of ``data``, each ``chunk_size`` bytes except possibly the last."""
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]


def content_digest(chunk_digests: Sequence[str], nbytes: int) -> str:
    """Digest of a tensor's whole content, from the digests of its chunks (a Merkle list).

    It depends only on the tensor's bytes (for the fixed ``CHUNK_SIZE``), so the same
    values give the same digest however they are stored (dense or as a delta).
    """
    text = f"tpmlab.tensor/1 {nbytes}\n" + "\n".join(chunk_digests)
    return hash_bytes(text.encode())


def chunk_digests(data: memoryview, chunk_size: int = CHUNK_SIZE) -> list[str]:
    """Digests of every chunk of ``data``, in order."""
    return [hash_bytes(c) for c in split(data, chunk_size)]


def empty_buffer(nbytes: int) -> tuple[torch.Tensor, np.ndarray]:
    """A writable uint8 tensor of ``nbytes`` and a numpy view of it, to assemble chunks into."""
    flat = torch.empty(nbytes, dtype=torch.uint8)
    return flat, flat.numpy()


def from_bytes(flat: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Reinterpret a flat uint8 tensor as a tensor of ``dtype`` and ``shape`` (no copy)."""
    shape = tuple(int(s) for s in shape)
    if flat.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return flat.view(dtype).reshape(shape)
