"""A stage reads and holds its own bytes and nothing more, measured in its worker process
(``/proc/self/io`` and the resident set, around the stage's load)."""

from __future__ import annotations

import pytest

from tpmlab.runtime.load_meter import LOAD_OVERHEAD_BYTES

from .conftest import deploy

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


@pytest.mark.parametrize("stages", [2, 3])
def test_each_stage_reads_and_holds_only_its_own_bytes(lab, stages):
    deploy(lab, MODEL, stages)
    try:
        mem = lab.backend.memory(MODEL)
        assert len(mem) == stages
        print(f"{stages} stages (MB): " + "; ".join(
            f"weights {s['stage_bytes'] >> 20} read {s['read_bytes'] >> 20} "
            f"growth {s['resident_growth'] >> 20} "
            f"peak growth {(s['load_host_peak'] - s['rss_before']) >> 20} "
            f"{s['load_seconds']:.1f} s" for s in mem))
        whole = sum(lab.backend.deployment(MODEL).info.extra["stage_bytes"])
        for k, s in enumerate(mem):
            own = s["stage_bytes"]
            assert own < 0.7 * whole
            # it read its own tensors (the measurement sees them) and not the rest
            assert 0.95 * own <= s["read_bytes"] <= 1.2 * own, (k, s)
            # and holds them, with no copy of anything else, during the load and after
            assert s["resident_growth"] <= own + LOAD_OVERHEAD_BYTES, (k, s)
            assert s["load_host_peak"] - s["rss_before"] <= own + LOAD_OVERHEAD_BYTES, (k, s)
            assert s["load_seconds"] > 0
    finally:
        lab.undeploy(MODEL)
