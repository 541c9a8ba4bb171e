"""Forward + backward with the gradient of every layer's output saved, tpmlab against plain
PyTorch autograd on the same weights and device: in process, and on 2 Dask stages.

The workload: a trace of ``--batch`` x ``--tokens`` token ids, the loss a logit difference
at the last position, ``loss.backward()``, and ``layers[i].output.grad.save()`` for every
layer. Plain PyTorch does the same with forward hooks that ``retain_grad()`` each layer's
output (the embedding's output a leaf; tpmlab's graph starts at the first layer's output,
the first point whose gradient is read, so plain PyTorch also back-propagates through the
first layer), then copies each gradient to host memory (pinned and asynchronous on a GPU),
as tpmlab's saves do. Targets: at most 1.2x in process, at most 1.5x on 2 stages. On a GPU
the 2 stages are two worker processes sharing one GPU (standing in for two GPUs); the
reference is plain PyTorch on that GPU. Reports each stage's memory peak and what autograd
kept there, and where the time goes: in process the forward, the backward, the plan nodes
(of them the copies to host), the wait for the device, the engine's other time and the
client's (:func:`breakdown`); on stages, per stage its forward, saves, wait on the next
stage, backward and the one-way hops, and the client's send and collect.
``--profile DIR`` writes torch.profiler chrome traces of a few in-process requests and of
plain PyTorch, with a table of ops by their own time (CUDA time on a GPU).

Random weights drawn on the device: no download, only torch + transformers.

    python benchmarks/gradients.py --device cpu --model tiny-llama
    python benchmarks/gradients.py --device cpu --model smollm2-135m --tokens 32
    python benchmarks/gradients.py --device cuda --model llama-3-8b-shape --dtype bfloat16
    python benchmarks/gradients.py --device cuda --model llama-3-8b-shape --dtype bfloat16 \
        --skip-stages --profile /tmp/gradients-profile
    python benchmarks/gradients.py --model stand-in --threads 1 --skip-stages --repeats 30

``--model stand-in``: the CPU stand-in for a GPU's launch-bound regime (llama-3-8b-shape at
1x128 tokens spends ~18 ms of a 72 ms request on the device, the rest launching kernels): a
random-init Llama of llama-3-8b-shape's 32 layers at a tiny width (hidden 64, vocabulary
512), written once as a Hugging Face folder (:func:`stand_in_folder`), where every op's
compute is next to nothing and what shows is the Python around it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

import torch

GOOD, BAD = 7, 11  # the logit difference's tokens


#: the stand-in's config: llama-3-8b-shape's depth, a width at which kernels cost nothing
STAND_IN = dict(hidden_size=64, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=512, max_position_embeddings=2048,
                tie_word_embeddings=False)


def stand_in_folder(folder: str = "") -> str:
    """A Hugging Face folder of the stand-in (:data:`STAND_IN`, seeded random weights), made
    once under the temporary directory; its path."""
    import os
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = folder or os.path.join(tempfile.gettempdir(), "tpmlab-gradients-stand-in")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**STAND_IN)).save_pretrained(folder)
    return folder


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def plain_torch(hf: Any, adapter: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Forward + backward in plain PyTorch, every layer output's gradient copied to host."""
    device = next(hf.parameters()).device
    layers = list(hf.get_submodule(adapter.layers))
    outs: list[torch.Tensor] = []

    def leaf(module, args, out):
        return out.detach().requires_grad_()

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    handles = [hf.get_input_embeddings().register_forward_hook(leaf)]
    handles += [layer.register_forward_hook(keep) for layer in layers]
    try:
        logits = hf(input_ids=ids.to(device), use_cache=False).logits
        (logits[:, -1, GOOD] - logits[:, -1, BAD]).sum().backward()
    finally:
        for h in handles:
            h.remove()
    pinned = device.type == "cuda"
    grads = []
    for o in outs:
        host = torch.empty(o.grad.shape, dtype=o.grad.dtype, pin_memory=pinned)
        host.copy_(o.grad, non_blocking=pinned)
        grads.append(host)
    sync()
    return grads


