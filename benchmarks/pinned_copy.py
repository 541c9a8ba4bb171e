"""What a GPU stage's saves cost on their way into hand-over segments, in one process, without
Dask: the parts of :mod:`tpmlab.cluster.handover` and :mod:`tpmlab.cluster.pinned_segments`
timed alone, for ``--count`` saves of ``--shape`` (default: every layer's output of an 8x512
trace of a Llama-3-8B stage, 16 x [8, 512, 4096] bfloat16, 512 MiB).

* ``pinned copy + memcpy``: the path without registration: each save copied from the device
  into fresh pinned memory (one synchronization at the end), then copied on the host into a
  segment made ahead of time (pages mapped);
* ``registered segments``: the device copies each save straight into a segment made ahead
  of time and registered with CUDA (one synchronization at the end);
* ``register`` / ``unregister``: what the pool's thread and the release thread pay per
  segment, off the request's path;
* for scale, the device's copy into pinned memory that already exists (Hugging Face's
  pinned copy, as the benchmarks compare).

    python -m benchmarks.pinned_copy                     # a GPU; on a CPU: a dry run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tpmlab.cluster import segment_pool
from tpmlab.cluster.pinned_segments import CudaRegistrar


class _NoRegistrar:
    """A dry run on a host without CUDA: the same code, nothing registered."""

    def register(self, ptr: int, nbytes: int) -> None:
        pass

    def unregister(self, ptr: int) -> None:
        pass

    def settle(self) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8x512x4096")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    registrar = CudaRegistrar(device) if cuda else _NoRegistrar()
    shape = tuple(int(x) for x in args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    values = [torch.randn(shape, device=device).to(dtype) for _ in range(args.count)]
    nbytes = values[0].numel() * values[0].element_size()
    total = nbytes * args.count
    times: dict[str, list[float]] = {k: [] for k in (
        "pinned copy + memcpy", "registered segments", "register", "unregister",
        "into existing pinned memory")}
    ready = [torch.empty(shape, dtype=dtype, pin_memory=cuda) for _ in values]
    for _ in range(args.repeats):
        segments = [segment_pool.new_segment(nbytes, populate=True) for _ in values]
        t = time.perf_counter()
        for _, flat in segments:
            registrar.register(flat.data_ptr(), nbytes)
        times["register"].append(time.perf_counter() - t)

        t = time.perf_counter()
        for (_, flat), v in zip(segments, values):
            flat.view(dtype).reshape(shape).copy_(v, non_blocking=cuda)
        _sync(device)
        times["registered segments"].append(time.perf_counter() - t)
        for (_, flat), v in zip(segments, values):
            assert torch.equal(flat.view(dtype).reshape(shape), v.cpu())

        t = time.perf_counter()
        for _, flat in segments:
            registrar.unregister(flat.data_ptr())
        times["unregister"].append(time.perf_counter() - t)

        t = time.perf_counter()  # the same segments, unregistered now: pages mapped
        copies = []
        for v in values:
            out = torch.empty(shape, dtype=dtype, pin_memory=cuda)
            copies.append(out.copy_(v, non_blocking=cuda))
        _sync(device)
        for (_, flat), c in zip(segments, copies):
            flat.numpy()[:] = c.reshape(-1).view(torch.uint8).numpy()
        times["pinned copy + memcpy"].append(time.perf_counter() - t)

        t = time.perf_counter()
        for out, v in zip(ready, values):
            out.copy_(v, non_blocking=cuda)
        _sync(device)
        times["into existing pinned memory"].append(time.perf_counter() - t)
        segment_pool.unlink([path for path, _ in segments])
        del segments, copies

    print(f"{args.count} x {shape} {args.dtype} on {device} ({total / 1e6:.0f} MB), "
          f"median of {args.repeats}" + ("" if cuda else " (a dry run: no CUDA)"))
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:30s}{m * 1e3:9.1f} ms{total / m / 1e9 if m > 0 else 0:8.2f} GB/s")


if __name__ == "__main__":
    main()
