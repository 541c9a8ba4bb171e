"""The cluster ``tpmlab.connect()`` starts when given no address: a Dask
``LocalCluster`` of worker *processes* sized to this machine."""

from __future__ import annotations

import logging
import os
from typing import Any

from distributed import LocalCluster


def default_workers() -> int:
    """One worker process per core, at least 2 (room for two stages) and at most 4."""
    return max(2, min(os.cpu_count() or 1, 4))


def start_local_cluster(n_workers: int | None = None, **options: Any) -> LocalCluster:
    """Start a LocalCluster of ``n_workers`` single-threaded processes (stage compute runs in
    its own thread and uses all cores; the stages of a request run one after another).

    With CUDA devices present and dask-cuda installed, a ``LocalCUDACluster`` (one worker
    per GPU, each advertising ``GPU=1``) is started instead; without dask-cuda, one worker
    advertising all the GPUs (``GPU=n``, a stage per device).
    """
    options.setdefault("dashboard_address", None)
    options.setdefault("silence_logs", logging.ERROR)
    # Stages of one request run one after another on shared cores: idle workers' OpenMP
    # threads must sleep, not spin, or they steal the cores the busy stage computes on.
    options["env"] = {"OMP_WAIT_POLICY": "PASSIVE", **options.get("env", {})}
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch is a dependency
        gpus = 0
    if gpus and n_workers is None:
        try:
            from dask_cuda import LocalCUDACluster

            return LocalCUDACluster(resources={"GPU": 1}, **options)
        except ImportError:  # one worker holding every GPU, one stage per GPU
            return LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                resources={"GPU": gpus}, **options)
    return LocalCluster(n_workers=n_workers or default_workers(), threads_per_worker=1,
                        processes=True, **options)
