"""glibc's malloc as a stage's forwards need it, whatever started its worker.

A Dask nanny starts its worker with ``MALLOC_TRIM_THRESHOLD_=65536``
(``distributed.nanny.pre-spawn-environ``), as ``dask worker`` on an HPC allocation does and
as a nanny restarting a lost worker does, so that freed memory soon goes back to the
system. Setting any of glibc's thresholds also switches off its *dynamic* mmap threshold:
from then on every allocation of 128 KiB or more is a mapping of its own, unmapped when
freed, and its pages fault in anew the next time. A forward allocates and frees its
activations op after op, so every op pays for fresh pages: a CPU forward of a small Llama
took 58-61 ms in such a process against 42 ms in a plain one (benchmarks/README.md).

A process that makes a stage sets the two thresholds to where glibc's dynamic policy
settles on 64-bit Linux (mmap threshold 32 MiB, trim threshold twice that), once. Freed
memory still goes back to the system: allocations of 32 MiB or more stay mappings of their
own, returned when freed, and more than 64 MiB free at the top of the heap is trimmed.
``TPMLAB_KEEP_MALLOC=1`` in a worker's environment keeps what it was started with.
Elsewhere (another C library, another system) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

ENV = "TPMLAB_KEEP_MALLOC"  #: "1" in a worker's environment: leave malloc as it was started
#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: where glibc's dynamic threshold ends up (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
#: the variables that switch glibc's dynamic threshold off when a process starts
FIXING_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                    "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_done: bool | None = None  # None: not tried yet in this process


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def relax() -> bool:
    """Set glibc's thresholds to its dynamic policy's steady state in this process (once;
    later calls return the first answer). Returns whether they were set: ``False`` with
    ``TPMLAB_KEEP_MALLOC=1``, without glibc, or where ``mallopt`` refused."""
    global _done
    with _lock:
        if _done is not None:
            return _done
        _done = False
        if os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
        libc = _glibc()
        if libc is None:
            return False
        # mallopt returns 1 on success
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
            and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        fixed = [v for v in FIXING_VARIABLES if v in os.environ]
        if fixed:
            log.info("malloc thresholds set for stage forwards (the worker was started with %s)",
                     ", ".join(f"{v}={os.environ[v]}" for v in fixed))
        return _done


def relaxed() -> bool:
    """Whether :func:`relax` set the thresholds in this process."""
    return bool(_done)
