"""The committed API reference (docs/api/*.md) is what docs/build_api.py makes from the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_is_up_to_date():
    # A fresh interpreter: in this one, earlier tests may have loaded lens plugins from
    # other places (a wheel layout, an entry point), which changes what inspect reports.
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "build_api.py"), "--check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
