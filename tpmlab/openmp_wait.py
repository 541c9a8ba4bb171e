"""How long idle OpenMP threads spin before they sleep, in every process tpmlab runs models in.

GNU OpenMP (torch's on Linux) lets a thread that finished its share of a parallel op spin
≈ 300,000 times, milliseconds, before it sleeps. Where other work shares the cores (another
job on an HPC node or a CI machine, a second stage, the notebook's own threads) those spins
take the cores the computing threads need: with one CPU-bound process beside it, a 128-token
trace of the default model in process took 1.4 s instead of 0.15 s on two cores, and 0.59 s
with a short spin (benchmarks/README.md, "CPU stages re-measured"); on a quiet machine the
two differ by less than the runs' spread. libgomp reads the count once, when torch's
libraries load, so it is set before that or not at all.
"""

from __future__ import annotations

import os
import sys

#: what tpmlab's processes start with (a stage worker's environment, the notebook's before
#: torch loads); a value the user set is kept
SHORT_SPIN = {"GOMP_SPINCOUNT": "20000"}


def prefer_short_spin() -> bool:
    """Put :data:`SHORT_SPIN` in this process's environment where the user set nothing, if
    torch has not loaded yet (afterwards it would change nothing). Whether it could."""
    if "torch" in sys.modules:
        return False
    for name, value in SHORT_SPIN.items():
        os.environ.setdefault(name, value)
    return True
