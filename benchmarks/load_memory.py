"""What deploying a model costs each stage: weights, CUDA peak, host peak, bytes read,
seconds; against Hugging Face's ``from_pretrained`` and tpmlab's in-process load.

Sources (``--sources``):

* ``random``: the random-init ``--shape`` (drawn on each stage's device, no file);
* ``folder``: the same shape written once with random weights as a sharded safetensors
  folder (``--folder``, default under the system's temporary folder; reused when it
  exists), then deployed from it, as a real checkpoint would be.

Each source is deployed as ``--stages`` stages on a Dask cluster of ``--stages`` worker
processes started here (on ``--device cuda`` they share the GPUs there are, worker ``i``
seeing GPU ``i mod n``, as when two stages share one H200). Per stage it prints what the
stage's worker measured around the load (``backend.memory``): weights, CUDA peak, host
peak (peak resident set during the load, and its growth over the worker before it),
bytes read (``rchar``: page cache or disk) and seconds. Reference rows, each in a fresh
process: the whole model loaded in process by tpmlab (``source.load``), and for the
folder Hugging Face's ``from_pretrained`` (``device_map`` onto the device).

``--largest`` instead deploys the random-init shapes from small to large as ``--stages``
stages and reports the largest that deploys, with its per-stage peaks.

Needs torch, transformers and tpmlab's dependencies; no network.

    python benchmarks/load_memory.py --device cpu --shape tiny-llama --stages 2
    python benchmarks/load_memory.py --device cuda --shape llama-3-8b --stages 2
    python benchmarks/load_memory.py --device cuda --largest --stages 2
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

GB = 1e9
SHARD_BYTES = 4 * 2**30  # Hugging Face's usual shard size is 5 GB; any size shows the same
SHAPES_BY_SIZE = {"cpu": ["tiny-gpt2", "tiny-llama"],
                  "cuda": ["tiny-llama", "llama-3-8b-shape", "llama-2-34b-shape"]}


def shape_name(shape: str) -> str:
    """A model name tpmlab resolves: ``llama-3-8b`` means ``llama-3-8b-shape``."""
    from tpmlab.models import available_models

    known = available_models()
    if shape in known or Path(shape).exists():
        return shape
    if shape + "-shape" in known:
        return shape + "-shape"
    raise SystemExit(f"unknown --shape {shape!r}; known: {', '.join(known)}")


# -- the folder ----------------------------------------------------------------------------------


def write_folder(shape: str, folder: Path, dtype: torch.dtype, device: str) -> Path:
    """``shape``'s random weights as sharded safetensors + index + config, written shard by
    shard (the host holds one shard). Kept for later runs."""
    import json as _json

    from safetensors.torch import save_file

    from tpmlab.models import resolve
    from tpmlab.models.materialize import persistent_names, tie_groups

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    source = resolve(shape)
    meta = source.meta_model(dtype)
    canonical = tie_groups(meta)
    names = sorted({canonical[n] for n in persistent_names(meta)})
    state = meta.state_dict(keep_vars=True)
    sizes = {n: state[n].numel() * state[n].element_size() for n in names}
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        if shards[-1] and size + sizes[n] > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += sizes[n]
    weight_map = {}
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        wanted = set(shard)
        model = source.load(dtype=dtype, device=device, keys=wanted.__contains__).model
        state = {n: t.detach().to("cpu").contiguous() for n, t in model.state_dict().items()
                 if n in wanted}
        del model
        save_file(state, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, file))
        del state
        gc.collect()
    total = sum(sizes.values())
    (folder / "model.safetensors.index.json").write_text(
        _json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = source.config
    config.dtype = dtype
    config.save_pretrained(str(folder))
    print(f"wrote {folder}: {len(shards)} shards, {total / GB:.1f} GB in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return folder


# -- reference loads, each in a fresh process ---------------------------------------------------


def child(kind: str, model: str, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Load ``model`` whole in this process and measure it (``kind``: tpmlab or hf)."""
    from tpmlab.runtime.load_meter import LoadMeter

    if kind == "tpmlab":
        from tpmlab.models import resolve

        source = resolve(model)
        source.tokenizer()
        source.version  # noqa: B018 - the digest is not part of the load
        with LoadMeter(device) as meter:
            loaded = source.load(dtype=dtype, device=device)
        net = loaded.model
    else:
        from transformers import AutoModelForCausalLM

        with LoadMeter(device) as meter:
            try:
                net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device_map=device)
            except (ImportError, ValueError):  # no accelerate: load on the host, then move
                net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
    weights = sum(t.numel() * t.element_size()
                  for t in {id(t): t for t in [*net.parameters(), *net.buffers()]}.values())
    return {"stage_bytes": weights, **meter.figures}


