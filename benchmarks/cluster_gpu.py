"""Pipeline stages on Dask GPU workers vs the in-process executor and vs Hugging Face
with accelerate's ``device_map``, on one multi-GPU host.

Starts one Dask worker process per GPU (``CUDA_VISIBLE_DEVICES=i``, ``--resources
GPU=1``, as dask-cuda's ``LocalCUDACluster`` or ``dask worker`` on HPC do), then:

* parity: each ``--parity`` model split into ``--stages`` stages against the local
  executor (whole model on ``cuda:0`` of this process) on the same weights: every
  layer's output and the logits, a patch, a patch that crosses stages plus a lens on
  a saved value, and a two-prompt greedy generation with a per-step patch;
* speed: ``--model`` split into ``--stages`` stages against the same model in plain
  Hugging Face, its layers split evenly over the same GPUs by ``accelerate``'s
  ``dispatch_model`` (what ``from_pretrained(device_map=...)`` does): a trace with no
  intervention, a trace saving every layer's output (saved values reach this
  process; the Hugging Face side copies each layer's output into pinned host memory
  asynchronously from a forward hook), greedy generation tokens/s, and the saved
  bytes per second at a large batch (``--big``).

Random weights drawn on each GPU: no download. Writes a JSON summary to ``--out``.

    python benchmarks/cluster_gpu.py --gpus 2 --model llama-3-8b-shape \\
        --parity tiny-llama:float32,llama-3-8b-shape:bfloat16
    python benchmarks/cluster_gpu.py --gpus 4 --model llama-2-34b-shape \\
        --parity llama-3-8b-shape:bfloat16 --big 8x512
    python benchmarks/cluster_gpu.py --device cpu --gpus 2 --model tiny-llama \\
        --parity tiny-llama:float32 --dtype float32      # dry run without GPUs
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from typing import Any

import torch

# -- the cluster ---------------------------------------------------------------------------------


def start_gpu_cluster(n: int, gpu: bool = True, cuda_ipc: bool = True) -> Any:
    """A Dask cluster of ``n`` worker processes, worker ``i`` seeing only GPU ``i`` and
    advertising ``GPU=1`` (one stage each); with fewer GPUs than workers, workers share them
    (worker ``i`` sees GPU ``i mod gpus``: two workers on one GPU stand in for two GPUs when
    measuring hops and hand-overs). ``gpu=False``: plain CPU workers (dry runs).
    ``cuda_ipc=False``: the workers' stages never hand values over through CUDA IPC
    (``TPMLAB_CUDA_IPC=0``), for a comparison."""
    import psutil
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {}
    for i in range(n):
        # the host's memory shared by the workers: Dask's "auto" limit would give a
        # one-thread worker only its share of the cores' memory (8 GB of 512 on 64 cores)
        # and restart it while large saved values pass through
        options: dict[str, Any] = {"nthreads": 1,
                                   "memory_limit": psutil.virtual_memory().total // n}
        if gpu:
            options["env"] = {"CUDA_VISIBLE_DEVICES": str(i % max(1, torch.cuda.device_count()))}
            options["resources"] = {"GPU": 1}
        if not cuda_ipc:
            options.setdefault("env", {})["TPMLAB_CUDA_IPC"] = "0"
        workers[f"gpu{i}" if gpu else f"cpu{i}"] = {"cls": Nanny, "options": options}
    scheduler = {"cls": Scheduler, "options": {"dashboard": False}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)


def free_worker_cache(client: Any) -> None:
    def _free() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    client.run(_free)


def ipc_hops(memory: list[dict[str, Any]]) -> list[str]:
    """One line per stage hop, from each stage's ``memory()``: whether the hidden states
    (forward) and the gradients (backward) crossed it through CUDA IPC
    (:mod:`tpmlab.cluster.cuda_ipc`) or the ordinary way (host copy + Dask), and how often."""
    def say(c: dict[str, Any]) -> str:
        other = c["ordinary"] + c["pool_full"] + c["refused"]
        if not c["active"] and not c["sent"]:
            return f"host copy + Dask (no IPC on this link{', refused' if c['refused'] else ''})"
        if not c["sent"] and not other:
            return "none sent"
        return (f"CUDA IPC {c['sent']}x" + (f", ordinary way {other}x (pool full "
                                             f"{c['pool_full']}, refused {c['refused']})"
                                             if other else ""))

    lines = []
    for k in range(len(memory) - 1):
        fwd, bwd = memory[k]["ipc"]["next"], memory[k + 1]["ipc"]["prev"]
        link = "stage link" if memory[k].get("linked") else "Dask"
        lines.append(f"  hop stage {k} -> {k + 1} ({link}), hidden states: {say(fwd)}; "
                     f"gradients back: {say(bwd)}")
    return lines


# -- timing --------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)


def timed(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


# -- parity --------------------------------------------------------------------------------------


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a-b|, max |a-b| / max |b|); lists (one value per generation step) elementwise."""
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return float("inf"), float("inf")
        return max((diff(x, y) for x, y in zip(a, b)), key=lambda r: r[1])
    if a.shape != b.shape:
        return float("inf"), float("inf")
    d = (a.float() - b.float()).abs().max().item()
    return d, d / max(b.float().abs().max().item(), 1e-30)


