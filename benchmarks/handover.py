"""Saved values reaching the notebook from pipeline stages on this host: through shared
memory (:mod:`tpmlab.cluster.handover`, the default) against the values framed in the
replies: over the stage link (:mod:`tpmlab.cluster.stage_link`, the notebook's channel to
stages on its host when shared memory is off) and through Dask's comms (TLS, as the
embedded cluster speaks; the links switched off in the notebook and on the workers: what
stages on another host use), on the same deployment, requests alternating. ``shared memory,
copy + write`` is the hand-over as it was before saves were copied straight into segments
(``handover.DIRECT = False`` on the workers for those requests: each large save cloned,
then written into a new segment). With ``--compare-pin``, ``shared memory, pinned copy``
is a GPU stage's hand-over without segments registered with CUDA
(:mod:`tpmlab.cluster.pinned_segments`, ``ACTIVE = False`` on the workers for those
requests: each save copied into fresh pinned memory, then into a segment when the reply is
packed), against ``shared memory`` (the device copies each save straight into a registered
segment); each request then starts with the stages' pools filled for its way (an untimed
request after each switch, and a wait for the pools' background threads before each
request), and the stages' registration counts are printed at the end. With
``--compare-gaps``, ``shared memory, fill beside compute`` lets the stages' pools make and
register segments while the stages compute (:mod:`tpmlab.cluster.compute_gaps`,
``ACTIVE = False``), against ``shared memory`` (only between computations); requests
follow each other without waiting for the pools, as a notebook's do. With
``--compare-unmap``, ``shared memory, unmapped in place`` has the notebook unmap each
segment on the thread that lets its last value go (``handover.UNMAP_APART = False``: the
next trace's thread, freeing the pages), against ``shared memory`` (a thread of its own).
With ``--compare-recycle``, ``shared memory, made anew`` has the stages make new segments
for every request (``segment_pool.RECYCLE = False`` on the workers), against ``shared memory``
(the segments the notebook unmapped come back to their stage's pool); the stages' pool
counts (segments made, given back, dropped) are printed at the end. With
``--compare-network``, ``network link`` has the notebook reach each stage over the channel
stages on another host get (:mod:`tpmlab.cluster.stage_link` over TCP, TLS on the
embedded cluster; ``--tcp``: a plain-TCP cluster instead; a notebook's backend linked with
``network`` on), against ``stage link`` (its Unix
socket) and ``dask comms`` (what such a notebook had before).
Each trace lets its values go before it returns, so that cost falls inside its time.

A trace saving a large value (``--save logits``: the last stage's logits
``[batch, pos, vocab]``; ``--save layers``: every layer's output, from every stage) is timed
against the same trace saving one token id; the difference is what moving the saves
costs, and bytes / difference the rate they arrive at. ``touch`` adds a full read of each
saved value in the notebook (a mapped value's pages arrive on first use). For scale: a
plain copy of as many bytes into fresh memory in this process.

    python -m benchmarks.handover                                   # tiny-llama, CPU
    python -m benchmarks.handover --device cuda --model llama-3-8b-shape \\
        --save layers --shape 8x512 --dtype bfloat16                  # 2 workers, 1 GPU
    python -m benchmarks.handover --device cuda --model llama-3-8b-shape \
        --save layers --shape 8x512 --dtype bfloat16 --compare-pin     # registered or not
    python -m benchmarks.handover --device cuda --model llama-3-8b-shape \
        --save layers --shape 1x128 --dtype bfloat16 --compare-gaps    # fill between or beside
    python -m benchmarks.handover --compare-recycle                  # given back or made anew
    python -m benchmarks.handover --compare-network [--tcp]          # as from another host
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch


def start(device: str, tcp: bool = False) -> Any:
    from tpmlab.cluster.embedded import start_local_cluster

    if tcp:  # a cluster of one's own without TLS (as dask-jobqueue starts by default)
        import logging

        from distributed import LocalCluster

        from tpmlab.cluster.warm_start import forked_workers

        env = {"CUDA_VISIBLE_DEVICES": "0"} if device == "cuda" else {}
        with forked_workers():
            return LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                host="127.0.0.1", dashboard_address=":0", env=env,
                                silence_logs=logging.ERROR,
                                resources={"GPU": 1} if device == "cuda" else None)
    if device == "cuda":  # two workers sharing GPU 0, one stage each
        return start_local_cluster(n_workers=2, resources={"GPU": 1},
                                   env={"CUDA_VISIBLE_DEVICES": "0"})
    return start_local_cluster(n_workers=2)


def _ways(direct: bool, pin: bool, gaps: bool = True, link: bool = True,
          apart: bool = True, recycle: bool = True) -> None:
    from tpmlab.cluster import compute_gaps, handover, pinned_segments, segment_pool, stage_link

    handover.DIRECT = direct
    handover.UNMAP_APART = apart
    segment_pool.RECYCLE = recycle
    pinned_segments.ACTIVE = pin
    compute_gaps.ACTIVE = gaps
    stage_link.ACTIVE = link


def _settle(lab: Any, model: str, seconds: float = 30.0) -> list[dict[str, int]]:
    """Wait for the stages' pools to be filled (the same registration counts twice in a row,
    no request holding a registered segment); the counts."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        counts = [m.get("handover", {}) for m in lab.backend.memory(model)]
        if counts == last and all(c.get("held", 0) == c.get("pooled", 0) + c.get("lent", 0)
                                  for c in counts):
            break
        last = counts
        time.sleep(0.2)
    return counts


