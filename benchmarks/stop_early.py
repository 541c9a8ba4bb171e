"""What ``tracer.stop()`` saves: a trace that reads one early layer, with and without
``tr.stop()``, in alternating runs in one process, in process and on pipeline stages of a
``LocalCluster`` (each stage's forward time from :attr:`DaskBackend.phases`).

    python -m benchmarks.stop_early                        # default model, 2 stages, CPU
    python -m benchmarks.stop_early --layer 2 --tokens 128 --stages 3
    python -m benchmarks.stop_early --device cuda          # stages on GPU workers

Prints the median request time each way and their ratio, and on the stages the median
forward time of each stage (a stage after the one that stops runs no layers: 0 ms).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import torch

import tpmlab
from tpmlab.runtime.backend import LocalBackend


def _timed(lab: Any, model: Any, prompt: str, layer: int, stop: bool) -> tuple[float, dict]:
    backend = lab.backend
    if hasattr(backend, "phases"):
        backend.phases = []
    start = time.perf_counter()
    with model.trace(prompt) as tr:
        model.layers[layer].output.save()
        if stop:
            tr.stop()
    seconds = time.perf_counter() - start
    phases = backend.phases[-1] if getattr(backend, "phases", None) else {}
    return seconds, phases


def measure(lab: Any, name: str, prompt: str, layer: int, reps: int, **deploy: Any
            ) -> dict[str, Any]:
    model = lab.model(name, **deploy)
    for stop in (False, True):  # warm up
        _timed(lab, model, prompt, layer, stop)
    runs: dict[bool, list[tuple[float, dict]]] = {False: [], True: []}
    for _ in range(reps):
        for stop in (False, True):
            runs[stop].append(_timed(lab, model, prompt, layer, stop))
    out: dict[str, Any] = {}
    for stop, rs in runs.items():
        key = "stop" if stop else "full"
        out[f"{key}_ms"] = statistics.median(r[0] for r in rs) * 1e3
        forwards = [k for k in rs[0][1] if k.endswith(" forward")]
        out[f"{key}_forward_ms"] = {k: statistics.median(r[1][k] for r in rs) for k in forwards}
    out["ratio"] = out["stop_ms"] / out["full_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    local = tpmlab.Lab(LocalBackend(device=args.device, dtype=dtype))
    ids = torch.randint(100, 1000, (args.tokens,))
    prompt = local.model(args.model).tokenizer.decode(ids)
    results = {"in process": measure(local, args.model, prompt, args.layer, args.reps)}
    local.close()

    from distributed import Client, LocalCluster

    from tpmlab.cluster import DaskBackend
    from tpmlab.cluster.warm_start import forked_workers

    options: dict[str, Any] = {}
    if args.device == "cuda":
        options["resources"] = {"GPU": 1}
    with forked_workers():
        cluster = LocalCluster(n_workers=args.stages, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR, **options)
    client = Client(cluster)
    backend = DaskBackend(client=client, timeout=300)
    try:
        results[f"{args.stages} stages"] = measure(tpmlab.Lab(backend), args.model, prompt,
                                                   args.layer, args.reps, stages=args.stages)
    finally:
        backend.close()
        client.close()
        cluster.close()
    print(f"a trace reading layer {args.layer}, {args.model}, {args.tokens} tokens, "
          f"{args.device}, median of {args.reps}")
    for where, r in results.items():
        print(f"  {where:12s} whole pass {r['full_ms']:8.1f} ms   stopped {r['stop_ms']:8.1f} ms"
              f"   ratio {r['ratio']:.3f}")
        for key in ("full", "stop"):
            if r[f"{key}_forward_ms"]:
                stages = "  ".join(f"{k} {v:.1f} ms" for k, v in r[f"{key}_forward_ms"].items())
                print(f"  {'':12s} {key:5s} {stages}")


if __name__ == "__main__":
    main()
