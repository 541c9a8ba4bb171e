"""A session as one request vs the same traces run one after another, the value passing
through the notebook (an engine without sessions), on 2 Dask stages on this machine.

Two-pass activation patching: trace 1 reads a whole late-layer output (stage 1),
trace 2 writes it into an early layer (stage 0) and saves the last position's logits.
``one request``: ``model.session()`` as the engine runs it (the value goes from stage 1 to
stage 0 in the replies, never to the notebook); ``round trip``: the same session with
``run_session`` off (trace 1 saves the value, trace 2 carries it back as a constant).
Prints the median seconds of each, requests alternating, and their ratio; the numbers of
both are checked equal first.

    python benchmarks/session.py [--model smollm2-135m] [--tokens 256] [--repeats 10]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.cluster_cpu import interleaved


def patching(model, clean: list[int], corrupt: list[int]):
    last = model.adapter.n_layers - 1

    def run() -> torch.Tensor:
        with model.session():
            with model.trace(input_ids=clean):
                late = model.layers[last].output
            with model.trace(input_ids=corrupt):
                model.layers[0].output[:] = late
                logits = model.output.logits[:, -1].save()
        return logits.value

    return run


def main() -> None:
    import tpmlab

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    with tpmlab.connect(n_workers=2) as lab:
        model = lab.model(args.model, stages=2)
        handle = model.handle()
        handle.run_session = None  # trace by trace, through the notebook
        vocab = model.info.vocab_size
        g = torch.Generator().manual_seed(0)
        clean = torch.randint(0, vocab, (args.tokens,), generator=g).tolist()
        corrupt = torch.randint(0, vocab, (args.tokens,), generator=g).tolist()
        one, two = patching(model, clean, corrupt), patching(handle, clean, corrupt)
        torch.testing.assert_close(one(), two(), atol=1e-5, rtol=1e-5)
        value = args.tokens * model.d_model * 4
        t = interleaved({"one request": one, "round trip": two}, args.repeats)
        print(f"{args.model}, 2 stages, {args.tokens} tokens, value {value / 2**20:.2f} MiB")
        for k, v in t.items():
            print(f"  {k:12s} {v * 1e3:8.1f} ms")
        print(f"  one request / round trip: {t['one request'] / t['round trip']:.2f}x")


if __name__ == "__main__":
    main()
