"""The notebook's process gets the short OpenMP spin before torch loads, as stage workers do,
and a value the user set is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import os, sys; {first}import tpmlab, torch; "
         "print(os.environ.get('GOMP_SPINCOUNT'), tpmlab.openmp_wait.prefer_short_spin())")


def _probe(first: str = "", **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-2] + " " + out.stdout.split()[-1]


@pytest.mark.parametrize(("first", "env", "expected"), [
    ("", {}, "20000 False"),  # set before torch loaded; afterwards it would change nothing
    ("", {"GOMP_SPINCOUNT": "300000"}, "300000 False"),  # the user's own value stays
    ("import torch; ", {}, "None False"),  # torch first: left alone, not half set
])
def test_import_tpmlab_sets_the_short_spin_only_before_torch_loads(first, env, expected):
    assert _probe(first, **env) == expected


def test_stage_workers_start_with_the_same_spin():
    from tpmlab.cluster.warm_start import WORKER_ENV
    from tpmlab.openmp_wait import SHORT_SPIN

    assert WORKER_ENV == SHORT_SPIN == {"GOMP_SPINCOUNT": "20000"}
