"""A stage's decode forward in a plain process: back to back, and after an idle gap.

Builds the model's stages the way a stage worker does (:class:`~tpmlab.cluster.stage.StageModel`,
the stage's own KV cache from ``new_cache``) and the whole model as one stage, then runs
``--new`` greedy decode steps after a ``--prompt``-token prompt pass, timing each stage's
forward (median ms over the decode steps, then over ``--repeats``). ``--idle-ms``: sleep
that long before every forward, as a stage worker's thread does between the steps of a
request while the other stages and the hops run (≈ 3 ms a step for tiny-llama on 2 CPU
stages). Nothing of Dask runs here: the difference between ``--idle-ms 0`` and ``--idle-ms 2``
is what idling between forwards costs the next forward by itself.

    python -m benchmarks.stage_forward [--model tiny-llama] [--stages 2] [--threads 2]
        [--idle-ms 0,2] [--repeats 5]
    taskset -c 1 python -m benchmarks.stage_forward --threads 1   # one core, no migration

``--device cuda --dtype bfloat16``: the same on the GPU. ``--processes``: each stage also in a
plain process of its own (spawned, no Dask; hidden states through pipes, outside the timed
forward), as stage workers hold them: on one GPU the processes are two CUDA contexts
sharing it, which is what two stage workers on one GPU cost their forwards without any of
Dask or the hand-overs. Each forward is timed with the device synchronized around it; the
prompt pass is printed too (``--prompt 128 --new 8``: a 1x128 trace's forward).

    python -m benchmarks.stage_forward --device cuda --dtype bfloat16 \
        --model llama-3-8b-shape --prompt 128 --new 16 --idle-ms 0 --processes
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def cuts(name: str, n_stages: int) -> list[int]:
    from tpmlab.models import resolve

    n = resolve(name).adapter.n_layers
    return [round(i * n / n_stages) for i in range(n_stages + 1)]


def stage(name: str, index: int, bounds: list[int], device: str = "cpu",
          dtype: str = "float32"):
    import torch

    from tpmlab.cluster.partition import StageSpan
    from tpmlab.cluster.stage import StageModel
    from tpmlab.models import resolve

    span = StageSpan(index=index, n_stages=len(bounds) - 1, first=bounds[index],
                     last=bounds[index + 1] - 1, nbytes=0)
    return StageModel(resolve(name), span, device=torch.device(device),
                      dtype=getattr(torch, dtype))


def build(name: str, n_stages: int, device: str = "cpu", dtype: str = "float32"):
    bounds = cuts(name, n_stages)
    staged = [stage(name, i, bounds, device, dtype) for i in range(n_stages)]
    return staged, [stage(name, 0, [bounds[0], bounds[-1]], device, dtype)]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Local:
    """A stage in this process, timed as :class:`Remote` times its own."""

    def __init__(self, part: Any, device: str) -> None:
        self.part, self.device = part, device

    def reset(self) -> None:
        self.cache = self.part.new_cache()

    def forward(self, first: bool, x: Any, mask: Any, pos: Any) -> tuple[Any, float]:
        return _timed_forward(self.part, self.cache, self.device, first, x, mask, pos)


def _timed_forward(part: Any, cache: Any, device: str, first: bool, x: Any, mask: Any,
                   pos: Any) -> tuple[Any, float]:
    import torch

    x, mask, pos = (t.to(device) for t in (x, mask, pos))
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        if first:
            out = part.forward(input_ids=x, attention_mask=mask, position_ids=pos,
                               cache=cache, logits_to_keep=1)
        else:
            out = part.forward(hidden=x, attention_mask=mask, position_ids=pos, cache=cache,
                               logits_to_keep=1)
        out = out if isinstance(out, torch.Tensor) else out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return out.cpu(), time.perf_counter() - start


def _serve(conn: Any, name: str, index: int, bounds: list[int], device: str, dtype: str,
           threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    part = stage(name, index, bounds, device, dtype)
    cache = None
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        if msg == "reset":
            cache = part.new_cache()
            conn.send(None)
        else:
            conn.send(_timed_forward(part, cache, device, *msg))


class Remote:
    """A stage in a plain process of its own, driven through a pipe."""

    def __init__(self, name: str, index: int, bounds: list[int], device: str, dtype: str,
                 threads: int | None) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, name, index, bounds, device, dtype,
                                                     threads), daemon=True)
        self.proc.start()
        assert self.conn.recv() == "ready"

    def reset(self) -> None:
        self.conn.send("reset")
        self.conn.recv()

    def forward(self, first: bool, x: Any, mask: Any, pos: Any) -> tuple[Any, float]:
        self.conn.send((first, x, mask, pos))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


def decode(parts, *, prompt: int, new: int, idle: float) -> list[float]:
    """Median ms of each part's forward over the decode steps, then each part's prompt pass
    (ms) after them."""
    import torch

    from tpmlab.runtime.batching import row_positions
    from tpmlab.runtime.decoding import next_step_inputs

    for p in parts:
        p.reset()
    ids = torch.arange(1, prompt + 1)[None] % 100 + 1
    mask = torch.ones(1, prompt, dtype=torch.long)
    pos = row_positions(mask)
    times: list[list[float]] = [[] for _ in parts]
    first: list[float] = []
    for step in range(new + 1):
        x = ids
        for k, part in enumerate(parts):
            if idle:
                time.sleep(idle)
            x, seconds = part.forward(k == 0, x, mask, pos)
            (times[k] if step else first).append(seconds)
        ids = x
        mask, pos = next_step_inputs(mask, pos)
    return [statistics.median(t) * 1e3 if t else 0.0 for t in times] + [f * 1e3 for f in first]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--idle-ms", default="0,2", help="comma-separated idle gaps to compare")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--processes", action="store_true",
                        help="also each stage in a plain process of its own")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    staged, whole = build(args.model, args.stages, args.device, args.dtype)
    setups = {"stages in this process": [Local(p, args.device) for p in staged],
              "whole model": [Local(p, args.device) for p in whole]}
    if args.processes:
        bounds = cuts(args.model, args.stages)
        setups["stages in processes"] = [Remote(args.model, i, bounds, args.device, args.dtype,
                                                args.threads) for i in range(args.stages)]
    gaps = [float(g) for g in args.idle_ms.split(",")]
    runs: dict[tuple[str, float], list[list[float]]] = {(k, g): [] for k in setups for g in gaps}
    for _ in range(args.repeats):  # alternating, so other jobs' load falls on all alike
        for g in gaps:
            for k, parts in setups.items():
                runs[k, g].append(decode(parts, prompt=args.prompt, new=args.new, idle=g / 1e3))
    print(f"{args.model} {args.dtype} on {args.device}, {args.stages} stages, 1x{args.prompt} + "
          f"{args.new} greedy, {torch.get_num_threads()} torch threads, medians of "
          f"{args.repeats} (ms per forward)")
    for g in gaps:
        for k, parts in setups.items():
            n = len(parts)
            cols = [statistics.median(r[i] for r in runs[k, g]) for i in range(2 * n)]
            step = ", ".join(f"{c:.3f}" for c in cols[:n])
            pre = ", ".join(f"{c:.3f}" for c in cols[n:])
            print(f"  idle {g:g} ms, {k:24s} decode step: {step} (together {sum(cols[:n]):.3f}); "
                  f"prompt pass: {pre} (together {sum(cols[n:]):.3f})")
    for parts in setups.values():
        for p in parts:
            if isinstance(p, Remote):
                p.close()


if __name__ == "__main__":
    main()
