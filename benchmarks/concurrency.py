"""Threads sharing one in-process model (``tpmlab.connect("local")``): the throughput of N
threads each tracing against one thread tracing the same requests one after another.

``at once`` is what the local backend does: each model serves one request at a time,
in the calling thread, under a lock; ``in turn`` queues every request onto one thread
(one OpenMP team, one CUDA stream), a candidate for more.

    python -m benchmarks.concurrency --threads 8
    python -m benchmarks.concurrency --device cuda --model llama-3-8b-shape --shape 1x128
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="1x128", help="batch x tokens")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="requests per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import tpmlab
    from tpmlab.ir.codec import encode_plan

    lab = tpmlab.connect("local", device=args.device)
    model = lab.model(args.model)
    rows, pos = (int(x) for x in args.shape.split("x"))
    ids = torch.randint(0, model.info.vocab_size, (rows, pos),
                        generator=torch.Generator().manual_seed(0))
    with model.trace(ids) as tr:
        model.layers[len(model.layers) // 2].output[:, -1].save()
        model.unembed.output[:, -1].argmax(-1).save()
    blob = encode_plan(tr.plan())
    backend = lab.backend
    turn = ThreadPoolExecutor(1)

    def at_once() -> Any:
        return backend.run_values(args.model, blob)

    def in_turn() -> Any:
        return turn.submit(at_once).result()

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def throughput(fn: Any, threads: int) -> float:
        sync()
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: fn(), range(args.requests)))
        sync()
        return args.requests / (time.perf_counter() - t)

    for fn in (at_once, in_turn):
        fn()  # warm-up
    rates: dict[str, list[float]] = {"one thread": [], "at once": [], "in turn": []}
    for _ in range(args.repeats):
        rates["one thread"].append(throughput(at_once, 1))
        rates["at once"].append(throughput(at_once, args.threads))
        rates["in turn"].append(throughput(in_turn, args.threads))
    base = statistics.median(rates["one thread"])
    print(f"{args.model} on {args.device}, {args.shape}, {args.requests} requests, "
          f"median of {args.repeats}")
    for name, r in rates.items():
        m = statistics.median(r)
        label = name if name == "one thread" else f"{args.threads} threads, {name}"
        print(f"{label:24s}{m:8.2f} req/s{m / base:8.2f}x")
    turn.shutdown()
    lab.close()


if __name__ == "__main__":
    main()
