"""Read single tensors out of safetensors files with positioned reads, not mmap.

A pipeline stage must pull its own tensors through its process and nothing else,
and hold no more host memory than it has to:

* Reading with ``pread`` into the destination (or a bounded staging buffer) makes the
  process's ``/proc/self/io`` ``rchar`` count exactly the bytes it took from the
  checkpoint, page cache or disk alike, so a stage can measure what it read.
  Memory-mapped reads are invisible there, and mapped file pages count in the
  process's resident set for as long as the mapping lives (a Dask nanny that watches
  RSS sees them).
* A tensor bound for an accelerator goes through one reusable staging buffer of at most
  :data:`STAGING_BYTES` (pinned, so the copy is a DMA): the host never holds more than
  that of it. A tensor bound for the CPU is read straight into its own storage when the
  dtypes agree (no second copy), else converted chunk by chunk.

The format: an 8-byte little-endian header length, a JSON header ``{name: {"dtype",
"shape", "data_offsets": [begin, end]}}`` (offsets relative to the end of the header),
then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

#: the largest slice of one tensor held on the host on its way to an accelerator
STAGING_BYTES = 64 * 2**20

#: safetensors dtype codes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in its file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute position of the first byte in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, by stored name (reads only the header)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    out: dict[str, TensorEntry] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{path.name}: tensor {name!r} has dtype {e['dtype']}, which tpmlab "
                             f"does not read (known: {', '.join(DTYPES)})")
        begin, end = e["data_offsets"]
        out[name] = TensorEntry(path, DTYPES[e["dtype"]], tuple(e["shape"]), base + begin,
                                end - begin)
    return out


def pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{path} ends before the tensor it promises (truncated file?)")
        done += n


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class TensorReader:
    """Reads tensors from safetensors files onto ``device`` in ``dtype`` (floating tensors
    only; others keep their stored dtype), one at a time. Reuses one open file per path
    and one staging buffer; :meth:`close` (or ``with``) releases them."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.device, self.dtype = device, dtype
        self._fds: dict[Path, int] = {}
        self._staging: torch.Tensor | None = None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._staging = None

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes:
            pin = self.device.type == "cuda"
            self._staging = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        return self._staging[:nbytes]

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor ``entry`` describes, on the reader's device and dtype."""
        target = self.dtype if self.dtype is not None and entry.dtype.is_floating_point \
            else entry.dtype
        out = torch.empty(entry.shape, dtype=target, device=self.device)
        fd = self._fd(entry.path)
        if self.device.type == "cpu" and target == entry.dtype:
            if entry.nbytes:
                pread_into(fd, _as_bytes(out), entry.offset, entry.path)
            return out
        flat = out.view(-1)
        itemsize = entry.dtype.itemsize
        per_chunk = max(1, min(STAGING_BYTES // itemsize, math.prod(entry.shape)))
        for start in range(0, flat.numel(), per_chunk):
            n = min(per_chunk, flat.numel() - start)
            chunk = self._buffer(n * itemsize)
            pread_into(fd, memoryview(chunk.numpy()), entry.offset + start * itemsize, entry.path)
            # a blocking copy converts on the host, so the device holds no temporary
            flat[start:start + n].copy_(chunk.view(entry.dtype))
        return out

    def read_chunks(self, entry: TensorEntry) -> Iterator[memoryview]:
        """The raw bytes of ``entry`` in slices of at most :data:`STAGING_BYTES` (for digests:
        the host holds one slice at a time)."""
        fd = self._fd(entry.path)
        for start in range(0, entry.nbytes, STAGING_BYTES):
            n = min(STAGING_BYTES, entry.nbytes - start)
            chunk = self._buffer(n)
            view = memoryview(chunk.numpy())
            pread_into(fd, view, entry.offset + start, entry.path)
            yield view