def run_child(kind: str, model: str, device: str, dtype: torch.dtype) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--child", kind, "--shape", model, "--device", device,
           "--dtype", str(dtype).removeprefix("torch.")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        print(f"  ({kind} load of {model} failed: {done.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(lines[-1])


# -- stages on a cluster ------------------------------------------------------------------------


def start_cluster(n: int, device: str) -> Any:
    """``n`` worker processes, one thread each; on cuda worker ``i`` sees GPU ``i mod gpus``
    and advertises ``GPU=1``."""
    import psutil
    from distributed import Nanny, Scheduler, SpecCluster

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    workers = {}
    for i in range(n):
        # the host's memory, not Dask's per-core share, so a large stage is not paused
        options: dict[str, Any] = {"nthreads": 1, "memory_limit": psutil.virtual_memory().total}
        if gpus:
            options["env"] = {"CUDA_VISIBLE_DEVICES": str(i % gpus)}
            options["resources"] = {"GPU": 1}
        workers[f"w{i}"] = {"cls": Nanny, "options": options}
    scheduler = {"cls": Scheduler, "options": {"dashboard": False}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)


def deploy_stages(backend: Any, model: str, stages: int, dtype: torch.dtype) -> tuple[list, float]:
    t0 = time.perf_counter()
    backend.deploy(model, stages=stages, dtype=dtype)
    seconds = time.perf_counter() - t0
    mem = backend.memory(model)
    backend.undeploy(model)
    backend.client.run(_free)
    return mem, seconds


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- printing -----------------------------------------------------------------------------------


def _gb(x: Any) -> str:
    return "–" if x is None else f"{x / GB:.3f}" if x < 10 * GB else f"{x / GB:.1f}"


def row(label: str, m: dict[str, Any]) -> str:
    peak = m.get("load_host_peak")
    growth = None if peak is None or m.get("rss_before") is None else peak - m["rss_before"]
    return (f"| {label} | {_gb(m['stage_bytes'])} | {_gb(m.get('load_cuda_peak'))} | "
            f"{_gb(peak)} | {_gb(growth)} | {_gb(m.get('read_bytes'))} | "
            f"{m['load_seconds']:.2f} |")


HEADER = ("| load | weights GB | CUDA peak GB | host peak GB | host peak growth GB | "
          "read GB | seconds |\n|---|---|---|---|---|---|---|")


def measure(backend: Any, label: str, model: str, args: argparse.Namespace,
            dtype: torch.dtype) -> dict[str, Any]:
    print(f"\n### {label}: {model}, {args.stages} stages, {args.device}, "
          f"{str(dtype).removeprefix('torch.')}\n", flush=True)
    t0 = time.perf_counter()
    from tpmlab.models import FolderSource, resolve

    source = resolve(model)
    source.version  # noqa: B018 - the client digests once, before the stages load
    digest = time.perf_counter() - t0
    mem, seconds = deploy_stages(backend, model, args.stages, dtype)
    print(HEADER)
    for k, m in enumerate(mem):
        print(row(f"stage {k}", m))
    refs = {"tpmlab in process": run_child("tpmlab", model, args.device, dtype)}
    if isinstance(source, FolderSource):
        refs["from_pretrained"] = run_child("hf", str(source.folder()), args.device, dtype)
    for name, m in refs.items():
        if m is not None:
            print(row(name, m))
    print(f"\ndeploy {seconds:.1f} s (client's version digest before it: {digest:.1f} s)",
          flush=True)
    return {"stages": mem, "deploy_seconds": seconds, "digest_seconds": digest, **refs}


def largest(backend: Any, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    best = None
    out = {}
    for shape in SHAPES_BY_SIZE[args.device]:
        try:
            mem, seconds = deploy_stages(backend, shape, args.stages, dtype)
        except Exception as e:  # noqa: BLE001 - the first shape that fails ends the search
            print(f"{shape}: does not deploy as {args.stages} stages ({type(e).__name__}: "
                  f"{str(e)[:200]})")
            break
        best = shape
        peaks = [m.get("load_cuda_peak") or m.get("load_host_peak") for m in mem]
        out[shape] = {"stages": mem, "deploy_seconds": seconds}
        print(f"{shape}: deployed in {seconds:.0f} s; per stage weights / peak GB: " + ", ".join(
            f"{m['stage_bytes'] / GB:.1f} / {p / GB:.1f}" for m, p in zip(mem, peaks)), flush=True)
    print(f"largest random-init shape deploying as {args.stages} stages: {best}")
    return {"largest": best, "shapes": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--shape", default="tiny-llama",
                   help="random-init shape (tiny-llama, llama-3-8b, llama-2-34b) or a folder")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--sources", default="random,folder")
    p.add_argument("--folder", default=None, help="where to write the random folder")
    p.add_argument("--largest", action="store_true")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.device, dtype)))
        return
    from distributed import Client

    from tpmlab.cluster import DaskBackend

    cluster = start_cluster(args.stages, args.device)
    client = Client(cluster)
    backend = DaskBackend(client=client, timeout=1800)
    report: dict[str, Any] = {"device": args.device, "stages": args.stages,
                              "dtype": str(dtype).removeprefix("torch.")}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    try:
        if args.largest:
            report.update(largest(backend, args, dtype))
        else:
            shape = shape_name(args.shape)
            sources = args.sources.split(",")
            if "random" in sources:  # or the named model as tpmlab resolves it
                from tpmlab.models.random_init import known_random_models

                label = "random-init" if shape in known_random_models() else "named model"
                report["random"] = measure(backend, label, shape, args, dtype)
            if "folder" in sources:
                folder = Path(args.folder or Path(tempfile.gettempdir()) /
                              f"tpmlab-{shape}-{report['dtype']}")
                write_folder(shape, folder, dtype, args.device)
                report["folder"] = measure(backend, "folder", str(folder), args, dtype)
    finally:
        backend.close()
        client.close()
        cluster.close()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
