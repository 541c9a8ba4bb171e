"""Pipeline stages on a Dask LocalCluster vs the in-process executor, on this CPU.

Runs, in one process and on the same weights: the local executor (whole model in this
process) and the default model split into 2 and 3 stages on a LocalCluster of worker
processes; times a trace (all 30 layer outputs saved: nothing but what is saved comes
back) at 16 and 128 tokens and a short greedy generation, and prints each as a ratio
to local. Also prints where a 16-token trace's time goes (median per phase: stage 0's
decode/validate/batch, each stage's forward, the saves' host copies, the hop to the
stage's thread, the wait on the next stage, the client's send/wait/collect/encode)
and each stage worker's memory.

    python benchmarks/cluster_cpu.py [--model smollm2-135m] [--repeats 10]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def workloads(model, repeats: int) -> dict[str, float]:
    tok = model.tokenizer
    base = tok.decode(tok("The quick brown fox jumps over the lazy dog. " * 20)["input_ids"][:128])

    def prompt(n: int):
        import torch

        return torch.tensor(tok(base)["input_ids"][:n])

    def trace(n: int):
        ids = prompt(n)

        def go():
            with model.trace(input_ids=ids):
                for i in range(model.adapter.n_layers):
                    model.layers[i].output.save()
        return go

    def generate():
        with model.generate(input_ids=prompt(16), max_new_tokens=8):
            pass

    return {"trace 16 tok": timed(trace(16), repeats),
            "trace 128 tok": timed(trace(128), repeats),
            "generate 16+8 tok": timed(generate, max(2, repeats // 3))}


def workloads_trace16(model):
    import torch

    ids = torch.tensor(model.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"])
    ids = torch.cat([ids, ids])[:16]

    def go():
        with model.trace(input_ids=ids):
            for i in range(model.adapter.n_layers):
                model.layers[i].output.save()
    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    import tpmlab
    from tpmlab.cluster import DaskBackend
    from tpmlab.lab import Lab

    local = tpmlab.connect("local", device="cpu")
    rows = {"local": workloads(local.model(args.model), args.repeats)}
    local.close()
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        lab = Lab(DaskBackend(client=client))
        memory, phases = {}, {}
        for stages in (2, 3):
            lab.undeploy(args.model)
            model = lab.model(args.model, stages=stages)
            rows[f"{stages} stages"] = workloads(model, args.repeats)
            lab.backend.phases = []
            timed(workloads_trace16(model), args.repeats)
            recorded, lab.backend.phases = lab.backend.phases, None
            phases[stages] = {k: statistics.median(p.get(k, 0.0) for p in recorded)
                              for k in recorded[0]}
            memory[stages] = lab.backend.memory(args.model)
        lab.close()

    names = list(rows["local"])
    print(f"\n{args.model}, median of {args.repeats} (ms; ratio to local)")
    print(f"{'':10}" + "".join(f"{n:>26}" for n in names))
    for key, row in rows.items():
        cells = "".join(f"{row[n] * 1e3:>17.1f} ({row[n] / rows['local'][n]:4.2f}x)" for n in names)
        print(f"{key:10}{cells}")
    for stages, ph in phases.items():
        print(f"\n{stages} stages, trace 16 tok, median phases (ms):")
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    print("\nper-stage worker memory (MB): stage weights / resident / peak resident")
    for stages, mem in memory.items():
        print(f"{stages} stages: " + ", ".join(
            f"[{m['stage_bytes'] >> 20} / {m['rss'] >> 20} / {m['peak_rss'] >> 20}]" for m in mem))


if __name__ == "__main__":
    main()
