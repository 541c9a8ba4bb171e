"""Concurrent requests on one model: the throughput of N threads each tracing against one
thread tracing the same requests one after another.

``in process`` (default): threads sharing one in-process model (``tpmlab.connect("local")``).
Requests queued while a pass runs share the next forward pass
(:mod:`tpmlab.runtime.shared_passes`); prints how many requests a pass served on average.

``--stages S``: the model split into S stages on the embedded cluster: K requests in flight
(``--threads K``) pipeline across the stages, against one request at a time.
``--stage-threads T`` sets each stage's torch threads (default: the machine's cores, what
one request at a time wants; ``cores / S`` gives each stage its own cores).
With ``--device cuda`` the stages run on ``cluster_gpu.py``'s workers: one per GPU, each
advertising ``GPU=1``, sharing the GPUs when there are fewer than stages (two workers on one
GPU, hidden states through CUDA IPC); on the CPU, on the embedded cluster.
``--dtype``: the weights' dtype (e.g. ``bfloat16``; default: the model's).

    python -m benchmarks.concurrency --threads 8
    python -m benchmarks.concurrency --model tiny-llama --shape 8x256 --stages 2 --threads 8
    python -m benchmarks.concurrency --device cuda --model llama-3-8b-shape --shape 1x128
    python -m benchmarks.concurrency --device cuda --model llama-3-8b-shape --dtype bfloat16 \
        --shape 1x128 --stages 2 --threads 8
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
    parser.add_argument("--stages", type=int, default=0, help="0: in process")
    parser.add_argument("--stage-threads", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the model's)")
    args = parser.parse_args()
    import tpmlab
    from tpmlab.ir.codec import encode_plan

    gpu = args.device.startswith("cuda")
    dtype = {"dtype": args.dtype} if args.dtype else {}
    cluster = client = None
    t0 = time.perf_counter()
    if args.stages:
        from tpmlab.cluster import DaskBackend
        from tpmlab.lab import Lab

        if gpu:
            # the embedded cluster given a worker count starts plain CPU workers: the stages
            # would land there (an 8B model in float32 on the CPU, minutes before a line)
            from distributed import Client

            from benchmarks.cluster_gpu import start_gpu_cluster

            cluster = start_gpu_cluster(args.stages)
            client = Client(cluster)
            lab = Lab(DaskBackend(client=client, timeout=600))
        else:
            lab = Lab(DaskBackend(n_workers=args.stages, threads=args.stage_threads))
        model = lab.model(args.model, stages=args.stages, **dtype)
        devices = model.info.extra.get("stage_devices")
        where = (f"{args.stages} stages on {devices}" if gpu else
                 f"{args.stages} stages ({args.stage_threads or 'all'} torch threads each)")
    else:
        lab = tpmlab.connect("local", device=args.device,
                             **({"dtype": getattr(torch, args.dtype)} if args.dtype else {}))
        model = lab.model(args.model)
        where = "in process"
    print(f"{args.model} deployed {where} in {time.perf_counter() - t0:.1f} s", flush=True)
    rows, pos = (int(x) for x in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    blobs = []
    for _ in range(args.requests):  # distinct prompts: merging must not lean on equal inputs
        ids = torch.randint(0, model.info.vocab_size, (rows, pos), generator=gen)
        with model.trace(ids) as tr:
            model.layers[len(model.layers) // 2].output[:, -1].save()
            model.unembed.output[:, -1].argmax(-1).save()
        blobs.append(encode_plan(tr.plan()))
    backend = lab.backend

    def run(i: int) -> Any:
        return backend.run_values(args.model, blobs[i])

    def sync() -> None:
        if gpu and not args.stages:  # stages answer once their work is done
            torch.cuda.synchronize()

    def throughput(threads: int) -> float:
        sync()
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, range(args.requests)))
        sync()
        return args.requests / (time.perf_counter() - t)

    run(0)  # warm-up
    queue = getattr(backend, "queues", {}).get(args.model)
    rates: dict[str, list[float]] = {"one": [], "many": []}
    passes = requests = 0
    for i in range(args.repeats):  # alternate which goes first: load falls on both alike
        for key in ("one", "many") if i % 2 == 0 else ("many", "one"):
            if queue is not None and key == "many":
                p0, r0 = queue.passes, queue.requests
            rates[key].append(throughput(1 if key == "one" else args.threads))
            if queue is not None and key == "many":
                passes, requests = passes + queue.passes - p0, requests + queue.requests - r0
    base = statistics.median(rates["one"])
    print(f"{args.model} on {args.device}, {where}, {args.shape}, {args.requests} requests, "
          f"median of {args.repeats}")
    for key, label in (("one", "one at a time"), ("many", f"{args.threads} threads")):
        m = statistics.median(rates[key])
        print(f"{label:24s}{m:8.2f} req/s{m / base:8.2f}x  "
              f"(runs: {', '.join(f'{r:.2f}' for r in rates[key])})")
    if passes:
        print(f"{args.threads} threads: {requests / passes:.1f} requests per forward pass")
    lab.close()
    if client is not None:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
