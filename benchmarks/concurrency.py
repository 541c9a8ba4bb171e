"""Threads sharing one in-process model (``tpmlab.connect("local")``): the throughput of N
threads each tracing against one thread tracing the same requests one after another.

``queued`` is what the local backend does (each model serves one request at a time, in
turn); ``at once`` calls the model's host directly from every thread, as it was before
(the forward passes of all threads at once on the same cores or GPU).

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
    from tpmlab.ir.codec import decode_plan, encode_plan

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
    host = backend.host(args.model)

    def queued() -> Any:
        return backend.run_values(args.model, blob)

    def at_once() -> Any:
        return host.run(decode_plan(blob))

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

    for fn in (queued, at_once):
        fn()  # warm-up
    rates: dict[str, list[float]] = {"one thread": [], "queued": [], "at once": []}
    for _ in range(args.repeats):
        rates["one thread"].append(throughput(queued, 1))
        rates["queued"].append(throughput(queued, args.threads))
        rates["at once"].append(throughput(at_once, args.threads))
    base = statistics.median(rates["one thread"])
    print(f"{args.model} on {args.device}, {args.shape}, {args.requests} requests, "
          f"median of {args.repeats}")
    for name, r in rates.items():
        m = statistics.median(r)
        label = name if name == "one thread" else f"{args.threads} threads, {name}"
        print(f"{label:24s}{m:8.2f} req/s{m / base:8.2f}x")
    lab.close()


if __name__ == "__main__":
    main()
