"""What one greedy generation step costs on 2 stages against the in-process executor.

A tiny model keeps the forward small, so the fixed cost of a step (message building,
per-step set-up, hooks, thread hops, the actor calls, the reply) shows. Runs, on this
machine and on the same weights: the in-process executor (``tpmlab.connect("local")``)
and the model as ``--stages`` stages on the embedded cluster (worker processes, TLS),
local and staged generations alternating so that other jobs' load falls on both alike.
Prints each one's median milliseconds per generated token (the whole request divided by
``--new``) and, for the stages, each step's median phases (ms) where the code records them
(``DaskBackend.phases``: ``step ...`` keys, the medians over a request's steps, then over
requests).

``--device cuda``: the stages on ``cluster_gpu.py``'s workers (one per GPU, sharing one if
there is one; hidden states through CUDA IPC on one host) and the in-process executor on
``cuda:0``, in ``--dtype``.

``--pause S``: after the timed runs, keep generating for ``S`` seconds and print the worker
processes' ids first, so that a sampling profiler can attach to them, e.g.
``py-spy record --pid PID --duration 20 --format speedscope --threads``.

    python -m benchmarks.generation_steps [--model tiny-llama] [--prompt 16] [--new 64]
        [--repeats 15] [--stages 2] [--pause 0]
    python -m benchmarks.generation_steps --device cuda --model llama-3-8b-shape \
        --dtype bfloat16 --prompt 128 --new 32 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time


def generation(model, prompt: int, new: int):
    import torch

    ids = torch.arange(1, prompt + 1) % 100 + 1
    tokens: list[torch.Tensor] = []

    def go() -> None:
        with model.generate(input_ids=ids, max_new_tokens=new, eos_token_id=[]) as gen:
            pass
        tokens.append(gen.generated_ids[0])
    return go, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the model's)")
    parser.add_argument("--stage-threads", type=int, default=None,
                        help="each stage's torch threads (default: the machine's cores)")
    args = parser.parse_args()

    import os

    import torch
    from distributed import Client

    import tpmlab
    from tpmlab.cluster import DaskBackend
    from tpmlab.cluster.embedded import start_local_cluster
    from tpmlab.lab import Lab

    gpu = args.device == "cuda"
    dtype = {"dtype": args.dtype} if args.dtype else {}
    local = tpmlab.connect("local", device=args.device,
                           **({"dtype": getattr(torch, args.dtype)} if args.dtype else {}))
    run_local, local_tokens = generation(local.model(args.model), args.prompt, args.new)
    if gpu:
        from benchmarks.cluster_gpu import start_gpu_cluster

        cluster = start_gpu_cluster(args.stages)
    else:
        cluster = start_local_cluster(args.stages, dashboard_address=":0")
    with cluster, Client(cluster) as client:
        lab = Lab(DaskBackend(client=client, timeout=600, threads=args.stage_threads))
        model = lab.model(args.model, stages=args.stages, **dtype)
        run_staged, staged_tokens = generation(model, args.prompt, args.new)
        for fn in (run_local, run_staged, run_local, run_staged):  # warm-up
            fn()
        times: dict[str, list[float]] = {"local": [], "staged": []}
        lab.backend.phases = []
        for i in range(args.repeats):
            order = [("local", run_local), ("staged", run_staged)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        recorded, lab.backend.phases = lab.backend.phases, None
        same = all(bool((a == b).all()) for a, b in zip(local_tokens, staged_tokens))
        loc, stg = (statistics.median(times[k]) * 1e3 / args.new for k in ("local", "staged"))
        print(f"{args.model}, 1x{args.prompt} + {args.new} greedy, medians of {args.repeats} "
              f"(load {os.getloadavg()[0]:.1f}): local {loc:.2f} ms/token, "
              f"{args.stages} stages {stg:.2f} ms/token ({stg / loc:.2f}x), "
              f"staged - local {stg - loc:.2f} ms/token; same tokens: {same}", flush=True)
        keys = [k for k in recorded[0] if k.startswith("step")] if recorded else []
        if keys:
            print("  per step (median ms): " + ", ".join(
                f"{k.removeprefix('step ')} {statistics.median(p.get(k, 0.0) for p in recorded):.3f}"
                for k in keys), flush=True)
        if args.pause:
            pids = client.run(os.getpid)
            print(f"worker pids: {pids}; client pid {os.getpid()}; generating for "
                  f"{args.pause:.0f} s", flush=True)
            end = time.monotonic() + args.pause
            while time.monotonic() < end:
                run_staged()
        lab.close()
    local.close()


if __name__ == "__main__":
    main()
