"""Choosing a worker (and a device on it) for each pipeline stage.

Workers that advertise a ``GPU`` resource (``dask-worker --resources GPU=1``,
dask-cuda's ``LocalCUDACluster``, dask-jobqueue with ``--resources GPU=1``) get one
stage per GPU: a worker with ``GPU=n`` offers devices ``cuda:0..n-1`` (as its
``CUDA_VISIBLE_DEVICES`` numbers them). Without GPU workers, stages go to CPU
workers round-robin, least-loaded first. Consecutive stages stay on one worker
only when there are fewer workers than stages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import DeploymentError

GPU = "GPU"


@dataclass(frozen=True)
class Placement:
    """Where one stage lives: a worker address and a torch device string on it."""

    worker: str
    device: str


def gpu_count(info: Mapping[str, Any]) -> int:
    """How many GPUs a worker advertises (its ``GPU`` resource)."""
    return int((info.get("resources") or {}).get(GPU, 0))


def place_stages(workers: Mapping[str, Mapping[str, Any]], n_stages: int, *,
                 taken: Iterable[Placement] = (), exclude: Iterable[str] = ()) -> list[Placement]:
    """A placement (worker and device) for each of ``n_stages`` stages.

    ``workers``: the scheduler's view, ``{address: {"resources": {...}, ...}}``
    (``Client.scheduler_info()["workers"]``); ``taken``: placements other stages already
    hold (a GPU holds one stage); ``exclude``: addresses not to use (lost workers).
    Raises :class:`DeploymentError` when there are not enough workers or GPUs.
    """
    excluded = set(exclude)
    live = {a: w for a, w in workers.items() if a not in excluded}
    if not live:
        raise DeploymentError("the cluster has no live workers to place stages on")
    taken = list(taken)
    gpu_workers = {a: gpu_count(w) for a, w in live.items() if gpu_count(w) > 0}
    if gpu_workers:
        used = {(s.worker, s.device) for s in taken}
        free = [Placement(a, f"cuda:{i}") for a in sorted(gpu_workers) for i in range(gpu_workers[a])
                if (a, f"cuda:{i}") not in used]
        if len(free) < n_stages:
            total = sum(gpu_workers.values())
            raise DeploymentError(
                f"{n_stages} stages need {n_stages} free GPUs (one stage per GPU); the cluster's "
                f"GPU workers offer {total}, {len(free)} free. Use fewer stages or add workers "
                "with --resources GPU=1")
        # spread over workers first (one GPU each), then use the remaining GPUs
        by_worker: dict[str, list[Placement]] = {}
        for s in free:
            by_worker.setdefault(s.worker, []).append(s)
        order: list[Placement] = []
        while len(order) < len(free):
            for a in sorted(by_worker):
                if by_worker[a]:
                    order.append(by_worker[a].pop(0))
        return order[:n_stages]
    load = {a: 0 for a in live}
    for s in taken:
        if s.worker in load:
            load[s.worker] += 1
    placements = []
    for _ in range(n_stages):
        a = min(sorted(load), key=lambda w: load[w])
        load[a] += 1
        placements.append(Placement(a, "cpu"))
    return placements
