"""Weight-store space and partial-load benchmark (a script, not a timed test).

1. Space: commit 10 successive versions of a random-init model where 5% of the
   tensors change each time (small dense noise, as a fine-tuning step or an edit
   would); report stored bytes over one version's bytes (full copies: 10x;
   target: at most 1.6x).
2. Partial load: a pipeline stage's slice (a third of the layers) against the
   whole model: time and bytes read, as ratios.

Default shape is SmolLM2-135M (Llama, hidden 576, 30 layers, vocab 49152, tied
embeddings, ~540 MB of float32). Run::

    python benchmarks/store_versions.py [--layers 30] [--root DIR]
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tpmlab.store import Store


def random_model(layers: int, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and config of a random-init SmolLM2-shaped Llama."""
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlamaForCausalLM(config)
    return dict(model.state_dict()), config.to_dict()


def unique_names(sd: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """One name per distinct tensor (tied weights are one), mapped to all its names."""
    groups: dict[int, list[str]] = {}
    for name, t in sd.items():
        groups.setdefault(t.data_ptr(), []).append(name)
    return {names[0]: names for names in groups.values()}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def space(store: Store, sd: dict[str, torch.Tensor], config: dict, versions: int,
          fraction: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    groups = unique_names(sd)
    n_change = math.ceil(fraction * len(groups))
    one_version = sum(sd[n].numel() * sd[n].element_size() for n in groups)
    t0 = time.perf_counter()
    digests = [store.commit(sd, config=config, message="v0")]
    first_commit = time.perf_counter() - t0
    base_bytes = store.stored_bytes()
    changed_bytes, later = 0, []
    embed_hits = 0
    for i in range(1, versions):
        picked = rng.sample(sorted(groups), n_change)
        embed_hits += "model.embed_tokens.weight" in picked
        sd = dict(sd)
        for name in picked:
            new = sd[name] + 1e-3 * torch.randn(sd[name].shape, generator=torch.Generator().manual_seed(i))
            changed_bytes += new.numel() * new.element_size()
            for alias in groups[name]:
                sd[alias] = new
        t0 = time.perf_counter()
        digests.append(store.commit(sd, config=config, message=f"v{i}", parent=digests[-1]))
        later.append(time.perf_counter() - t0)
    total = store.stored_bytes()
    print(f"model: {len(sd)} state-dict names, {len(groups)} distinct tensors, {mib(one_version)}")
    print(f"{versions} versions, {n_change} tensors ({fraction:.0%}) changed per version "
          f"(embedding picked {embed_hits} times); changed tensors total {mib(changed_bytes)}")
    print(f"commit: first {first_commit:.2f} s, later median {statistics.median(later):.2f} s")
    print(f"stored chunks: one version {mib(base_bytes)}, all {versions} versions {mib(total)}")
    print(f"SPACE RATIO (all versions / one version): {total / base_bytes:.3f}x "
          f"(full copies: {versions}x; lower bound from changed bytes: "
          f"{(base_bytes + changed_bytes) / base_bytes:.3f}x)")
    return digests


def partial_load(root: Path, digest: str, layers: int, repeats: int = 3) -> None:
    stage_layers = range(layers // 3)
    prefixes = tuple(f"model.layers.{i}." for i in stage_layers)

    def stage_keys(name: str) -> bool:
        return name.startswith(prefixes)

    def timed(keys) -> tuple[float, int, int]:
        times, stats = [], None
        for _ in range(repeats):
            store = Store(root)  # fresh: no cached manifest
            t0 = time.perf_counter()
            out = store.load(digest, keys=keys)
            times.append(time.perf_counter() - t0)
            stats = store.stats
            del out
        return statistics.median(times), stats.bytes_read, stats.chunks_read

    full_t, full_b, full_c = timed(None)
    part_t, part_b, part_c = timed(stage_keys)
    print(f"load whole model: {full_t:.3f} s, {mib(full_b)} in {full_c} chunks "
          f"({full_b / full_t / 1e9:.2f} GB/s, hashes checked)")
    print(f"load stage (layers {stage_layers.start}-{stage_layers.stop - 1} of {layers}): "
          f"{part_t:.3f} s, {mib(part_b)} in {part_c} chunks")
    print(f"PARTIAL LOAD RATIOS (stage / whole): time {part_t / full_t:.3f}, "
          f"bytes read {part_b / full_b:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--versions", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", help="store folder (default: a temporary folder, removed after)")
    args = p.parse_args()
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="tpmlab-store-bench-"))
    try:
        t0 = time.perf_counter()
        sd, config = random_model(args.layers, args.seed)
        print(f"random init: {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
        store = Store(root)
        digests = space(store, sd, config, args.versions, args.fraction, args.seed)
        del sd
        partial_load(root, digests[-1], args.layers)
        t0 = time.perf_counter()
        report = store.verify()
        print(f"verify all: {time.perf_counter() - t0:.2f} s, {report}")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
