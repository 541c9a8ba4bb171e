"""A reduction over many traces' activations: remote saves reduced on the workers against
ordinary saves fetched into the notebook and reduced there, on the same deployment.

Each of ``--traces`` traces saves every layer's output ``[batch, tokens, d_model]`` (the
same inputs both ways); the reduction is the mean residual vector of each layer over all
rows and positions, and its Gram matrix ``XᵀX`` (what a probe or a PCA needs). Reported:
the seconds of the traces, of the reduction, and of both; the bytes that reach the notebook;
and the ratio of each way to the ordinary one, of the whole. The results must agree.

With ``--gateway`` a third way runs the same traces as a user of a gateway on loopback
over the same deployment: the remote values stay on the workers under the user's handles,
each is reduced there through the gateway (its sum over rows and its Gram matrix, in
float64), and the notebook adds up the per-value results.

    python -m benchmarks.remote_saves                                 # tiny-llama, CPU
    python -m benchmarks.remote_saves --gateway                       # and behind a gateway
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


def gateway_saves(model: Any, inputs: list[torch.Tensor]) -> tuple[list, float, float, int]:
    """Remote saves behind a gateway: each value reduced on its worker through the gateway
    (``RemoteValue.reduce``), the per-value results added up here."""
    t0 = time.perf_counter()
    kept: list[list[Any]] = [[] for _ in model.layers]
    for ids in inputs:
        with model.trace(ids):
            saved = [layer.output.save(remote=True) for layer in model.layers]
        for k, s in enumerate(saved):
            kept[k].append(s.value)
    t1 = time.perf_counter()
    out, nbytes = [], 0
    for values in kept:
        rows = sum(int(np.prod(v.shape[:-1])) for v in values)
        sums = [v.reduce("sum", list(range(len(v.shape) - 1)), dtype="float64") for v in values]
        grams = [v.reduce("gram", dtype="float64") for v in values]
        nbytes += sum(t.numel() * t.element_size() for t in sums + grams)
        out.append(((sum(sums) / rows).numpy(), sum(grams).numpy()))
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1, nbytes


def serve_gateway(backend: Any, model: str, folder: str) -> tuple[Any, str]:
    """A gateway on loopback over ``backend`` and one user of the inspect tier whose remote
    limits are the engine's own (what the benchmark keeps); its server and that user's key."""
    import dataclasses

    from tpmlab.gateway.app import create_app
    from tpmlab.gateway.core import Gateway, GatewayConfig
    from tpmlab.gateway.ledger import Ledger
    from tpmlab.gateway.server import ServerThread
    from tpmlab.gateway.tiers import TIER_LIMITS
    from tpmlab.ir.validate import Limits

    engine = Limits()
    inspect = dataclasses.replace(TIER_LIMITS["inspect"], max_remote_bytes=64 * 2**30,
                                  max_remote_values=engine.max_remote_values)
    gw = Gateway(backend, Ledger(f"sqlite:///{folder}/ledger.db"),
                 GatewayConfig(models=[model], tier_limits=dict(TIER_LIMITS, inspect=inspect)))
    gw.ledger.create_user("bench", "inspect", units=1e12)
    return ServerThread(create_app(gw)).start(), gw.ledger.create_key("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--shape", default="8x128", help="batch x tokens")
    parser.add_argument("--traces", type=int, default=16)
    parser.add_argument("--gateway", action="store_true",
                        help="also as a user of a gateway on loopback")
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
        if args.gateway:
            import tempfile

            import tpmlab

            with tempfile.TemporaryDirectory() as folder:
                server, key = serve_gateway(lab.backend, args.model, folder)
                user = tpmlab.connect(gateway=server.url, token=key)
                try:
                    gmodel = user.model(args.model)
                    gateway_saves(gmodel, inputs[:1])  # warm
                    user.release_remote()
                    rows["remote saves behind the gateway, reduced per value"] = \
                        gateway_saves(gmodel, inputs)
                    user.release_remote()
                finally:
                    user.close()
                    server.stop()
        (want, *a), *others = rows.values()
        for got, *_ in others:
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
        for name, (_, traces, reduce, _) in list(rows.items())[1:]:
            print(f"{name} / ordinary, total: {(traces + reduce) / (a[0] + a[1]):.2f}x")
    finally:
        lab.close()
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
