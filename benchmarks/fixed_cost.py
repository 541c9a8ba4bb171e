"""The fixed cost of a request on Dask stages: where a short trace's time goes besides the
layers, and what a bare actor round trip costs next to a leaner channel.

``trace``: each ``--models`` model deployed as 2 stages on the embedded cluster (2 worker
processes, TLS: what ``tpmlab.connect()`` starts), a trace with no intervention but the
last position's argmax saved (what ``cluster_gpu.py`` calls "trace") at each ``--tokens``
length, against the same trace in process; prints the median total, each phase's median
(``DaskBackend.phases``) and the two hops (:func:`cluster_cpu.hop_times`).

``channels``: a hidden state of each size sent worker A -> worker B and back, by a Dask actor
call (what a stage hop is today) and by Dask's comm ``rpc`` to a handler registered on the
worker (the leaner channel a stage could use for the hidden state), and a client -> actor
round trip; on the same TLS cluster, interleaved.

``link``: the same trace with the direct channels (:mod:`tpmlab.cluster.stage_link`: client
to each stage, stage to stage) on and off, alternating request by request on one deployment
(``stage_link.ACTIVE`` in the client and on the workers): the medians of each way's total
and hops, and the median of the differences between neighbouring requests. With
``TPMLAB_STAGE_LINK=network`` in the environment the links run over TCP (TLS), as between
hosts; the kinds of links in use are printed.

``--gpu``: the workers are ``cluster_gpu.py``'s (one GPU each, sharing one if there is
one); channels also hand a bf16 tensor from A's GPU to B's, through host memory (a stage
hop's ordinary way) and through CUDA IPC. ``--cuda-ipc on|off|both`` (``--no-cuda-ipc``: off): hidden states and gradients
between the stages through CUDA IPC or host memory, ``both`` a paired run on one cluster;
after each model, whether each hop used it. ``--workloads trace,grad``: ``grad`` adds a
backward, so a gradient crosses each hop back.

    python benchmarks/fixed_cost.py [--models tiny-llama,smollm2-135m] [--tokens 16,128]
        [--repeats 30] [--sections trace,channels] [--local]
    python benchmarks/fixed_cost.py --gpu --models llama-3-8b-shape --dtype bfloat16 \\
        --tokens 128 --sections trace --workloads trace,grad --cuda-ipc both
    python benchmarks/fixed_cost.py --gpu --sections channels
    python benchmarks/fixed_cost.py --sections link --models tiny-llama --tokens 16 --repeats 200
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from benchmarks.cluster_cpu import hop_times


def median_ms(fn: Any, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def trace_fn(model: Any, n: int, grad: bool = False) -> Any:
    """A trace of ``n`` tokens saving the last position's argmax; ``grad``: with a backward
    from a logit difference, saving the argmax of the first layer's output gradient there
    (the gradient crosses every stage hop back)."""
    import torch

    ids = torch.arange(1, n + 1) % 100 + 1

    def go() -> None:
        with model.trace(input_ids=ids):
            if grad:
                h = model.layers[0].output
                logits = model.output.logits
                (logits[:, -1, 7] - logits[:, -1, 11]).sum().backward()
                h.grad[:, -1].argmax(-1).save()
            else:
                model.output.logits[:, -1].argmax(-1).save()
    return go


def _switch_ipc(on: bool, dask_worker: Any = None) -> None:
    import os

    os.environ["TPMLAB_CUDA_IPC"] = "1" if on else "0"


def traces(models: list[str], tokens: list[int], repeats: int, with_local: bool,
           gpu: bool = False, dtype: str | None = None, ipc_modes: tuple[bool, ...] = (True,),
           workloads: tuple[str, ...] = ("trace",)) -> None:
    """``gpu``: two workers with a GPU each (sharing one if there is one), as
    ``cluster_gpu.py`` starts them; else the embedded cluster. ``ipc_modes``: deploy with
    CUDA IPC between the stages on / off, in this order (``(True, False)``: a paired run)."""
    from distributed import Client

    import tpmlab
    from benchmarks.cluster_gpu import ipc_hops, start_gpu_cluster
    from tpmlab.cluster import DaskBackend
    from tpmlab.cluster.embedded import start_local_cluster
    from tpmlab.lab import Lab

    device = "cuda" if gpu else "cpu"
    kw = {"dtype": dtype} if dtype else {}
    base = {}
    if with_local:
        import torch

        local = tpmlab.connect("local", device=device,
                               **({"dtype": getattr(torch, dtype)} if dtype else {}))
        base = {(m, n, w): median_ms(trace_fn(local.model(m), n, w == "grad"), repeats)
                for m in models for n in tokens for w in workloads}
        local.close()
    cluster = start_gpu_cluster(2) if gpu else start_local_cluster(2, dashboard_address=":0")
    with cluster, Client(cluster) as client:
        lab = Lab(DaskBackend(client=client, timeout=600))
        for m in models:
            for on in ipc_modes:
                client.run(_switch_ipc, on)
                lab.undeploy(m)
                model = lab.model(m, stages=2, **kw)
                for n in tokens:
                    for w in workloads:
                        go = trace_fn(model, n, w == "grad")
                        total = median_ms(go, repeats)
                        lab.backend.phases = []
                        for _ in range(repeats):
                            go()
                        recorded, lab.backend.phases = lab.backend.phases, None
                        ph = {k: statistics.median(p.get(k, 0.0) for p in recorded)
                              for k in recorded[0]}
                        per = [hop_times(p) for p in recorded]  # per request, then the median
                        hops = {k: statistics.median(h[k] for h in per) for k in per[0]}
                        b = base.get((m, n, w))
                        local = (f", in process {b:.2f} ms ({total / b:.2f}x)" if b else "")
                        print(f"\n{m}, {w} {n} tok, CUDA IPC {'on' if on else 'off'}: "
                              f"2 stages {total:.2f} ms{local}")
                        print("  phases: " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
                        print("  hops: " + ", ".join(f"{k} {v:.2f}" for k, v in hops.items()),
                              flush=True)
                print("\n".join(ipc_hops(lab.backend.memory(m))), flush=True)
            lab.undeploy(m)
        lab.close()


def _use_link(on: bool, dask_worker: Any = None) -> None:
    """The stage links on or off in this process (the client's links to the stages) or on a
    worker (a stage's link to the next)."""
    from tpmlab.cluster import stage_link

    stage_link.ACTIVE = on


def link_ab(models: list[str], tokens: list[int], repeats: int, gpu: bool = False,
            dtype: str | None = None) -> None:
    """Each trace with the stage link on, then off, then on...: paired."""
    from distributed import Client

    from benchmarks.cluster_gpu import start_gpu_cluster
    from tpmlab.cluster import DaskBackend
    from tpmlab.cluster.embedded import start_local_cluster
    from tpmlab.lab import Lab

    kw = {"dtype": dtype} if dtype else {}
    cluster = start_gpu_cluster(2) if gpu else start_local_cluster(2, dashboard_address=":0")
    with cluster, Client(cluster) as client:
        lab = Lab(DaskBackend(client=client, timeout=600))
        for m in models:
            model = lab.model(m, stages=2, **kw)
            for n in tokens:
                go = trace_fn(model, n)
                for _ in range(3):
                    go()
                rows: dict[bool, list[dict[str, float]]] = {True: [], False: []}
                try:
                    for r in range(2 * repeats):
                        on = r % 2 == 0
                        client.run(_use_link, on)
                        _use_link(on)
                        lab.backend.phases = []
                        t = time.perf_counter()
                        go()
                        total = (time.perf_counter() - t) * 1e3
                        ph = lab.backend.phases[0]
                        rows[on].append({"total": total, **hop_times(ph),
                                         "stage 0 -> 1, one way": ph["stage0 hop out"],
                                         "stage 1 -> 0, one way": ph["stage0 hop back"]})
                        lab.backend.phases = None
                finally:
                    client.run(_use_link, True)
                    _use_link(True)
                kinds = [getattr(lab.backend._links.get(a.key), "kind", None)
                         for a in lab.backend.deployment(m).actors]
                between = [s["link"] for s in lab.backend.memory(m)][:-1]
                print(f"\n{m}, trace {n} tok, stage links on / off, medians of {repeats} "
                      f"(paired: median of on - off, neighbouring requests); the client's "
                      f"links {kinds}, the stages' {between}")
                for k in rows[True][0]:
                    on_v = [x[k] for x in rows[True]]
                    off_v = [x[k] for x in rows[False]]
                    diff = statistics.median(a - b for a, b in zip(on_v, off_v))
                    print(f"  {k:36s} {statistics.median(on_v):7.2f} / "
                          f"{statistics.median(off_v):7.2f} ms   paired {diff:+.2f} ms", flush=True)
            lab.undeploy(m)
        lab.close()


class Relay:
    """An actor that forwards what it gets to a peer actor (a stage hop from a worker)."""

    def __init__(self) -> None:
        self.peer: Any = None

    async def link(self, peer: Any) -> None:
        self.peer = peer

    async def echo(self, x: Any) -> Any:
        return x

    async def via_actor(self, x: Any, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            await self.peer.echo(x)
            out.append((time.perf_counter() - t) * 1e3)
        return out

    async def via_rpc(self, x: Any, address: str, n: int) -> list[float]:
        from distributed import get_worker
        from distributed.protocol import to_serialize

        worker = get_worker()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            await worker.rpc(address).tpmlab_echo(x=to_serialize(x))
            out.append((time.perf_counter() - t) * 1e3)
        return out


    # -- a hidden state on the GPU (``--gpu``) ----------------------------------------------------
    async def hello(self, prev: Any) -> Any:
        """The far end of a device hop: this worker's :class:`~tpmlab.cluster.cuda_ipc.Identity`."""
        import torch

        from tpmlab.cluster import cuda_ipc

        torch.cuda.init()
        self.rx = cuda_ipc.Receiver()
        return cuda_ipc.identity("bench-b")

    async def land(self, x: Any) -> None:
        """The value on this worker's GPU, the copy complete (what a stage needs of its input)."""
        import torch

        from tpmlab.cluster import cuda_ipc, wire

        if isinstance(x, cuda_ipc.IpcTensor):
            self.rx.take(x, "bench", torch.device("cuda"))
            self.rx.settle("bench")
        else:
            wire.from_wire(x, "cuda")
            torch.cuda.synchronize()

    async def via_device(self, shape: tuple[int, ...], n: int, ipc: bool) -> list[float]:
        """Round trips (ms) handing a bf16 device tensor of ``shape`` to the peer, as a stage
        hop does: through host memory (``to_wire``) or, ``ipc``, through CUDA IPC."""
        import torch

        from tpmlab.cluster import cuda_ipc, wire

        x = torch.randn(shape, device="cuda").to(torch.bfloat16)
        sender = cuda_ipc.Sender("bench-a>")
        if ipc:
            sender.link(await self.peer.hello(None))
            if not sender.active:
                return []
        out = []
        for _ in range(n):
            t = time.perf_counter()
            given = sender.give(x, "bench", time.monotonic() + 60) if ipc else None
            await self.peer.land(given if given is not None else wire.to_wire(x))
            sender.release("bench")
            out.append((time.perf_counter() - t) * 1e3)
        return out


def _register_echo(dask_worker: Any) -> None:
    async def tpmlab_echo(comm: Any = None, x: Any = None) -> Any:
        from distributed.protocol import to_serialize

        return {"x": to_serialize(x)}
    dask_worker.handlers["tpmlab_echo"] = tpmlab_echo


def channels(repeats: int, gpu: bool = False) -> None:
    import numpy as np
    from distributed import Client

    from benchmarks.cluster_gpu import start_gpu_cluster
    from tpmlab.cluster.backend import actor_call
    from tpmlab.cluster.embedded import start_local_cluster

    sizes = {"[1, 16, 576] fp32 (37 KB)": (1, 16, 576),
             "[1, 128, 576] fp32 (295 KB)": (1, 128, 576),
             "[1, 128, 4096] bf16 (1 MB)": (1, 128, 2048)}
    cluster = start_gpu_cluster(2) if gpu else start_local_cluster(2, dashboard_address=":0")
    with cluster, Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        client.run(_register_echo)
        ra = client.submit(Relay, actor=True, workers=[a], pure=False).result()
        rb = client.submit(Relay, actor=True, workers=[b], pure=False).result()
        ra.link(rb).result()
        print("\nround trip carrying a value (median / p10 ms)")
        for name, shape in sizes.items():
            x = np.random.rand(*shape).astype(np.float32)
            rows = {"client -> actor": [], "client -> actor, straight": [],
                    "worker A -> actor on B": [], "worker A -> rpc handler on B": []}
            for i in range(repeats + 3):
                t = time.perf_counter()
                ra.echo(x).result()
                if i >= 3:
                    rows["client -> actor"].append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()  # as DaskBackend._call makes a request's calls
                asyncio.run_coroutine_threadsafe(actor_call(client, a, ra.key, "echo", x),
                                                 client.loop.asyncio_loop).result()
                if i >= 3:
                    rows["client -> actor, straight"].append((time.perf_counter() - t) * 1e3)
            rows["worker A -> actor on B"] = ra.via_actor(x, repeats + 3).result()[3:]
            rows["worker A -> rpc handler on B"] = ra.via_rpc(x, b, repeats + 3).result()[3:]
            for k, v in rows.items():
                v = sorted(v)
                print(f"  {name:28} {k:30} {statistics.median(v):6.2f} / "
                      f"{v[len(v) // 10]:6.2f}", flush=True)
        if not gpu:
            return
        print("\nworker A -> actor on B, a bf16 tensor on A's GPU landing on B's (median / p10 ms)")
        for shape in ((1, 1, 4096), (1, 128, 4096), (8, 512, 4096)):
            name = f"{list(shape)} bf16 ({np.prod(shape) * 2 / 1e6:.2g} MB)"
            for label, ipc in (("through host memory", False), ("through CUDA IPC", True)):
                v = sorted(ra.via_device(shape, repeats + 3, ipc).result()[3:])
                if not v:
                    print(f"  {name:28} {label:30} not eligible here", flush=True)
                    continue
                print(f"  {name:28} {label:30} {statistics.median(v):6.2f} / "
                      f"{v[len(v) // 10]:6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llama,smollm2-135m")
    parser.add_argument("--tokens", default="16,128")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sections", default="trace,channels")
    parser.add_argument("--local", action="store_true", help="also time the trace in process")
    parser.add_argument("--gpu", action="store_true",
                        help="stages on two GPU workers (sharing one GPU if there is one)")
    parser.add_argument("--dtype", default=None, help="the stages' dtype, e.g. bfloat16")
    parser.add_argument("--workloads", default="trace", help="trace,grad")
    parser.add_argument("--cuda-ipc", default="on", choices=["on", "off", "both"],
                        help="hidden states between GPU stages through CUDA IPC; both: a paired "
                             "run, on then off on the same cluster")
    parser.add_argument("--no-cuda-ipc", action="store_true", help="the same as --cuda-ipc off")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    mode = "off" if args.no_cuda_ipc else args.cuda_ipc
    modes = {"on": (True,), "off": (False,), "both": (True, False)}[mode]
    if "trace" in sections:
        traces(args.models.split(","), [int(t) for t in args.tokens.split(",")], args.repeats,
               args.local, gpu=args.gpu, dtype=args.dtype, ipc_modes=modes,
               workloads=tuple(args.workloads.split(",")))
    if "channels" in sections:
        channels(args.repeats, gpu=args.gpu)
    if "link" in sections:
        link_ab(args.models.split(","), [int(t) for t in args.tokens.split(",")], args.repeats,
                gpu=args.gpu, dtype=args.dtype)


if __name__ == "__main__":
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    main()
