"""Lens discovery: the checkout's lenses/ folder, an installed wheel's tpmlab/_lenses
folder, the "tpmlab.lenses" entry-point group and TPMLAB_LENS_PATH; and the lens contract
every plugin must keep (a plugin that breaks it is refused, naming what it lacks)."""

from __future__ import annotations

import importlib.metadata
import inspect
import shutil
import sys
import types
from pathlib import Path

import pytest

import tpmlab.lenses
from tpmlab.lenses import Axis, LensContractError, LensView, Metric, Option, discovery

REPO = Path(__file__).resolve().parents[2]
#: the zoo is whatever lenses/ holds: adding a lens edits no list
BUILTIN = sorted(p.stem for p in (REPO / "lenses").glob("*.py") if not p.stem.startswith("_"))

MINIMAL = '''
from tpmlab.lenses import Axis, LensView, Metric

NAME = {name!r}
TITLE = "{name} lens"
DESCRIPTION = "A lens for the discovery tests."
VIEW = LensView(inputs="prompt", rows=Axis("layer"), cols=Axis("position"),
                metrics=(Metric("x", "x"),))


def run(model, prompt, *, progress=None):
    return {value!r}
'''


def minimal_lens(name: str, value: object) -> str:
    """The source of a plugin keeping the contract whose run returns ``value``."""
    return MINIMAL.format(name=name, value=value)


def namespace_lens(name: str, value: object, **changes: object) -> types.SimpleNamespace:
    lens = types.SimpleNamespace(
        NAME=name, TITLE=f"{name} lens", DESCRIPTION="A lens for the discovery tests.",
        VIEW=LensView(inputs="prompt", rows=Axis("layer"), cols=Axis("position"),
                      metrics=(Metric("x", "x"),)),
        run=lambda model, prompt, *, progress=None: value)
    for key, v in changes.items():
        if v is None:
            delattr(lens, key)
        else:
            setattr(lens, key, v)
    return lens


@pytest.fixture(autouse=True)
def _fresh():
    discovery._clear_cache()
    yield
    discovery._clear_cache()


def test_checkout_folder_holds_the_zoo():
    assert REPO / "lenses" in tpmlab.lenses.lens_dirs()
    assert {"attention", "logit", "memory_injection", "patching", "residual", "tuned"} <= set(BUILTIN)
    for name in BUILTIN:
        assert name in tpmlab.lenses.available(), name
    logit = tpmlab.lenses.get("logit")
    assert logit.__name__ == "tpmlab.lenses._plugins.logit"
    assert Path(logit.__file__) == REPO / "lenses" / "logit.py"
    assert tpmlab.lenses.get("logit") is logit  # loaded once
    assert "lenses" not in sys.modules or not hasattr(sys.modules["lenses"], "logit")


@pytest.mark.parametrize("name", BUILTIN)
def test_every_zoo_lens_keeps_the_contract(name):
    """What the dashboard, the sidebar and the docs rely on, read from the module alone."""
    lens = tpmlab.lenses.get(name)
    assert tpmlab.lenses.check(lens, name) == []
    info = tpmlab.lenses.info(name)
    assert (info.name, info.title, info.description) == (name, lens.TITLE, lens.DESCRIPTION)
    assert "\n" not in info.description and info.to_dict()["inputs"] == info.view.inputs
    params = inspect.signature(lens.run).parameters
    for option in info.view.options:  # every option is a keyword of run, its default run's own
        assert option.name in params, option.name
        default = params[option.name].default
        assert info.defaults[option.name] == (None if default is inspect.Parameter.empty else default)
    assert params["progress"].default is None
    result_types = {c for c in vars(lens).values() if isinstance(c, type)
                    and issubclass(c, tpmlab.lenses.LensResult) and c.__module__ == lens.__name__}
    for result_type in result_types:  # its results describe themselves with the same view
        assert (result_type.lens, result_type.title, result_type.view) == (name, lens.TITLE, lens.VIEW)
    assert info.view.example.get("prompt"), "a small example for docs and tests"


def test_unknown_name_lists_what_exists():
    with pytest.raises(tpmlab.lenses.LensNotFoundError, match="available: .*logit"):
        tpmlab.lenses.get("no-such-lens")


