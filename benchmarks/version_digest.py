"""The model version digest of a large safetensors folder
(:func:`tpmlab.models.sources.folder_weights_digest`): the ``v2`` scheme on 1 and N threads
against the ``sha256`` scheme of versions recorded before it, and the bounds.

* ``sha256 (before)``: the single-stream scheme, read tensor by tensor with positioned
  reads (what new versions cost before ``v2``; still how old versions are verified);
* ``v2 x1``, ``v2 xN``: the piecewise scheme (4 MiB pieces hashed on 1 or N threads, then a
  root over them): the ratio x1 / xN is what more cores buy;
* ``sha256 stream``: hashlib over the files' bytes in one stream, already in memory (the
  bound of the single-stream scheme: SHA-256 is a chained hash);
* ``sha256 pieces xN``: the same bytes hashed as 64 MiB pieces on N threads, already in
  memory (the bound of a tree digest).

Each run repeats in alternation; the first pass may read from disk, later ones from the
page cache. The folder is random weights in bf16 and fp32, written once under ``--dir``.

    python -m benchmarks.version_digest --gb 2 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from tpmlab.models.sources import folder_weights_digest

SHARD = 512 << 20  # bytes per file


def make_folder(folder: Path, gb: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*.safetensors"))
    if files and sum(f.stat().st_size for f in files) >= gb * 1e9 * 0.95:
        return files
    for f in files:
        f.unlink()
    g = torch.Generator().manual_seed(0)
    n = max(1, round(gb * 1e9 / SHARD))
    for i in range(n):
        tensors, size, j = {}, 0, 0
        while size < SHARD:
            dtype = torch.bfloat16 if j % 2 else torch.float32
            t = torch.randn(1024, 4096, generator=g).to(dtype)
            tensors[f"model.layers.{i}.w{j:03d}"] = t
            size += t.numel() * t.element_size()
            j += 1
        save_file(tensors, str(folder / f"model-{i:05d}-of-{n:05d}.safetensors"))
    return sorted(folder.glob("*.safetensors"))


def _pieces(files: list[Path]) -> list[memoryview]:
    out = []
    for p in files:
        data = memoryview(p.read_bytes())
        out += [data[i:i + (64 << 20)] for i in range(0, len(data), 64 << 20)]
    return out


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next read comes from the disk."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--dir", default="/tmp/tpmlab-digest-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true",
                        help="evict the files from the page cache before each run (a first deploy)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    files = make_folder(Path(args.dir), args.gb)
    nbytes = sum(f.stat().st_size for f in files)
    pieces = _pieces(files)

    def stream() -> str:
        h = hashlib.sha256()
        for p in pieces:
            h.update(p)
        return h.hexdigest()

    def tree() -> str:
        with ThreadPoolExecutor(args.threads) as pool:
            leaves = list(pool.map(lambda p: hashlib.sha256(p).digest(), pieces))
        return hashlib.sha256(b"".join(leaves)).hexdigest()

    base_name = "sha256 (before)"
    ways = {base_name: lambda: folder_weights_digest(files, "sha256"),
            "v2 x1": lambda: folder_weights_digest(files, threads=1),
            f"v2 x{args.threads}": lambda: folder_weights_digest(files, threads=args.threads),
            "sha256 stream": stream, f"sha256 pieces x{args.threads}": tree}
    if args.cold:  # the bounds hash bytes already in memory: not comparable
        ways = {k: v for k, v in ways.items() if k not in ("sha256 stream", f"sha256 pieces x{args.threads}")}
    times: dict[str, list[float]] = {k: [] for k in ways}
    digests = {}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            if args.cold:
                evict(files)
            t = time.perf_counter()
            digests[name] = fn()
            times[name].append(time.perf_counter() - t)
    assert digests["v2 x1"] == digests[f"v2 x{args.threads}"], "v2 depends on the threads"
    base = statistics.median(times[base_name])
    print(f"{nbytes / 1e9:.2f} GB in {len(files)} files, median of {args.repeats}")
    print(f"{'':24s}{'s':>8s}{'GB/s':>8s}{'speed-up':>10s}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:24s}{m:8.2f}{nbytes / m / 1e9:8.2f}{base / m:9.2f}x")
    one, many = (statistics.median(times[k]) for k in ("v2 x1", f"v2 x{args.threads}"))
    print(f"v2 on {args.threads} threads: {one / many:.2f}x v2 on one; v2 on one thread: "
          f"{base / one:.2f}x the sha256 scheme")


if __name__ == "__main__":
    main()
