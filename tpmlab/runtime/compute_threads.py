"""Every thread that runs a model's ops starts with torch's thread count.

OpenMP keeps the number of threads per native thread: a thread starts with the count
the process's environment gave (``OMP_NUM_THREADS``, which a Dask nanny sets to 1 before
it spawns a worker, or every core), not the count :func:`torch.set_num_threads` gave in
another thread. torch applies its own count to a new thread only at that thread's first
parallel region, so the ops before it (a stage's first matrix products, which MKL splits by
the calling thread's count) ran with the environment's count: the first request on a
fresh stage thread summed in another order and rounded differently from every later one
(≈ 2e-5 on smollm2's logits). Setting the count in the thread before its first op makes
every request, first or not, compute the same way.
"""

from __future__ import annotations

import threading

import torch

_settled = threading.local()


def settle(threads: int | None = None) -> int:
    """Give the calling thread ``threads`` intra-op threads (default: torch's current count,
    as set in the process's main thread). Returns the count. Call it first thing in any
    thread that will run model ops; as a ``ThreadPoolExecutor`` ``initializer``, say."""
    n = int(threads or torch.get_num_threads())
    torch.set_num_threads(n)
    return n


def settle_once() -> None:
    """:func:`settle` the calling thread if it was not yet: for threads tpmlab does not start
    (a notebook's, a user's own threads running requests in process)."""
    if not getattr(_settled, "done", False):
        settle()
        _settled.done = True
