"""What loading weights cost the process that loads them, measured from the process.

:class:`LoadMeter` brackets a load (a stage's weights, its probe) and records:

* ``read_bytes``: bytes the process read through ``read``/``pread`` meanwhile
  (``rchar`` in ``/proc/self/io``). Loaders read checkpoints with positioned reads
  (:mod:`tpmlab.models.tensor_files`), so this is the checkpoint bytes the process
  pulled whether the page cache or the disk served them, plus small files (config,
  tokenizer, Python modules imported for the first time). ``disk_read_bytes``
  (``read_bytes`` there) counts only what the disk served: 0 when the checkpoint is
  cached, and so no measure of what a stage takes.
* ``load_host_peak``: the process's peak resident set during the load (``VmHWM``, reset to the
  current resident set when the load starts by writing 5 to ``/proc/self/clear_refs``);
  ``rss_before`` and ``resident_growth`` (resident after the load less before).
* ``load_cuda_peak``: the most CUDA memory PyTorch's allocator held during the load (its peak
  statistics reset when the load starts; the CUDA context itself is not included).
* ``load_seconds``: wall time of the load.

Linux only for the host figures (``None`` elsewhere). Loads that run at the same time in
one process (two stages on one worker) are measured together.

What a load may cost beyond its own weights (tests and benchmarks hold loads to it):
:data:`LOAD_OVERHEAD_BYTES` of host memory, the staging buffer of
:mod:`~tpmlab.models.tensor_files` plus the tokenizer, config and the probe's few
activations; on a GPU, 10% of the weights (the allocator's rounding) besides the CUDA
context; bytes read, at most 1.2x the weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

#: host memory a load may take beyond its weights (see the module's docstring)
LOAD_OVERHEAD_BYTES = 128 * 2**20

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """The process's resident set now (``VmRSS``)."""
    return _status_kib("VmRSS")


def peak_resident_bytes() -> int | None:
    """The process's peak resident set since it started or was last reset (``VmHWM``)."""
    return _status_kib("VmHWM")


def reset_peak_resident() -> bool:
    """Reset ``VmHWM`` to the current resident set; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def io_counters() -> dict[str, int]:
    """``rchar`` and ``read_bytes`` of ``/proc/self/io`` (empty where unavailable)."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in lines)
    return {k: int(v) for k, v in pairs if k in ("rchar", "read_bytes")}


class LoadMeter:
    """``with LoadMeter(device) as meter: load()``; then ``meter.figures``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.figures: dict[str, Any] = {}

    def __enter__(self) -> LoadMeter:
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak_reset = reset_peak_resident()
        self._rss = resident_bytes()
        self._io = io_counters()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._t0
        io = io_counters()
        rss = resident_bytes()
        peak = peak_resident_bytes() if self._peak_reset else None

        def delta(key: str) -> int | None:
            return io[key] - self._io[key] if key in io and key in self._io else None

        self.figures = {
            "load_seconds": seconds,
            "read_bytes": delta("rchar"),
            "disk_read_bytes": delta("read_bytes"),
            "rss_before": self._rss,
            "resident_growth": None if rss is None or self._rss is None else rss - self._rss,
            "load_host_peak": peak,
            "load_cuda_peak": torch.cuda.max_memory_allocated(self.device) if self._cuda else None,
        }
