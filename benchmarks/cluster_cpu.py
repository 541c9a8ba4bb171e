"""Pipeline stages on a Dask LocalCluster vs the in-process executor, on this CPU.

``main``: runs, in one process and on the same weights: the local executor (whole model
in this process) and the default model split into 2 and 3 stages on the embedded cluster
(worker processes, TLS: what ``tpmlab.connect()`` starts); times a trace (all 30 layer
outputs saved: nothing but what is saved comes back) at 16 and 128 tokens and a short
greedy generation, local and staged requests alternating (the local executor in a process of its own, as
a notebook has it), and prints each as a ratio to local. Also prints where a 16-token
trace's time goes (median per phase: stage 0's decode/validate/batch, each stage's
forward, the saves' host copies, the hop to the stage's thread, the wait on the next
stage, the client's send/wait/collect/encode) and each stage worker's memory.

``tls``: what TLS costs. The same 2-stage deployment on two clusters started side by side
with the same options, one on plain TCP and one with TLS (the embedded cluster), requests
alternating between them so that load on the machine falls on both alike; prints the
median trace times, their difference, and the two stage hops a trace makes
(client -> stage 0 and back, stage 0 -> stage 1 and back) measured from the phases.

    python benchmarks/cluster_cpu.py [--model smollm2-135m] [--repeats 10] [--sections main,tls]
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


def interleaved(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Median seconds of each of ``fns``, run in turn (the order swapped every round) so that
    the load other jobs put on a shared machine falls on all of them alike. A function that
    returns a float has timed itself (seconds)."""
    for fn in fns.values():
        fn()  # warm-up
    out: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for k in list(fns) if i % 2 == 0 else list(fns)[::-1]:
            t = time.perf_counter()
            took = fns[k]()
            out[k].append(took if isinstance(took, float) else time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in out.items()}


def _local_server(conn, model_name: str) -> None:
    """The in-process executor in a process of its own (as a notebook has it: no Dask
    scheduler or client threads beside it): runs the named workload, answers its seconds."""
    import tpmlab

    local = tpmlab.connect("local", device="cpu")
    work = workloads(local.model(model_name))
    conn.send(list(work))
    while (name := conn.recv()) is not None:
        t = time.perf_counter()
        work[name]()
        conn.send(time.perf_counter() - t)
    local.close()


class LocalProcess:
    """A :func:`_local_server` process; :meth:`workload` gives a function that runs one."""

    def __init__(self, model_name: str) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_local_server, args=(child, model_name), daemon=True)
        self.process.start()
        self.names = self.conn.recv()

    def workload(self, name: str):
        def go() -> float:
            self.conn.send(name)
            return self.conn.recv()
        return go

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(60)


def workloads(model) -> dict[str, object]:
    """The timed requests, by name: traces saving all layer outputs, a short generation."""
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

    return {"trace 16 tok": trace(16), "trace 128 tok": trace(128), "generate 16+8 tok": generate}


