"""The sidebar's TypeScript unit tests (jest: polling/backoff, status -> view model,
notebook templates), run through jlpm so that one test command covers them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXTENSION = Path(__file__).resolve().parents[2] / "extension"


def test_jest_suite():
    jlpm = shutil.which("jlpm")
    if shutil.which("node") is None or jlpm is None:
        pytest.skip("node or jlpm is not installed")
    if not (EXTENSION / "node_modules" / ".bin" / "jest").exists():
        pytest.skip("extension/node_modules is missing: run `jlpm install` in extension/ "
                    "(scripts/setup.sh does it through the package build)")
    r = subprocess.run([jlpm, "test", "--ci", "--silent"], cwd=EXTENSION, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