def test_installed_wheel_folder(tmp_path, monkeypatch):
    """A wheel has the zoo at tpmlab/_lenses; simulate an installed package tree."""
    pkg = tmp_path / "site" / "tpmlab"
    shutil.copytree(REPO / "tpmlab" / "lenses", pkg / "lenses")
    (pkg / "_lenses").mkdir()
    (pkg / "_lenses" / "wheel_only.py").write_text(minimal_lens("wheel_only", 42))
    (pkg / "_lenses" / "_private.py").write_text("raise RuntimeError('not a lens')\n")
    fake_file = pkg / "lenses" / "discovery.py"
    monkeypatch.setattr(discovery, "__file__", str(fake_file))
    dirs = discovery.lens_dirs()
    assert dirs[0] == pkg / "_lenses"
    assert "wheel_only" in discovery.available() and "_private" not in discovery.available()
    assert discovery.get("wheel_only").run(None, "p") == 42


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A third-party distribution declares [project.entry-points."tpmlab.lenses"]."""
    mod = types.ModuleType("thirdparty_lens")
    exec(minimal_lens("thirdparty", "third party"), mod.__dict__)
    monkeypatch.setitem(sys.modules, "thirdparty_lens", mod)
    ep = importlib.metadata.EntryPoint(name="thirdparty", value="thirdparty_lens",
                                       group=discovery.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points

    def fake_entry_points(**kw):
        if kw.get("group") == discovery.ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints([ep])
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    assert "thirdparty" in tpmlab.lenses.available()
    assert "entry point" in tpmlab.lenses.sources()["thirdparty"]
    assert tpmlab.lenses.get("thirdparty").run(None, "p") == "third party"
    assert "entry point" in tpmlab.lenses.info("thirdparty").source


def test_entry_point_from_a_distribution_on_sys_path(tmp_path, monkeypatch):
    """The same through real package metadata: a *.dist-info folder with entry_points.txt."""
    site = tmp_path / "site"
    (site / "acme_lens").mkdir(parents=True)
    (site / "acme_lens" / "__init__.py").write_text(minimal_lens("acme", "acme"))
    info = site / "acme_lens-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-lens\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[tpmlab.lenses]\nacme = acme_lens\n")
    monkeypatch.syspath_prepend(str(site))
    assert tpmlab.lenses.get("acme").run(None, "p") == "acme"


def test_path_env_and_register(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text(minimal_lens("mine", "mine"))
    monkeypatch.setenv(discovery.PATH_ENV, str(tmp_path))
    assert tpmlab.lenses.get("mine").run(None, "p") == "mine"
    tpmlab.lenses.register("inline", namespace_lens("inline", 7))
    try:
        assert tpmlab.lenses.get("inline").run(None, "p") == 7
        assert tpmlab.lenses.info("inline").source == "registered in this process"
    finally:
        discovery._registered.pop("inline")


@pytest.mark.parametrize("changes,problem", [
    ({"VIEW": None}, "no VIEW"),
    ({"run": None, "TITLE": None}, "no TITLE; no run"),
    ({"NAME": "other"}, "NAME is 'other' but the lens is registered as 'broken'"),
    ({"DESCRIPTION": "two\nlines"}, "DESCRIPTION is not one line"),
    ({"VIEW": {"inputs": "prompt"}}, "VIEW is a dict, not a tpmlab.lenses.LensView"),
    ({"run": lambda model, prompt: 0}, "run() takes no progress= callback"),
    ({"run": lambda model, *, progress=None: 0}, "inputs 'prompt' need 2: model, prompt"),
])
def test_a_plugin_breaking_the_contract_is_refused_naming_what_it_lacks(changes, problem):
    with pytest.raises(LensContractError, match="does not keep the lens contract") as e:
        tpmlab.lenses.register("broken", namespace_lens("broken", 0, **changes))
    assert problem in str(e.value)
    assert "broken" not in tpmlab.lenses.available()


def test_an_option_must_be_a_keyword_of_run():
    view = LensView(inputs="pair", rows=Axis("layer"), cols=Axis("position"),
                    metrics=(Metric("x", "x"),), options=(Option("alpha", "float"),))
    lens = namespace_lens("opt", 0, VIEW=view, run=lambda model, clean, corrupted, *, progress=None: 0)
    assert tpmlab.lenses.check(lens, "opt") == ["option 'alpha' is not a keyword parameter of run()"]
    lens.run = lambda model, clean, corrupted, *, alpha=0.5, progress=None: 0
    assert tpmlab.lenses.check(lens, "opt") == []
    lens.VIEW = LensView(inputs="pair", rows=Axis("layer"), cols=Axis("position"),
                         metrics=(Metric("x", "x"),), options=(Option("lens", "object"),))
    lens.run = lambda model, clean, corrupted, *, lens=None, progress=None: 0
    assert tpmlab.lenses.check(lens, "opt") == [
        "option 'lens' has a reserved name (model, lens, prompt, run, metric, progress)"]


def test_view_refuses_what_no_dashboard_could_show():
    with pytest.raises(LensContractError, match="inputs 'three' is not one of"):
        LensView(inputs="three", rows=Axis("a"), cols=Axis("b"), metrics=(Metric("x", "x"),))
    with pytest.raises(LensContractError, match="at least one metric"):
        LensView(inputs="prompt", rows=Axis("a"), cols=Axis("b"), metrics=())
    with pytest.raises(LensContractError, match="metric names repeat"):
        LensView(inputs="prompt", rows=Axis("a"), cols=Axis("b"),
                 metrics=(Metric("x", "x"), Metric("x", "y")))
    with pytest.raises(LensContractError, match="the axes need two names"):
        LensView(inputs="prompt", rows=Axis("layer"), cols=Axis("layer"), metrics=(Metric("x", "x"),))
    with pytest.raises(LensContractError, match="kind 'complex' is not one of"):
        Option("z", "complex")
    with pytest.raises(LensContractError, match="choices go with kind 'choice'"):
        Option("z", "choice")
    assert not Option("obj", "object").shown  # an arbitrary object has no control


def test_a_broken_plugin_does_not_hide_the_others(tmp_path, monkeypatch):
    (tmp_path / "fine.py").write_text(minimal_lens("fine", 1))
    (tmp_path / "crashes.py").write_text("raise RuntimeError('missing dependency xyz')\n")
    (tmp_path / "incomplete.py").write_text("NAME = 'incomplete'\ndef run(model, prompt):\n    return 0\n")
    monkeypatch.setenv(discovery.PATH_ENV, str(tmp_path))
    found, errors = tpmlab.lenses.catalog()
    assert {"fine", *BUILTIN} <= {i.name for i in found}
    assert "RuntimeError: missing dependency xyz" in errors["crashes"]
    assert "LensContractError" in errors["incomplete"] and "no TITLE" in errors["incomplete"]
    assert "no VIEW" in errors["incomplete"]
