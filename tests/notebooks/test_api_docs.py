"""The committed API reference (docs/api/*.md) is what docs/build_api.py makes from the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_is_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    build_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_api)
    fresh = build_api.build()
    committed = {p.name: p.read_text() for p in (ROOT / "docs" / "api").glob("*.md")}
    assert sorted(committed) == sorted(fresh), "pages added or removed: run python docs/build_api.py"
    stale = [name for name, text in fresh.items() if committed[name] != text]
    assert not stale, f"stale pages {stale}: run python docs/build_api.py"
