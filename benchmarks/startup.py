"""Start-up: ``tpmlab.connect()`` (the embedded cluster) plus a deploy as pipeline stages,
as a new user sees it, each run in a fresh interpreter.

Phases of one run (seconds): ``import`` (``import tpmlab``), ``connect`` (cluster up,
client connected), ``deploy`` (``lab.model(name, stages=N)``: every stage loaded, probed
and linked), ``first trace`` (one short trace, the answer back), ``close``. Each variant
alternates with the other in ``--runs`` pairs so that other jobs' load falls on both.

Variants: ``warm`` (the default: workers forked from a server that imported torch once,
:mod:`tpmlab.cluster.warm_start`) and ``spawn`` (``warm_start=False``: every worker a fresh
interpreter importing torch and transformers itself).

    python -m benchmarks.startup --runs 3
    python -m benchmarks.startup --device cuda --model llama-3-8b-shape --runs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PHASES = ("import", "connect", "deploy", "first trace", "close")


def one_run(model: str, stages: int, warm: bool, device: str) -> dict[str, float]:
    """One start-up in this (fresh) process: seconds per phase."""
    out: dict[str, float] = {}
    t = time.perf_counter()

    def mark(phase: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[phase] = now - t
        t = now

    import tpmlab

    mark("import")
    options = {} if device == "cpu" else {"n_workers": None}
    lab = tpmlab.connect(warm_start=warm, **options)
    mark("connect")
    m = lab.model(model, stages=stages)
    mark("deploy")
    with m.trace("The Eiffel Tower is located in the city of"):
        top = m.unembed.output[:, -1].argmax(-1).save()
    int(top.value)
    mark("first trace")
    lab.close()
    mark("close")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--variants", default="warm,spawn")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_run(args.model, args.stages, args.one == "warm", args.device)))
        return
    variants = args.variants.split(",")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for r in range(args.runs):
        for v in variants if r % 2 == 0 else variants[::-1]:
            cmd = [sys.executable, "-m", "benchmarks.startup", "--one", v, "--model", args.model,
                   "--stages", str(args.stages), "--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            if done.returncode or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"run {r} ({v}) failed")
            results[v].append(json.loads(lines[-1]))
            total = sum(results[v][-1][p] for p in PHASES if p != "close")
            print(f"run {r} {v:6s} " + " ".join(f"{p} {results[v][-1][p]:.2f}" for p in PHASES)
                  + f"  | to first answer {total:.2f} s", flush=True)
    print(f"\n{args.model}, {args.stages} stages, {args.device}: median of {args.runs} (s)")
    print(f"{'phase':14s}" + "".join(f"{v:>10s}" for v in variants))
    for p in PHASES:
        print(f"{p:14s}" + "".join(f"{statistics.median(x[p] for x in results[v]):10.2f}"
                                   for v in variants))
    print(f"{'to answer':14s}" + "".join(
        f"{statistics.median(sum(x[p] for p in PHASES if p != 'close') for x in results[v]):10.2f}"
        for v in variants))


if __name__ == "__main__":
    main()
