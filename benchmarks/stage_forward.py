"""A stage's decode forward in a plain process: back to back, and after an idle gap.

Builds the model's stages the way a stage worker does (:class:`~tpmlab.cluster.stage.StageModel`,
the stage's own KV cache from ``new_cache``) and the whole model as one stage, then runs
``--new`` greedy decode steps after a ``--prompt``-token prompt pass, timing each stage's
forward (median ms over the decode steps, then over ``--repeats``). ``--idle-ms``: sleep
that long before every forward, as a stage worker's thread does between the steps of a
request while the other stages and the hops run (≈ 3 ms a step for tiny-llama on 2 CPU
stages). Nothing of Dask runs here: the difference between ``--idle-ms 0`` and ``--idle-ms 2``
is what idling between forwards costs the next forward by itself.

    python -m benchmarks.stage_forward [--model tiny-llama] [--stages 2] [--threads 2]
        [--idle-ms 0,2] [--repeats 5]
    taskset -c 1 python -m benchmarks.stage_forward --threads 1   # one core, no migration
"""

from __future__ import annotations

import argparse
import statistics
import time


def build(name: str, n_stages: int):
    import torch

    from tpmlab.cluster.partition import StageSpan
    from tpmlab.cluster.stage import StageModel
    from tpmlab.models import resolve

    n = resolve(name).adapter.n_layers
    bounds = [round(i * n / n_stages) for i in range(n_stages + 1)]

    def stages(count: int, cuts: list[int]) -> list[StageModel]:
        return [StageModel(resolve(name), StageSpan(index=i, n_stages=count, first=cuts[i],
                                                    last=cuts[i + 1] - 1, nbytes=0),
                           device=torch.device("cpu"), dtype=torch.float32)
                for i in range(count)]
    return stages(n_stages, bounds), stages(1, [0, n])


def decode(parts, *, prompt: int, new: int, idle: float) -> list[float]:
    """Median ms of each part's forward over the decode steps."""
    import torch

    from tpmlab.runtime.batching import row_positions
    from tpmlab.runtime.decoding import next_step_inputs

    caches = [p.new_cache() for p in parts]
    ids = torch.arange(1, prompt + 1)[None] % 100 + 1
    mask = torch.ones(1, prompt, dtype=torch.long)
    pos = row_positions(mask)
    times: list[list[float]] = [[] for _ in parts]
    with torch.inference_mode():
        for step in range(new + 1):
            hidden = None
            for k, (part, cache) in enumerate(zip(parts, caches)):
                if idle:
                    time.sleep(idle)
                start = time.perf_counter()
                if k == 0:
                    out = part.forward(input_ids=ids, attention_mask=mask, position_ids=pos,
                                       cache=cache, logits_to_keep=1)
                else:
                    out = part.forward(hidden=hidden, attention_mask=mask, position_ids=pos,
                                       cache=cache, logits_to_keep=1)
                if isinstance(out, torch.Tensor):
                    hidden = out
                else:
                    ids = out.logits[:, -1].argmax(-1, keepdim=True)
                if step:  # the prompt pass left out
                    times[k].append(time.perf_counter() - start)
            mask, pos = next_step_inputs(mask, pos)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--idle-ms", default="0,2", help="comma-separated idle gaps to compare")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    staged, whole = build(args.model, args.stages)
    gaps = [float(g) for g in args.idle_ms.split(",")]
    runs: dict[float, list[list[float]]] = {g: [] for g in gaps}
    for _ in range(args.repeats):  # the gaps alternate, so other jobs' load falls on all alike
        for g in gaps:
            runs[g].append(decode(staged, prompt=args.prompt, new=args.new, idle=g / 1e3)
                           + decode(whole, prompt=args.prompt, new=args.new, idle=g / 1e3))
    print(f"{args.model}, {args.stages} stages, 1x{args.prompt} + {args.new} greedy, "
          f"{torch.get_num_threads()} torch threads, medians of {args.repeats} (ms per forward)")
    for g in gaps:
        cols = [statistics.median(r[i] for r in runs[g]) for i in range(args.stages + 1)]
        parts = ", ".join(f"stage {i} {c:.3f}" for i, c in enumerate(cols[:-1]))
        print(f"  idle {g:g} ms before each: {parts}, stages together {sum(cols[:-1]):.3f}; "
              f"whole model {cols[-1]:.3f}")


if __name__ == "__main__":
    main()