def _linked(name: str, labs: dict[str, Any]) -> None:
    """Wait until every backend holds its links (they come up after its first call to each
    stage); print how each reaches its stages."""
    deadline = time.monotonic() + 30
    backends = {id(lab.backend): lab.backend for lab in labs.values()}.values()
    while time.monotonic() < deadline:
        links = [b._links.get(a.key) for b in backends for a in b.deployment(name).actors]
        if all(link is not None for link in links):
            break
        time.sleep(0.1)
    for way, lab in labs.items():
        kinds = [getattr(lab.backend._links.get(a.key), "kind", None)
                 for a in lab.backend.deployment(name).actors]
        print(f"{way}: the notebook's links {kinds}")


def trace(model: Any, ids: torch.Tensor, save: str, touch: bool) -> int:
    """Run one trace; returns the bytes saved."""
    with model.trace(ids):
        if save == "logits":
            saved = [model.unembed.output.save()]
        elif save == "layers":
            saved = [layer.output.save() for layer in model.layers]
        else:
            saved = [model.unembed.output[:, -1].argmax(-1).save()]
    values = [s.value for s in saved]
    values = [v[0] if isinstance(v, tuple) else v for v in values]
    if touch:
        for v in values:
            v.max()
    return sum(v.numel() * v.element_size() for v in values)


