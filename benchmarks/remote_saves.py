"""A reduction over many traces' activations: remote saves reduced on the workers against
ordinary saves fetched into the notebook and reduced there, on the same deployment.

Each of ``--traces`` traces saves every layer's output ``[batch, tokens, d_model]`` (the
same inputs both ways); the reduction is the mean residual vector of each layer over all
rows and positions, and its Gram matrix ``XᵀX`` (what a probe or a PCA needs). Reported:
the seconds of the traces, of the reduction, and of both; the bytes that reach the notebook;
and the ratio remote / ordinary of the whole. The two results must agree.

    python -m benchmarks.remote_saves                                 # tiny-llama, CPU
    python -m benchmarks.remote_saves --device cuda --model llama-3-8b-shape \\
        --shape 8x512 --traces 16 --dtype bfloat16                    # 2 workers, 1 GPU
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch


def start(device: str) -> Any:
    from tpmlab.cluster.embedded import start_local_cluster

    if device == "cuda":  # two workers sharing GPU 0, one stage each
        return start_local_cluster(n_workers=2, resources={"GPU": 1},
                                   env={"CUDA_VISIBLE_DEVICES": "0"})
    return start_local_cluster(n_workers=2)


def ordinary(model: Any, inputs: list[torch.Tensor]) -> tuple[list, float, float, int]:
    t0 = time.perf_counter()
    fetched: list[list[torch.Tensor]] = [[] for _ in model.layers]
    for ids in inputs:
        with model.trace(ids):
            saved = [layer.output.save() for layer in model.layers]
        for k, s in enumerate(saved):
            fetched[k].append(s.value.reshape(-1, s.value.shape[-1]))
    t1 = time.perf_counter()
    out = []
    for rows in fetched:
        x = torch.cat(rows).double()
        out.append((x.mean(0).numpy(), (x.T @ x).numpy()))
    t2 = time.perf_counter()
    nbytes = sum(r.numel() * r.element_size() for rows in fetched for r in rows)
    return out, t1 - t0, t2 - t1, nbytes


def remote_saves(model: Any, inputs: list[torch.Tensor]) -> tuple[list, float, float, int]:
    import dask

    from tpmlab import remote

    t0 = time.perf_counter()
    kept: list[list[Any]] = [[] for _ in model.layers]
    for ids in inputs:
        with model.trace(ids):
            saved = [layer.output.save(remote=True) for layer in model.layers]
        for k, s in enumerate(saved):
            kept[k].append(s.value)
    t1 = time.perf_counter()
    graphs = []
    for values in kept:
        x = remote.concatenate(values).astype(np.float64)
        x = x.reshape(-1, x.shape[-1])
        graphs.append((x.mean(axis=0), x.T @ x))
    out = dask.compute(*graphs)
    t2 = time.perf_counter()
    nbytes = sum(m.nbytes + g.nbytes for m, g in out)
    return list(out), t1 - t0, t2 - t1, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--shape", default="8x128", help="batch x tokens")
    parser.add_argument("--traces", type=int, default=16)
    args = parser.parse_args()

    from distributed import Client

    from tpmlab import Lab
    from tpmlab.cluster import DaskBackend

    batch, tokens = (int(v) for v in args.shape.split("x"))
    cluster = start(args.device)
    client = Client(cluster)
    lab = Lab(DaskBackend(client=client))
    try:
        options = {"stages": args.stages}
        if args.dtype:
            options["dtype"] = args.dtype
        model = lab.model(args.model, **options)
        vocab = model.info.vocab_size
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randint(0, vocab, (batch, tokens), generator=gen)
                  for _ in range(args.traces)]
        ordinary(model, inputs[:1])  # warm both ways
        remote_saves(model, inputs[:1])
        lab.release_remote()
        rows = {}
        for name, fn in (("ordinary saves, reduced in the notebook", ordinary),
                         ("remote saves, reduced on the workers", remote_saves)):
            rows[name] = fn(model, inputs)
            lab.release_remote()
        (want, *a), (got, *b) = rows.values()
        for (m1, g1), (m2, g2) in zip(want, got):
            np.testing.assert_allclose(m1, m2, rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-6)
        print(f"{args.model}, {args.stages} stages, {args.traces} traces of {batch}x{tokens}, "
              f"every layer ({len(model.layers)}) saved; the results agree")
        print("| way | traces s | reduction s | total s | bytes to the notebook |")
        print("|---|---|---|---|---|")
        for name, (_, traces, reduce, nbytes) in rows.items():
            print(f"| {name} | {traces:.2f} | {reduce:.2f} | {traces + reduce:.2f} | "
                  f"{nbytes / 2**20:,.1f} MiB |")
        print(f"remote / ordinary, total: {(b[0] + b[1]) / (a[0] + a[1]):.2f}x")
    finally:
        lab.close()
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