def workloads_trace16(model):
    import torch

    ids = torch.tensor(model.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"])
    ids = torch.cat([ids, ids])[:16]

    def go():
        with model.trace(input_ids=ids):
            for i in range(model.adapter.n_layers):
                model.layers[i].output.save()
    return go


def hop_times(phases: dict[str, float]) -> dict[str, float]:
    """The two stage hops of a 2-stage trace (ms), from one request's phases: what each
    round trip took beyond the work done at its far end."""
    def stage(k: int) -> float:
        return sum(phases.get(f"stage{k} {n}", 0.0)
                   for n in ("state", "forward", "saves", "thread", "wait"))
    driver = phases["decode"] + phases["validate"] + phases["batch+state"]
    return {"hop client -> stage 0": phases["client wait run"] - driver - stage(0),
            "hop stage 0 -> stage 1": phases["stage0 wait"] - stage(1),
            "collect stage 1's saves": phases["client collect"]}


class Echo:
    """An actor that answers with what it was sent: one bare stage hop."""

    def echo(self, x):
        return x


def bare_hops(clients: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Round trips (ms) of an actor call carrying a hidden state of each size, on each
    cluster, interleaved: what a stage hop costs with no stage work at its far end."""
    import torch

    sizes = {"[1, 16, 576] fp32 (37 KB)": (1, 16, 576), "[1, 128, 576] fp32 (295 KB)": (1, 128, 576),
             "[8, 256, 576] fp32 (4.7 MB)": (8, 256, 576)}
    actors = {}
    for k, client in clients.items():
        with client.as_current():
            actors[k] = client.submit(Echo, actor=True, pure=False).result()
    out: dict[str, dict[str, list[float]]] = {}
    for name, shape in sizes.items():
        x = torch.randn(shape).numpy()
        out[name] = {k: [] for k in clients}
        n = repeats if x.nbytes < 1 << 20 else max(20, repeats // 10)
        for i in range(n + 5):
            for k in ("tcp", "tls") if i % 2 else ("tls", "tcp"):
                with clients[k].as_current():
                    t = time.perf_counter()
                    actors[k].echo(x).result()
                    if i >= 5:  # the first calls open connections
                        out[name][k].append((time.perf_counter() - t) * 1e3)
    return out


def tls_cost(model_name: str, workers: int, repeats: int) -> None:
    """Plain TCP against TLS, same deployment, same run, requests interleaved."""
    from distributed import Client, LocalCluster

    from tpmlab.cluster import DaskBackend
    from tpmlab.cluster.embedded import start_local_cluster
    from tpmlab.cluster.warm_start import WORKER_ENV
    from tpmlab.lab import Lab

    options = {"n_workers": workers, "threads_per_worker": 1, "processes": True,
               "host": "127.0.0.1", "dashboard_address": None, "silence_logs": logging.ERROR,
               "env": dict(WORKER_ENV)}
    clusters = {"tcp": LocalCluster(protocol="tcp://", **options),
                "tls": start_local_cluster(workers, dashboard_address=None)}
    labs = {k: Lab(DaskBackend(client=Client(c))) for k, c in clusters.items()}
    try:
        hops = bare_hops({k: lab.backend.client for k, lab in labs.items()}, 10 * repeats)
        models = {}
        for k, lab in labs.items():
            # stage actors bind to the current client when they arrive: two clients live here
            with lab.backend.client.as_current():
                models[k] = lab.model(model_name, stages=2)
        tok = models["tcp"].tokenizer
        text = "The quick brown fox jumps over the lazy dog. " * 20

        def trace(model, n: int, save_all: bool):
            import torch

            ids = torch.tensor(tok(text)["input_ids"][:n])

            def go():
                with model.trace(input_ids=ids):
                    if save_all:
                        for i in range(model.adapter.n_layers):
                            model.layers[i].output.save()
                    else:
                        model.output.logits[:, -1].argmax(-1).save()
            return go

        cases = {"trace 16 tok, no saves": (16, False), "trace 128 tok, no saves": (128, False),
                 "trace 16 tok, every layer saved": (16, True)}
        # per case and cluster: each request's total and its hops (ms)
        rows: dict[str, dict[str, list[dict[str, float]]]] = {c: {"tcp": [], "tls": []}
                                                              for c in cases}
        for case, (n, save_all) in cases.items():
            runs = {k: trace(m, n, save_all) for k, m in models.items()}
            for k, run in runs.items():
                with labs[k].backend.client.as_current():
                    run()  # warm-up: connections, caches
            for i in range(repeats):
                # alternate, and swap who goes first, so that load and order fall on both alike
                for k in ("tcp", "tls") if i % 2 else ("tls", "tcp"):
                    labs[k].backend.phases = []
                    with labs[k].backend.client.as_current():
                        t = time.perf_counter()
                        runs[k]()
                        total = (time.perf_counter() - t) * 1e3
                    recorded, labs[k].backend.phases = labs[k].backend.phases[-1], None
                    rows[case][k].append({"total": total, **hop_times(recorded)})
    finally:
        for lab in labs.values():
            with lab.backend.client.as_current():
                lab.close()
            lab.backend.client.close()
        for c in clusters.values():
            c.close()

    # On a shared machine the median carries other jobs' load; the 10th percentile is the
    # requests nothing preempted, the better estimate of what TLS itself costs, and pairs of
    # neighbouring requests cancel the load's slow drift.
    def stats(xs: list[float]) -> tuple[float, float]:
        return statistics.median(xs), statistics.quantiles(xs, n=10)[0]

    def paired(a: list[float], b: list[float]) -> float:
        return statistics.median(y - x for x, y in zip(a, b))

    print("\nTLS cost of a bare stage hop (actor round trip carrying a hidden state), "
          "median / 10th percentile (ms), and the median of paired differences")
    print(f"{'':34}{'tcp':>15}{'tls':>15}{'tls - tcp':>15}{'paired':>8}")
    for name, by in hops.items():
        (ma, pa), (mb, pb) = stats(by["tcp"]), stats(by["tls"])
        print(f"  {name:32}{ma:8.2f} /{pa:5.1f}{mb:8.2f} /{pb:5.1f}{mb - ma:8.2f} /{pb - pa:5.1f}"
              f"{paired(by['tcp'], by['tls']):8.2f}")
    print(f"\nTLS cost, {model_name}, 2 stages, {workers} workers per cluster, "
          f"{repeats} interleaved requests each: median / 10th percentile (ms); a hop is a "
          "round trip less the work at its far end")
    print(f"{'':34}{'tcp':>15}{'tls':>15}{'tls - tcp':>15}{'paired':>8}")
    for case, by in rows.items():
        print(case)
        for what in by["tcp"][0]:
            a, b = ([r[what] for r in by[k]] for k in ("tcp", "tls"))
            (ma, pa), (mb, pb) = stats(a), stats(b)
            print(f"  {what:32}{ma:8.2f} /{pa:5.1f}{mb:8.2f} /{pb:5.1f}"
                  f"{mb - ma:8.2f} /{pb - pa:5.1f}{paired(a, b):8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--stage-threads", type=int, default=None,
                        help="torch threads per stage (default: the stage's own choice)")
    parser.add_argument("--stage-counts", default="2,3", help="main: the deployments to time")
    parser.add_argument("--worker-env", default="",
                        help="main: KEY=VALUE,... on top of the workers' environment "
                             "(e.g. GOMP_SPINCOUNT=0, which sleeps at once, as a passive wait)")
    parser.add_argument("--spawn", action="store_true",
                        help="main: spawn the workers (as `dask worker` and "
                             "connect(warm_start=False) do) instead of forking them warm")
    parser.add_argument("--sections", default="main,tls",
                        help="comma-separated: main (stages vs local), tls (TLS vs plain TCP)")
    parser.add_argument("--tls-model", default=None, help="model of the tls section (default: --model)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if "main" in sections:
        stages_vs_local(args)
    if "tls" in sections:
        tls_cost(args.tls_model or args.model, 2, args.repeats)


def stages_vs_local(args: argparse.Namespace) -> None:
    """Each workload on N stages against the in-process executor, requests alternating
    between the two. The in-process executor runs in a process of its own: in this one the
    cluster's scheduler and the client's threads would compete with it for the GIL."""
    from distributed import Client

    from tpmlab.cluster import DaskBackend
    from tpmlab.cluster.embedded import start_local_cluster
    from tpmlab.lab import Lab

    local = LocalProcess(args.model)
    local_work = {name: local.workload(name) for name in local.names}
    rows: dict[str, dict[str, tuple[float, float]]] = {}  # stages -> workload -> (local, staged)
    env = dict(kv.split("=", 1) for kv in args.worker_env.split(",") if kv)
    with start_local_cluster(args.workers, dashboard_address=":0", env=env,
                             warm_start=not args.spawn) as cluster, \
            Client(cluster) as client:
        lab = Lab(DaskBackend(client=client, threads=args.stage_threads))
        memory, phases = {}, {}
        for stages in (int(n) for n in args.stage_counts.split(",")):
            lab.undeploy(args.model)
            model = lab.model(args.model, stages=stages)
            staged = workloads(model)
            rows[f"{stages} stages"] = {}
            for name in staged:
                reps = args.repeats if name.startswith("trace") else max(2, args.repeats // 3)
                got = interleaved({"local": local_work[name], "staged": staged[name]}, reps)
                rows[f"{stages} stages"][name] = (got["local"], got["staged"])
            lab.backend.phases = []
            timed(workloads_trace16(model), args.repeats)
            recorded, lab.backend.phases = lab.backend.phases, None
            phases[stages] = {k: statistics.median(p.get(k, 0.0) for p in recorded)
                              for k in recorded[0]}
            memory[stages] = lab.backend.memory(args.model)
        lab.close()
    local.close()

    names = list(local_work)
    print(f"\n{args.model}, median of {args.repeats} per trace, local and staged requests "
          f"alternating (ms: local / staged (ratio)); stage torch threads: "
          f"{args.stage_threads or 'all cores'}; worker environment: "
          f"{args.worker_env or 'the default'}{', spawned' if args.spawn else ''}")
    print(f"{'':10}" + "".join(f"{n:>30}" for n in names))
    for key, row in rows.items():
        cells = "".join(f"{row[n][0] * 1e3:>10.1f} /{row[n][1] * 1e3:>8.1f} ({row[n][1] / row[n][0]:4.2f}x)"
                        for n in names)
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
