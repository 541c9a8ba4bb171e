"""Every notebook in notebooks/ runs top to bottom under nbval, in strict mode: each code
cell's fresh output must equal its saved output, after the substitutions in
``sanitize.cfg`` (addresses, source-line file names, full digests, timings). Cells whose
output legitimately varies (figures of float values, memory use, progress) carry the
``nbval-ignore-output`` tag; lax mode is never used.

Each notebook runs in its own ``pytest --nbval`` subprocess with its own kernel from this
environment, so a notebook that starts a cluster cannot disturb the suite or the next
notebook. Rerun one by hand with::

    python -m pytest --nbval notebooks/01_quickstart.ipynb --nbval-current-env \\
        --nbval-sanitize-with tests/notebooks/sanitize.cfg -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SANITIZE = Path(__file__).with_name("sanitize.cfg")
TIMEOUT = 900  # seconds for a whole notebook; the tutorials take well under a minute each
MAX_BYTES = 400_000  # saved notebooks stay small: plotly JSON figures, no HTML bundles
IGNORE = "nbval-ignore-output"


def nbval_command(notebook: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "--nbval", str(notebook), "--nbval-current-env",
            "--nbval-sanitize-with", str(SANITIZE), "--nbval-cell-timeout", "600",
            "-p", "no:cacheprovider", "-q", "--rootdir", str(ROOT)]


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {"01_quickstart", "06_sharding_and_scaling", "07_custom_embeddings"} <= names


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_notebook_is_executed_and_small(notebook):
    nb = json.loads(notebook.read_text())
    assert notebook.stat().st_size < MAX_BYTES, f"{notebook.name}: {notebook.stat().st_size} bytes"
    assert "widgets" not in nb["metadata"], "no saved widget state"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    compared = [c for c in code if IGNORE not in c["metadata"].get("tags", [])]
    assert any(c["outputs"] for c in compared), "some outputs are checked, not all ignored"
    for c in code:
        for out in c["outputs"]:
            assert out["output_type"] != "error", f"{notebook.name} was saved with an error"
            assert "text/html" not in out.get("data", {}) or len(json.dumps(out)) < 50_000, \
                f"{notebook.name}: a large HTML output (use plotly's JSON output)"


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_under_nbval(notebook):
    env = dict(os.environ)
    env.setdefault("TPMLAB_HOME", str(ROOT / ".tpmlab-home"))
    env.pop("TPMLAB_SCHEDULER", None)  # notebooks that use connect() start their own cluster
    try:
        proc = subprocess.run(nbval_command(notebook), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{notebook.name} ran past {TIMEOUT}s:\n{(e.stdout or '')[-4000:]}")
    assert proc.returncode == 0, (f"nbval failed on {notebook.name}:\n{proc.stdout[-8000:]}\n"
                                  f"{proc.stderr[-2000:]}")
