"""Lens discovery: the checkout's lenses/ folder, an installed wheel's tpmlab/_lenses
folder, and the "tpmlab.lenses" entry-point group."""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
import types
from pathlib import Path

import pytest

import tpmlab.lenses
from tpmlab.lenses import registry

REPO = Path(__file__).resolve().parents[2]
BUILTIN = ["attention", "logit", "memory_injection", "patching", "tuned"]


@pytest.fixture(autouse=True)
def _fresh():
    registry._clear_cache()
    yield
    registry._clear_cache()


def test_checkout_folder_holds_the_zoo():
    assert REPO / "lenses" in tpmlab.lenses.lens_dirs()
    for name in BUILTIN:
        assert name in tpmlab.lenses.available(), name
    logit = tpmlab.lenses.get("logit")
    assert logit.__name__ == "tpmlab.lenses._plugins.logit"
    assert Path(logit.__file__) == REPO / "lenses" / "logit.py"
    assert tpmlab.lenses.get("logit") is logit  # loaded once
    assert "lenses" not in sys.modules or not hasattr(sys.modules["lenses"], "logit")


def test_unknown_name_lists_what_exists():
    with pytest.raises(tpmlab.lenses.LensNotFoundError, match="available: .*logit"):
        tpmlab.lenses.get("no-such-lens")


def test_installed_wheel_folder(tmp_path, monkeypatch):
    """A wheel has the zoo at tpmlab/_lenses; simulate an installed package tree."""
    pkg = tmp_path / "site" / "tpmlab"
    shutil.copytree(REPO / "tpmlab" / "lenses", pkg / "lenses")
    (pkg / "_lenses").mkdir()
    (pkg / "_lenses" / "wheel_only.py").write_text("NAME = 'wheel_only'\ndef run():\n    return 42\n")
    (pkg / "_lenses" / "_private.py").write_text("raise RuntimeError('not a lens')\n")
    fake_file = pkg / "lenses" / "registry.py"
    monkeypatch.setattr(registry, "__file__", str(fake_file))
    dirs = registry.lens_dirs()
    assert dirs[0] == pkg / "_lenses"
    assert "wheel_only" in registry.available() and "_private" not in registry.available()
    assert registry.get("wheel_only").run() == 42


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A third-party distribution declares [project.entry-points."tpmlab.lenses"]."""
    mod = types.ModuleType("thirdparty_lens")
    mod.run = lambda: "third party"
    monkeypatch.setitem(sys.modules, "thirdparty_lens", mod)
    ep = importlib.metadata.EntryPoint(name="thirdparty", value="thirdparty_lens",
                                       group=registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points

    def fake_entry_points(**kw):
        if kw.get("group") == registry.ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints([ep])
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    assert "thirdparty" in tpmlab.lenses.available()
    assert "entry point" in tpmlab.lenses.sources()["thirdparty"]
    assert tpmlab.lenses.get("thirdparty").run() == "third party"


def test_entry_point_from_a_distribution_on_sys_path(tmp_path, monkeypatch):
    """The same through real package metadata: a *.dist-info folder with entry_points.txt."""
    site = tmp_path / "site"
    (site / "acme_lens").mkdir(parents=True)
    (site / "acme_lens" / "__init__.py").write_text("def run():\n    return 'acme'\n")
    info = site / "acme_lens-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-lens\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[tpmlab.lenses]\nacme = acme_lens\n")
    monkeypatch.syspath_prepend(str(site))
    assert tpmlab.lenses.get("acme").run() == "acme"


def test_path_env_and_register(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text("def run():\n    return 'mine'\n")
    monkeypatch.setenv(registry.PATH_ENV, str(tmp_path))
    assert tpmlab.lenses.get("mine").run() == "mine"
    tpmlab.lenses.register("inline", types.SimpleNamespace(run=lambda: 7))
    try:
        assert tpmlab.lenses.get("inline").run() == 7
    finally:
        registry._registered.pop("inline")
