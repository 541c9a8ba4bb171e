"""Cost of the run-time weight guard per request, as a ratio to the request it guards.

After every request each engine compares the version counters of its parameters and
buffers with those recorded at deploy time (:class:`tpmlab.runtime.weights.WeightGuard`).
Cases, each the median of repeated runs in one process on the same weights:
  check          the guard's comparison alone (nothing changed: the cost every request pays)
  trace          a trace with no intervention (its whole request: validate, run, encode)
  raw            plain ``model(input_ids)``

    python -m benchmarks.weight_guard                      # default model, CPU, 1x16 tokens
    python -m benchmarks.weight_guard --model tiny-llama --reps 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tpmlab
from tpmlab.runtime.backend import LocalBackend


def _timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(model_name: str, tokens: int, reps: int) -> dict[str, float]:
    lab = tpmlab.Lab(LocalBackend(device="cpu", dtype=torch.float32))
    model = lab.model(model_name)
    host = lab.backend.host(model.name)
    ids = torch.randint(100, 1000, (1, tokens))

    def raw():
        with torch.inference_mode():
            host.model(input_ids=ids, use_cache=False)

    def trace():
        with model.trace(input_ids=ids):
            pass

    # the guard's comparison is microseconds: time a batch of them per sample
    inner = 100
    out = {"tensors": len(host.weights),
           "check": _timed(lambda: [host.weights.check() for _ in range(inner)], reps) / inner,
           "trace": _timed(trace, reps), "raw": _timed(raw, reps)}
    lab.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    r = run(args.model, args.tokens, args.reps)
    print(f"model {args.model}, 1x{args.tokens} tokens, {r['tensors']} parameters and buffers")
    print(f"{'case':<8} {'ms':>10} {'x trace':>9}")
    for case in ("check", "trace", "raw"):
        print(f"{case:<8} {r[case] * 1e3:10.4f} {r[case] / r['trace']:9.5f}")


if __name__ == "__main__":
    main()
