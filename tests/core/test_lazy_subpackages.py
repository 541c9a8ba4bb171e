"""``import tpmlab`` is light, and the subpackages the docs use are reachable as attributes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import tpmlab


def _fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned here."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_tpmlab_loads_no_optional_subpackage():
    seen = _fresh("""
        import json, sys
        import tpmlab
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("tpmlab."))))
    """)
    loaded = {m.split(".")[1] for m in seen}
    for name in ("lenses", "widgets", "store", "gateway", "server", "cluster", "models"):
        assert name not in loaded, f"import tpmlab imported tpmlab.{name}"
    assert not {"ipywidgets", "plotly", "fastapi"} & set(seen)


def test_subpackages_are_attributes_after_a_plain_import():
    seen = _fresh("""
        import json, sys
        import tpmlab
        logit = tpmlab.lenses.get("logit")
        out = {
            "lens": getattr(logit, "__name__", type(logit).__name__),
            "widgets": hasattr(tpmlab.widgets, "dashboard"),
            "store": tpmlab.store.Store.__name__,
            "lazy_in_dir": all(n in dir(tpmlab) for n in ("lenses", "widgets", "store")),
            "loaded": "tpmlab.widgets" in sys.modules,
        }
        print(json.dumps(out))
    """)
    assert seen["lens"].endswith("logit")
    assert seen == {**seen, "widgets": True, "store": "Store", "lazy_in_dir": True,
                    "loaded": True}


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'lensez'"):
        tpmlab.lensez  # noqa: B018
    assert tpmlab.store is sys.modules["tpmlab.store"]