def tpmlab_run(model: Any, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
    n = model.adapter.n_layers
    with model.trace(input_ids=ids) as tr:
        layers = [model.layers[i].output for i in range(n)]
        logits = model.output.logits
        (logits[:, -1, GOOD] - logits[:, -1, BAD]).sum().backward()
        saved = [h.grad.save() for h in layers]
    return [p.value for p in saved], tr.result.meta


def breakdown(model: Any, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Where an in-process request's time goes (medians, ms), from the result's metadata:
    ``forward`` (the model's forward with the plan's hooks and autograd's saved-tensor
    hooks), ``backward`` (autograd's own time, its plan nodes apart), ``plan nodes`` (every
    plan node: the gradient reads and their saves, the loss), of them ``copies to host``
    (launching the saves' copies into pinned memory), ``device wait`` (the wait for the
    device's queued work once the backward is launched: on a GPU, what the CPU-side phases
    did not cover), ``engine other`` (the rest of ``compute_seconds``: the batch, the
    runner, releasing the graph, the metadata) and ``client`` (recording, encoding the plan,
    decoding and validating it, outside the engine). On a GPU every phase but ``device
    wait`` is the CPU's time to launch the work."""
    rows = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, meta = tpmlab_run(model, ids)
        total = time.perf_counter() - start
        phases = meta.get("phase_seconds", {})
        row = {"forward": phases.get("forward", 0.0), "backward": meta["backward_seconds"],
               "plan nodes": sum(meta["node_seconds"].values()),
               "copies to host": phases.get("copies to host", 0.0),
               "device wait": phases.get("device wait", 0.0)}
        row["engine other"] = meta["compute_seconds"] - (row["forward"] + row["backward"]
                                                         + row["plan nodes"] + row["device wait"])
        row["client"] = total - meta["compute_seconds"]
        row["total"] = total
        rows.append(row)
    return {k: round(statistics.median(r[k] for r in rows) * 1e3, 2) for k in rows[0]}


def profile(hf: Any, model: Any, ids: torch.Tensor, folder: str, steps: int = 3) -> list[str]:
    """Chrome traces (``chrome://tracing`` or https://ui.perfetto.dev) of ``steps`` in-process
    requests and of as many plain PyTorch runs, with the CUDA kernels on a GPU, in
    ``folder``; each with a table of the ops by their own time. Returns the files written."""
    import os

    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    from torch.autograd.profiler_util import FunctionEventAvg

    device_key = ("self_device_time_total" if hasattr(FunctionEventAvg(), "self_device_time_total")
                  else "self_cuda_time_total")  # the older name, before torch 2.4
    sort = device_key if torch.cuda.is_available() else "self_cpu_time_total"
    written = []
    for name, fn in (("tpmlab", lambda: tpmlab_run(model, ids)),
                     ("plain", lambda: plain_torch(hf, model.adapter, ids))):
        fn()
        sync()
        with torch_profile(activities=activities, record_shapes=False, with_stack=False) as prof:
            for i in range(steps):
                with record_function(f"{name} request {i}"):
                    fn()
                sync()
        trace = os.path.join(folder, f"gradients_{name}.json")
        prof.export_chrome_trace(trace)
        table = os.path.join(folder, f"gradients_{name}_ops.txt")
        with open(table, "w") as f:
            try:
                f.write(prof.key_averages().table(sort_by=sort, row_limit=60))
            except Exception as e:  # noqa: BLE001 - the trace above is what matters
                f.write(f"no table ({type(e).__name__}: {e})\n")
        written += [trace, table]
    return written


def stage_phases(backend: Any, model: Any, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Each phase's median (ms) on the stages (``DaskBackend.phases``: per stage its state,
    forward, saves, wait on the next stage, backward, the one-way hops to the next stage and
    back; the client's send and collect)."""
    backend.phases = []
    try:
        for _ in range(repeats):
            tpmlab_run(model, ids)
        recorded = backend.phases
    finally:
        backend.phases = None
    keys = {k for r in recorded for k in r}
    return {k: round(statistics.median(r.get(k, 0.0) for r in recorded), 2) for k in sorted(keys)}


def print_stage_phases(phases: dict[str, float], stages: int) -> None:
    """One line per stage (its forward, backward, hops...), then the client's and stage 0's
    own phases."""
    order = ["state", "forward", "forward out", "saves", "thread", "hop out", "wait",
             "hop back", "backward", "backward in", "backward run", "backward out",
             "backward finish"]
    for k in range(stages):
        own = {name.split(" ", 1)[1]: v for name, v in phases.items()
               if name.startswith(f"stage{k} ")}
        names = [n for n in order if n in own] + sorted(set(own) - set(order))
        print(f"    stage {k}: " + ", ".join(f"{n} {own[n]:.2f}" for n in names))
    rest = {n: v for n, v in phases.items() if not n.startswith("stage")}
    print("    client and stage 0's request: " + ", ".join(f"{n} {v:.2f}" for n, v in rest.items()))


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest relative difference over all layers' gradients."""
    return max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
               for x, y in zip(a, b))


def start_cluster(n: int, device: str) -> Any:
    """``n`` worker processes with the environment tpmlab's own clusters give them (how an
    idle stage's OpenMP threads wait, so that they do not take the cores the busy stage
    computes on); on a GPU all see GPU 0 (two workers share one GPU)."""
    import psutil
    from distributed import Nanny, Scheduler, SpecCluster

    from tpmlab.cluster.warm_start import WORKER_ENV

    workers = {}
    for i in range(n):
        options: dict[str, Any] = {"nthreads": 1, "env": dict(WORKER_ENV),
                                   "memory_limit": psutil.virtual_memory().total // n}
        if device == "cuda":
            options["env"]["CUDA_VISIBLE_DEVICES"] = "0"
            options["resources"] = {"GPU": 1}
        workers[f"w{i}"] = {"cls": Nanny, "options": options}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler,
                                                  "options": {"dashboard": False}},
                       silence_logs=logging.ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="tiny-llama",
                        help="a model name or folder; 'stand-in': see the module docstring")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in this process (default: torch's own)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument("--stage-threads", type=int, default=None,
                        help="torch threads per stage (default: the stage's own, all cores)")
    parser.add_argument("--out", default="")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="write torch.profiler chrome traces of a few in-process requests "
                             "(and of plain PyTorch) into DIR")
    args = parser.parse_args()
    import tpmlab

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "stand-in":
        args.model = stand_in_folder()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    local = tpmlab.connect("local", device=args.device, dtype=dtype)
    model = local.model(args.model)
    hf = local.backend.host(args.model).model
    vocab = model.config.vocab_size
    ids = torch.randint(3, min(vocab, 32000), (args.batch, args.tokens),
                        generator=torch.Generator().manual_seed(0))
    report: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "device": args.device,
                              "batch": args.batch, "tokens": args.tokens,
                              "layers": model.adapter.n_layers}
    plain = timed(lambda: plain_torch(hf, model.adapter, ids), args.repeats)
    ours = timed(lambda: tpmlab_run(model, ids), args.repeats)
    grads, meta = tpmlab_run(model, ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        plain_torch(hf, model.adapter, ids)
        report["plain peak bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        tpmlab_run(model, ids)
        report["in process peak bytes"] = torch.cuda.max_memory_allocated()
    report["in process breakdown ms"] = breakdown(model, ids, args.repeats)
    report.update({"plain ms": plain * 1e3, "in process ms": ours * 1e3,
                   "in process ratio": ours / plain,
                   "in process autograd bytes": meta["autograd_bytes"],
                   "in process max rel diff": compare(grads, plain_torch(hf, model.adapter, ids))})
    print(f"{args.model} {args.dtype} on {args.device}, {args.batch}x{args.tokens} tokens, "
          f"{model.adapter.n_layers} layers: forward + backward, every layer's gradient saved")
    print(f"  plain PyTorch autograd      {plain * 1e3:9.1f} ms")
    print(f"  tpmlab in process           {ours * 1e3:9.1f} ms  {ours / plain:5.2f}x  (target <= 1.2x)")
    print("    where it goes (median ms): " + ", ".join(
        f"{k} {v:.2f}" for k, v in report["in process breakdown ms"].items()))
    # after its first request of a shape, a request runs the model without autograd's
    # saved-tensor hooks, counting the figure measured then (tpmlab/runtime/footprints.py)
    shapes = len(local.backend.host(args.model).footprints)
    report["in process shapes measured"] = shapes
    print(f"    saved-tensor hooks: {'skipped after the first request' if shapes else 'on'}"
          f" ({shapes} shape(s) measured), autograd kept {meta['autograd_bytes'][0] / 2**20:.1f} MiB")
    if device.type == "cuda":
        print(f"  CUDA peak: plain {report['plain peak bytes'] / 2**20:.0f} MiB, in process "
              f"{report['in process peak bytes'] / 2**20:.0f} MiB")
    if args.profile:
        for path in profile(hf, model, ids, args.profile):
            print(f"  profile: {path}")
    if not args.skip_stages:
        from distributed import Client

        from tpmlab.cluster import DaskBackend
        from tpmlab.lab import Lab

        cluster = start_cluster(args.stages, args.device)
        client = Client(cluster)
        lab = Lab(DaskBackend(client=client, timeout=600, threads=args.stage_threads))
        try:
            staged = lab.model(args.model, stages=args.stages, dtype=args.dtype)
            t = timed(lambda: tpmlab_run(staged, ids), args.repeats)
            sgrads, smeta = tpmlab_run(staged, ids)
            memory = lab.backend.memory(args.model)
            peak_key = "cuda_peak" if args.device == "cuda" else "peak_rss"
            report[f"{args.stages} stages phases ms"] = stage_phases(lab.backend, staged, ids,
                                                                    args.repeats)
            report.update({f"{args.stages} stages ms": t * 1e3,
                           f"{args.stages} stages ratio": t / plain,
                           "stage peak bytes": [m.get(peak_key) for m in memory],
                           "stage autograd bytes": smeta["autograd_bytes"],
                           f"{args.stages} stages max rel diff vs in process": compare(sgrads, grads)})
            print(f"  tpmlab {args.stages} stages            {t * 1e3:9.1f} ms  {t / plain:5.2f}x"
                  f"  (target <= 1.5x)")
            print("    phases (median ms):")
            print_stage_phases(report[f"{args.stages} stages phases ms"], args.stages)
            print(f"  per stage: peak {[f'{(m or 0) / 2**20:.0f} MiB' for m in report['stage peak bytes']]}"
                  f" ({peak_key}), autograd kept "
                  f"{[f'{b / 2**20:.1f} MiB' for b in smeta['autograd_bytes']]}")
        finally:
            lab.close()
            client.close()
            cluster.close()
    print(f"  gradients equal plain PyTorch: max relative difference "
          f"{report['in process max rel diff']:.2e}")
    local.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