def parity(dask_lab: Any, name: str, dtype: str, stages: int, device: str) -> dict[str, Any]:
    import tpmlab

    ref_lab = tpmlab.connect("local", device=device, dtype=getattr(torch, dtype))
    pair = [dask_lab.model(name, stages=stages, dtype=dtype), ref_lab.model(name)]
    m0 = pair[0]
    n = m0.adapter.n_layers
    assert m0.info.n_stages == stages, m0.info.n_stages
    bounds = m0.info.extra["stage_layers"]
    early, late = bounds[0][0] + 1, bounds[-1][0] + 1  # a layer on the first and on the last stage
    ids = torch.randint(3, min(m0.tokenizer.vocab_size, 32000), (1, 24),
                        generator=torch.Generator().manual_seed(0))

    def every_layer(m):
        with m.trace(input_ids=ids[0]):
            saved = [m.layers[i].output.save() for i in range(n)]
            saved.append(m.output.logits.save())
        return saved

    def patch(m):
        with m.trace(input_ids=ids[0]):
            m.layers[n // 2].output[:, -2] = 0.0
            m.layers[late].output[:, -1] *= 1.5
            return [m.layers[n - 1].output.save(), m.output.logits.save()]

    def cross_stage(m):
        with m.trace(input_ids=ids[0]):
            m.layers[late].output[:, -1] = m.layers[early].output[:, -1]
            lens = m.unembed(m.final_norm(m.layers[early].output[:, -3:])).save()
            return [lens, m.output.logits.save()]

    def generation(m):
        with m.generate(["The Eiffel Tower is located in the city of", "Hello"],
                        max_new_tokens=6) as gen:
            with gen.all():
                m.layers[n // 2].output[:, -1] *= 1.5
                h = m.layers[late].output.save()
        return gen, h

    checks: dict[str, Any] = {}
    for label, body in (("every layer + logits", every_layer), ("patch", patch),
                        ("cross-stage patch + lens", cross_stage)):
        got, want = ([p.value for p in body(m)] for m in pair)
        worst = max((diff(a, b) for a, b in zip(got, want)), key=lambda x: x[1])
        checks[label] = {"max_abs": worst[0], "max_rel": worst[1], "n": len(got)}
    (g, h), (rg, rh) = (generation(m) for m in pair)
    same_ids = [t.tolist() for t in g.output_ids] == [t.tolist() for t in rg.output_ids]
    d = diff(h.value, rh.value)
    checks["generate 2 prompts x 6 tok, per-step patch"] = {
        "max_abs": d[0], "max_rel": d[1], "same_tokens": same_ids,
        "tokens": [t.tolist()[-6:] for t in g.output_ids]}
    tol = 1e-4 if dtype == "float32" else 2e-2
    ok = all(c["max_rel"] <= tol and c.get("same_tokens", True) for c in checks.values())
    dask_lab.undeploy(name)
    ref_lab.close()
    del pair, m0
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"model": name, "dtype": dtype, "stages": stages, "stage_layers": bounds,
            "tolerance_rel": tol, "pass": ok, "checks": checks}


# -- Hugging Face + accelerate device_map ----------------------------------------------------------


def hf_split_model(source: Any, devices: list[str], dtype: torch.dtype) -> Any:
    """``source``'s architecture in plain Hugging Face, random weights drawn on each device,
    the layers split evenly over ``devices`` and dispatched by accelerate."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    config = source.config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    n = config.num_hidden_layers
    k = len(devices)
    device_map = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    for i in range(n):
        device_map[f"model.layers.{i}"] = devices[i * k // n]
    device_map["model.norm"] = devices[-1]
    device_map["lm_head"] = devices[-1]
    gen = {}
    for path, dev in device_map.items():
        if path == "model.rotary_emb":
            continue
        mod = model.get_submodule(path)
        mod.to_empty(device=dev)
        g = gen.setdefault(dev, torch.Generator(device=dev).manual_seed(0))
        with torch.no_grad():
            for pname, p in mod.named_parameters():
                if "norm" in pname or "norm" in path:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
    with torch.device(devices[0]):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()
    return dispatch_model(model, device_map=device_map), device_map


def hf_workloads(model: Any, ids: torch.Tensor, big: torch.Tensor | None, new: int,
                 repeats: int) -> dict[str, Any]:
    dev0 = model.model.embed_tokens.weight.device
    layers = model.model.layers

    def forward(x):
        with torch.inference_mode():
            model(input_ids=x.to(dev0), use_cache=False)

    def forward_saving(x):
        saved: list[torch.Tensor] = []

        def hook(_m, _a, out):
            t = out[0] if isinstance(out, tuple) else out
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            host.copy_(t, non_blocking=True)
            saved.append(host)

        handles = [layer.register_forward_hook(hook) for layer in layers]
        try:
            with torch.inference_mode():
                model(input_ids=x.to(dev0), use_cache=False)
            sync()
        finally:
            for h in handles:
                h.remove()
        return sum(t.numel() * t.element_size() for t in saved)

    out: dict[str, Any] = {}
    out["trace"] = timed(lambda: forward(ids), repeats)
    out["trace save all"] = timed(lambda: forward_saving(ids), repeats)
    counts = []

    def generate():
        with torch.inference_mode():
            r = model.generate(input_ids=ids.to(dev0), attention_mask=torch.ones_like(ids).to(dev0),
                               max_new_tokens=new, do_sample=False, pad_token_id=2)
        counts.append(r.shape[1] - ids.shape[1])

    out["generate"] = timed(generate, max(2, repeats // 3), warmup=1)
    out["generated tokens"] = counts[-1]
    if big is not None:
        out["big trace save all"] = timed(lambda: forward_saving(big), max(3, repeats // 2), warmup=1)
        out["big saved bytes"] = forward_saving(big)
    return out


# -- tpmlab --------------------------------------------------------------------------------------


def median_phases(backend: Any, run: Any, repeats: int,
                  runs: list[dict[str, float]] | None = None) -> dict[str, float]:
    """Each phase's median (ms) over ``repeats`` runs, from ``DaskBackend.phases``: where a
    request's fixed cost goes (the hops are what is left of ``client wait run`` and of
    ``stage0 wait`` beyond the far end's own work). ``runs``: each run's phases go there."""
    backend.phases = []
    try:
        for _ in range(repeats):
            run()
        recorded = backend.phases
    finally:
        backend.phases = None
    if runs is not None:
        runs.extend(recorded)
    keys = sorted({k for p in recorded for k in p})
    return {k: round(statistics.median(p.get(k, 0.0) for p in recorded), 3) for k in keys}


def print_profile(fn: Any, times: int, order: str, backend: Any = None) -> None:
    """Where the client's time goes in ``times`` calls of ``fn`` (cProfile, ``order``); with
    ``backend``, each call's wall time against its ``run_values``."""
    import cProfile
    import io
    import pstats

    inner: list[float] = []
    if backend is not None:
        run_values = backend.run_values

        def timed_run_values(*args, **kwargs):
            t = time.perf_counter()
            try:
                return run_values(*args, **kwargs)
            finally:
                inner.append(time.perf_counter() - t)

        backend.run_values = timed_run_values
    prof = cProfile.Profile()
    walls = []
    try:
        for _ in range(times):
            t = time.perf_counter()
            prof.enable()
            fn()
            sync()
            prof.disable()
            walls.append(time.perf_counter() - t)
    finally:
        if backend is not None:
            del backend.run_values
    if inner:
        print("  each call / its run_values (ms): " + ", ".join(
            f"{w * 1e3:.0f}/{r * 1e3:.0f}" for w, r in zip(walls, inner)), flush=True)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(order).print_stats("tpmlab|torch|numpy|cluster_gpu", 25)
    print(buf.getvalue()[-5000:], flush=True)


def tpmlab_workloads(model: Any, ids: torch.Tensor, big: torch.Tensor | None, new: int,
                     repeats: int, profile: bool = False, backend: Any = None) -> dict[str, Any]:
    n = model.adapter.n_layers

    def trace(x):
        with model.trace(input_ids=x):
            model.output.logits[:, -1].argmax(-1).save()

    server: list[float] = []

    def trace_saving(x):
        with model.trace(input_ids=x) as tr:
            saved = [model.layers[i].output.save() for i in range(n)]
        server.append(tr.result.meta.get("compute_seconds", float("nan")))
        return sum(p.value.numel() * p.value.element_size() for p in saved)

    out: dict[str, Any] = {}
    row = ids[0]
    out["trace"] = timed(lambda: trace(row), repeats)
    out["trace save all"] = timed(lambda: trace_saving(row), repeats)
    if backend is not None and hasattr(backend, "phases"):
        for name, run in (("trace", trace), ("trace save all", trace_saving)):
            phases = median_phases(backend, lambda run=run: run(row), repeats)
            out[f"phases: {name}"] = phases
            print(f"phases of a {name} (median ms): {phases}", flush=True)
    out["trace save all, in stage 0's run"] = statistics.median(server[-repeats:])
    if profile:  # where the client's time goes in one such trace
        print_profile(lambda: trace_saving(row), 1, "cumulative")
    counts = []

    def generate():
        with model.generate(input_ids=row, max_new_tokens=new) as gen:
            pass
        counts.append(len(gen.generated_ids[0]))

    out["generate"] = timed(generate, max(2, repeats // 3), warmup=1)
    out["generated tokens"] = counts[-1]
    if backend is not None and hasattr(backend, "phases"):
        # each decode step's phases (medians over a request's steps, then over requests)
        phases = median_phases(backend, generate, max(2, repeats // 3))
        out["phases: generate step"] = {k: v for k, v in phases.items() if k.startswith("step ")}
        print(f"phases of a generation's decode step (median ms): "
              f"{out['phases: generate step']}", flush=True)
    if big is not None:
        out["big trace save all"] = timed(lambda: trace_saving(big), max(3, repeats // 2), warmup=1)
        out["big saved bytes"] = trace_saving(big)
        if backend is not None and hasattr(backend, "phases"):
            runs: list[dict[str, float]] = []
            phases = median_phases(backend, lambda: trace_saving(big), max(3, repeats // 4), runs)
            out["phases: big trace save all"] = phases
            print(f"phases of a {'x'.join(map(str, big.shape))} trace save all (median ms): "
                  f"{phases}", flush=True)
            # each request's own (a median of each phase can hide requests that alternate)
            print("  each: client wait run + collect / stage0 pack / stage1 saves (ms): "
                  + ", ".join(f"{r.get('client wait run', 0) + r.get('client collect', 0):.0f}"
                              f"/{r.get('stage0 pack', 0):.0f}/{r.get('stage1 saves', 0):.0f}"
                              for r in runs), flush=True)
        if profile:  # the client's own time in three such traces
            print_profile(lambda: trace_saving(big), 3, "tottime", backend)
    return out


def table(hf: dict[str, Any], tp: dict[str, Any], label: str, ids_shape: tuple, new: int,
          big_shape: tuple | None) -> list[str]:
    lines = [f"\n{label}: median ms (tpmlab / HF); targets: trace <= 1.1x, generation >= 0.9x "
             "HF tokens/s",
             f"{'workload':44}{'HF device_map':>16}{'tpmlab':>12}{'ratio':>9}"]
    b, t = ids_shape

    def row(name, key):
        lines.append(f"{name:44}{hf[key] * 1e3:>13.1f} ms{tp[key] * 1e3:>9.1f} ms"
                     f"{tp[key] / hf[key]:>8.2f}x")

    row(f"trace {b}x{t}, no intervention", "trace")
    row(f"trace {b}x{t}, save every layer's output", "trace save all")
    hf_tps = hf["generated tokens"] / hf["generate"]
    tp_tps = tp["generated tokens"] / tp["generate"]
    lines.append(f"{f'generate {b}x{t} + {new} greedy (tokens/s)':44}{hf_tps:>16.1f}{tp_tps:>12.1f}"
                 f"{tp_tps / hf_tps:>8.2f}x  ({hf['generated tokens']} / "
                 f"{tp['generated tokens']} tokens, {hf['generate'] * 1e3:.0f} / "
                 f"{tp['generate'] * 1e3:.0f} ms)")
    if big_shape is not None:
        row(f"trace {big_shape[0]}x{big_shape[1]}, save every layer's output", "big trace save all")
        hg = hf["big saved bytes"] / hf["big trace save all"] / 1e9
        tg = tp["big saved bytes"] / tp["big trace save all"] / 1e9
        lines.append(f"{'  saved bytes reaching the client (GB/s)':44}{hg:>16.2f}{tg:>12.2f}"
                     f"{tg / hg:>8.2f}x  ({tp['big saved bytes'] / 1e9:.2f} GB a trace)")
    return lines


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="worker processes (one per GPU)")
    parser.add_argument("--stages", type=int, default=None, help="default: --gpus")
    parser.add_argument("--model", default="llama-3-8b-shape")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--parity", default="", help="name:dtype,... (empty: skip)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--big", default="", help="BxT for the saved-bytes throughput, e.g. 8x512")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="print where the client's time goes in one trace saving every layer")
    parser.add_argument("--no-cuda-ipc", action="store_true",
                        help="stages hand hidden states over through host memory and Dask only "
                             "(TPMLAB_CUDA_IPC=0 in the workers), for a paired comparison")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    stages = args.stages or args.gpus
    gpu = args.device == "cuda"
    if gpu and torch.cuda.device_count() < args.gpus:
        print(f"--gpus {args.gpus}: {torch.cuda.device_count()} GPU(s) here, shared by the "
              "workers", flush=True)

    from distributed import Client

    from tpmlab.cluster import DaskBackend
    from tpmlab.lab import Lab
    from tpmlab.models import resolve

    report: dict[str, Any] = {"args": vars(args)}
    if gpu:
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(min(args.gpus, torch.cuda.device_count()))]
    print(json.dumps({"gpus": report.get("gpus"), "torch": torch.__version__}), flush=True)
    t0 = time.perf_counter()
    cluster = start_gpu_cluster(args.gpus, gpu, cuda_ipc=not args.no_cuda_ipc)
    client = Client(cluster)
    lab = Lab(DaskBackend(client=client, timeout=600))
    import os

    seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    print(f"cluster of {args.gpus} workers up in {time.perf_counter() - t0:.1f}s; "
          f"CUDA_VISIBLE_DEVICES per worker: {sorted(seen.values(), key=str)}", flush=True)
    dev0 = "cuda:0" if gpu else "cpu"
    try:
        report["parity"] = []
        for item in filter(None, args.parity.split(",")):
            name, _, dtype = item.partition(":")
            t = time.perf_counter()
            r = parity(lab, name, dtype or args.dtype, stages, dev0)
            r["seconds"] = time.perf_counter() - t
            report["parity"].append(r)
            print(f"\nparity {name} {r['dtype']}, {stages} stages {r['stage_layers']} vs local "
                  f"executor on {dev0}: {'PASS' if r['pass'] else 'FAIL'} "
                  f"(rel tol {r['tolerance_rel']:g}, {r['seconds']:.0f}s)", flush=True)
            for label, c in r["checks"].items():
                extra = f" same tokens: {c['same_tokens']}" if "same_tokens" in c else ""
                print(f"  {label:44} max abs {c['max_abs']:.3g}  max rel {c['max_rel']:.3g}{extra}",
                      flush=True)
            free_worker_cache(client)
        if args.skip_bench:
            return
        source = resolve(args.model)
        dtype = getattr(torch, args.dtype)
        vocab = min(source.config.vocab_size, 32000)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, vocab, (1, args.tokens), generator=g)
        big = None
        if args.big:
            b, t = (int(x) for x in args.big.split("x"))
            big = torch.randint(3, vocab, (b, t), generator=g)
        n_gpus = max(1, torch.cuda.device_count()) if gpu else 1
        devices = [f"cuda:{i % n_gpus}" for i in range(stages)] if gpu else ["cpu"] * stages
        t = time.perf_counter()
        hf_model, _ = hf_split_model(source, devices, dtype)
        sync()
        report["hf_load_s"] = time.perf_counter() - t
        print(f"\nHF {args.model} loaded over {devices} in {report['hf_load_s']:.1f}s", flush=True)
        hf = hf_workloads(hf_model, ids, big, args.new, args.repeats)
        print("HF:", {k: round(v, 5) for k, v in hf.items()}, flush=True)
        del hf_model
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        t = time.perf_counter()
        model = lab.model(args.model, stages=stages, dtype=args.dtype)
        report["tpmlab_deploy_s"] = time.perf_counter() - t
        print(f"tpmlab {args.model} deployed as {stages} stages "
              f"{model.info.extra['stage_layers']} on {model.info.extra['stage_devices']} in "
              f"{report['tpmlab_deploy_s']:.1f}s", flush=True)
        tp = tpmlab_workloads(model, ids, big, args.new, args.repeats, args.profile, lab.backend)
        print("tpmlab:", {k: round(v, 5) for k, v in tp.items() if not isinstance(v, dict)},
              flush=True)
        server_ms = tp["trace save all, in stage 0's run"] * 1e3
        mem = lab.backend.memory(args.model)
        hops = ipc_hops(mem)
        print("hand-over segments registered with CUDA, per stage: "
              f"{[m.get('handover') for m in mem]}", flush=True)
        print("hand-over pools (segments made, given back, dropped, lent now), per stage: "
              f"{[m.get('recycling') for m in mem]}", flush=True)
        print("stage hops (CUDA IPC " + ("off" if args.no_cuda_ipc else "on") + "):\n"
              + "\n".join(hops), flush=True)
        # random-init sources count their parameters; others: count the meta tree's
        n_params = getattr(source, "n_params", None) or sum(
            p.numel() for p in source.meta_model().parameters())
        report.update(hf=hf, tpmlab=tp, memory=mem, params=n_params, ipc_hops=hops)
        lines = table(hf, tp, f"{args.model} ({n_params / 1e9:.1f}B params, {args.dtype}), "
                      f"{stages} stages on {args.gpus} {'GPUs' if gpu else 'CPU workers'}",
                      tuple(ids.shape), args.new, tuple(big.shape) if big is not None else None)
        lines.append(f"  (of the 1x{args.tokens} save-all trace, {server_ms:.1f} ms were spent inside "
                     "stage 0's run of the plan)")
        lines.append("per-stage: weights GB / CUDA peak GB: " + ", ".join(
            f"[{m['stage_bytes'] / 1e9:.1f} / {m.get('cuda_peak', 0) / 1e9:.1f}]" for m in mem))
        lines += hops
        report["table"] = lines
        print("\n".join(lines), flush=True)
    finally:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)
        lab.close()
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
