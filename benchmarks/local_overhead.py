"""Overhead of tracing in-process: raw Hugging Face vs tpmlab vs nnsight, as ratios to raw.

Cases, each timed as the median of repeated runs in one process on the same weights:
  raw            plain ``model(input_ids)``
  none           a trace with no intervention
  save_all       save every layer's output (to pinned host memory on a GPU)
  lens_top1      logit lens on every layer and position, reduced to top-1 on the engine

    python -m benchmarks.local_overhead                       # default model, CPU, 16 and 128 tokens
    python -m benchmarks.local_overhead --model llama-3-8b-shape --device cuda \
        --shapes 1x128 8x512                                  # on a GPU, bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import tpmlab
from tpmlab.runtime.backend import LocalBackend


def _timed(fn, reps: int, sync) -> float:
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(model_name: str, device: str, shapes: list[tuple[int, int]], reps: int,
        with_nnsight: bool = True) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lab = tpmlab.Lab(LocalBackend(device=device, dtype=dtype))
    model = lab.model(model_name)
    hf = lab.backend.host(model.name).model
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    nn_model = None
    if with_nnsight:
        try:
            import nnsight

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nn_model = nnsight.LanguageModel(hf, tokenizer=model.tokenizer)
        except ImportError:
            nn_model = None
    n_layers = model.adapter.n_layers
    rows = []
    for batch, length in shapes:
        ids = torch.randint(100, 1000, (batch, length))
        ids_dev = ids.to(device)

        def raw(ids_dev=ids_dev):
            with torch.inference_mode():
                hf(input_ids=ids_dev, use_cache=False)

        def tp_none(ids=ids):
            with model.trace(input_ids=ids):
                pass

        def tp_save(ids=ids):
            with model.trace(input_ids=ids):
                for layer in model.layers:
                    layer.output.save()

        def tp_lens(ids=ids):
            with model.trace(input_ids=ids):
                for layer in model.layers:
                    model.unembed(model.final_norm(layer.output)).argmax(-1).save()

        results = {"raw": _timed(raw, reps, sync), "tpmlab none": _timed(tp_none, reps, sync),
                   "tpmlab save_all": _timed(tp_save, reps, sync),
                   "tpmlab lens_top1": _timed(tp_lens, reps, sync)}
        if nn_model is not None:
            layers = nn_model.model.layers if hasattr(nn_model, "model") else None

            def nn_none(ids_dev=ids_dev, layers=layers):
                with nn_model.trace(ids_dev):
                    pass

            def nn_save(ids_dev=ids_dev, layers=layers):
                with nn_model.trace(ids_dev):
                    out = list().save()
                    for i in range(n_layers):
                        out.append(layers[i].output.cpu())
                return out

            def nn_lens(ids_dev=ids_dev, layers=layers):
                with nn_model.trace(ids_dev):
                    out = list().save()
                    for i in range(n_layers):
                        out.append(nn_model.lm_head(nn_model.model.norm(layers[i].output))
                                   .argmax(-1).cpu())
                return out

            if layers is not None:
                results["nnsight none"] = _timed(nn_none, reps, sync)
                results["nnsight save_all"] = _timed(nn_save, reps, sync)
                results["nnsight lens_top1"] = _timed(nn_lens, reps, sync)
        results["raw (again)"] = _timed(raw, reps, sync)
        base = min(results["raw"], results["raw (again)"])
        for case, seconds in results.items():
            rows.append({"shape": f"{batch}x{length}", "case": case, "ms": seconds * 1e3,
                         "ratio": seconds / base})
    lab.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=["1x16", "1x128"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-nnsight", action="store_true")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    rows = run(args.model, args.device, shapes, args.reps, not args.no_nnsight)
    print(f"model {args.model} on {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"{'shape':>8}  {'case':<20} {'ms':>9} {'x raw':>7}")
    for r in rows:
        print(f"{r['shape']:>8}  {r['case']:<20} {r['ms']:9.2f} {r['ratio']:7.2f}")


if __name__ == "__main__":
    main()
