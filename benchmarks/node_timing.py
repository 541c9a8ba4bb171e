"""What measuring each plan node's time (``meta["node_seconds"]``) costs: the logit lens over
every layer of a model (its top-k, KL, entropy and rank reductions: hundreds of nodes),
with the runner's node timing on and off, in alternating runs in one process.

    python -m benchmarks.node_timing                      # default model, CPU, 16 tokens
    python -m benchmarks.node_timing --tokens 128 --reps 15

Prints the median time of a lens request each way, their ratio, the nodes timed per
request, and the cost of the timing bookkeeping itself per node (two clock reads and a
dict update), measured apart from the model so load on the machine does not hide it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tpmlab
import tpmlab.lenses
from tpmlab.runtime.backend import LocalBackend
from tpmlab.runtime.runner import PlanRunner


def bookkeeping_seconds(n: int = 200_000) -> float:
    """Seconds per node of the timing code alone (as :meth:`PlanRunner._run` does it)."""
    seconds: dict[int, float] = {}
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        seconds[i % 512] = seconds.get(i % 512, 0.0) + time.perf_counter() - t
    return (time.perf_counter() - start) / n


def run(model_name: str, tokens: int, reps: int) -> dict[str, float]:
    lab = tpmlab.Lab(LocalBackend(device="cpu", dtype=torch.float32))
    model = lab.model(model_name)
    logit = tpmlab.lenses.get("logit")
    ids = torch.randint(100, 1000, (tokens,))
    prompt = model.tokenizer.decode(ids)
    metas: list[dict] = []
    run_values = lab.backend.run_values

    def recording(*args, **kwargs):
        values, meta = run_values(*args, **kwargs)
        metas.append(meta)
        return values, meta

    lab.backend.run_values = recording
    logit.run(model, prompt)  # warm up, and count the nodes timed
    timed_nodes = sum(len(m["node_seconds"]) for m in metas)
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(reps):
            for on in (True, False):
                PlanRunner.time_nodes = on
                start = time.perf_counter()
                logit.run(model, prompt)
                times[on].append(time.perf_counter() - start)
    finally:
        PlanRunner.time_nodes = True
        lab.close()
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"timed_ms": on * 1e3, "untimed_ms": off * 1e3, "ratio": on / off,
            "timed_nodes": timed_nodes, "bookkeeping_us": bookkeeping_seconds() * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    r = run(args.model, args.tokens, args.reps)
    print(f"logit lens, every layer, {args.model}, {args.tokens} tokens, CPU, median of {args.reps}")
    print(f"  node timing on   {r['timed_ms']:9.2f} ms")
    print(f"  node timing off  {r['untimed_ms']:9.2f} ms")
    print(f"  ratio            {r['ratio']:9.3f}")
    print(f"  nodes timed      {r['timed_nodes']:9d} per request")
    print(f"  bookkeeping      {r['bookkeeping_us']:9.3f} us per node")


if __name__ == "__main__":
    main()