def _rate(nbytes: int, seconds: float) -> str:
    """GB/s, or "-" where the run's noise left no difference to divide by."""
    return f"{nbytes / seconds / 1e9:.2f}" if seconds > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--shape", default="8x170", help="batch x tokens")
    parser.add_argument("--save", default="logits", choices=("logits", "layers"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare-pin", action="store_true",
                        help="add a row with segments registered with CUDA switched off")
    parser.add_argument("--compare-unmap", action="store_true",
                        help="add a row where the notebook unmaps each value's segment on "
                             "the thread that lets it go (handover.UNMAP_APART switched off)")
    parser.add_argument("--compare-gaps", action="store_true",
                        help="add a row with the pool filling beside the stage's computations "
                             "(tpmlab.cluster.compute_gaps switched off)")
    parser.add_argument("--compare-recycle", action="store_true",
                        help="add a row where the stages make new segments for every request "
                             "(segment_pool.RECYCLE switched off)")
    parser.add_argument("--tcp", action="store_true",
                        help="a plain-TCP cluster instead of the embedded (TLS) one")
    parser.add_argument("--compare-network", action="store_true",
                        help="add a row where the notebook's links to the stages run over "
                             "TCP (TLS here), as to stages on another host")
    args = parser.parse_args()
    from distributed import Client

    from tpmlab.cluster import DaskBackend
    from tpmlab.lab import Lab

    cluster = start(args.device, args.tcp)
    client = Client(cluster)
    shared = Lab(DaskBackend(client=client, handover=True))
    framed = Lab(DaskBackend(client=client, handover=False))
    labs = {"shared memory": shared, "shared memory, copy + write": shared,
            "stage link": framed, "dask comms": framed}
    if args.compare_network:
        remote = DaskBackend(client=client, handover=False)
        remote._link_network = True
        labs = {**labs, "network link": Lab(remote)}
    if args.compare_pin:
        labs = {"shared memory": shared, "shared memory, pinned copy": shared, **labs}
    if args.compare_gaps:
        labs = {"shared memory": shared, "shared memory, fill beside compute": shared, **labs}
    if args.compare_unmap:
        labs = {"shared memory": shared, "shared memory, unmapped in place": shared, **labs}
    if args.compare_recycle:
        labs = {"shared memory": shared, "shared memory, made anew": shared, **labs}
    models = {}
    for name, lab in labs.items():  # the others attach to the first's deployment
        models[name] = lab.model(args.model, stages=args.stages, dtype=args.dtype)
    direct = {way: way != "shared memory, copy + write" for way in labs}
    pin = {way: way != "shared memory, pinned copy" for way in labs}
    gaps = {way: way != "shared memory, fill beside compute" for way in labs}
    link = {way: way != "dask comms" for way in labs}
    apart = {way: way != "shared memory, unmapped in place" for way in labs}
    recycle = {way: way != "shared memory, made anew" for way in labs}
    settle = args.compare_pin or args.compare_gaps
    rows, pos = (int(x) for x in args.shape.split("x"))
    vocab = models["shared memory"].info.vocab_size
    ids = torch.randint(0, vocab, (rows, pos), generator=torch.Generator().manual_seed(0))
    cases = [(way, save, touch) for way in labs for save, touch in
             (("token", False), (args.save, False), (args.save, True))]
    times: dict[tuple[str, str, bool], list[float]] = {c: [] for c in cases}
    nbytes = 0

    def switch(way: str) -> None:  # on the workers and here (the client's links)
        client.run(_ways, direct[way], pin[way], gaps[way], link[way], apart[way], recycle[way])
        _ways(direct[way], pin[way], gaps[way], link[way], apart[way], recycle[way])

    for c in cases:  # warm-up
        switch(c[0])
        trace(models[c[0]], ids, c[1], c[2])
    if args.compare_network:
        _linked(args.model, labs)
    last_way = None
    for r in range(args.repeats):
        for c in cases if r % 2 == 0 else cases[::-1]:
            switch(c[0])
            if settle and c[0] != last_way:  # an untimed request after each switch
                _settle(shared, args.model)
                trace(models[c[0]], ids, args.save, False)
            last_way = c[0]
            if args.compare_pin:  # the pools hold segments of this way's kind, filled
                _settle(shared, args.model)
            t = time.perf_counter()
            n = trace(models[c[0]], ids, c[1], c[2])
            times[c].append(time.perf_counter() - t)
            nbytes = max(nbytes, n)
    src = np.random.rand(nbytes // 8)
    copies = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        src.copy()
        copies.append(time.perf_counter() - t)
    print(f"{args.model} {args.stages} stages on {args.device}, {args.shape}, saving {args.save}: "
          f"{nbytes / 1e6:.0f} MB, median of {args.repeats}")
    print(f"{'':36s}{'trace, 1 token':>16s}{'with saves':>12s}{'GB/s':>7s}"
          f"{'+ touch':>10s}{'GB/s':>7s}")
    for way in labs:
        base = statistics.median(times[(way, "token", False)])
        big = statistics.median(times[(way, args.save, False)])
        touched = statistics.median(times[(way, args.save, True)])
        print(f"{way:36s}{base * 1e3:13.1f} ms{big * 1e3:9.1f} ms"
              f"{_rate(nbytes, big - base):>7s}{touched * 1e3:7.1f} ms"
              f"{_rate(nbytes, touched - base):>7s}")
    print(f"plain copy in this process: {nbytes / statistics.median(copies) / 1e9:.2f} GB/s")
    if settle or args.device == "cuda":  # saves into registered segments, and those that missed
        for k, counts in enumerate(_settle(shared, args.model)):
            print(f"stage {k} registered segments: {counts or 'none (not a GPU stage)'}")
    for k, m in enumerate(shared.backend.memory(args.model)):
        print(f"stage {k} pool: {m['recycling']}")
    for lab in {id(lab): lab for lab in labs.values()}.values():
        lab.close()
    client.close()
    cluster.close()


if __name__ == "__main__":
    main()
