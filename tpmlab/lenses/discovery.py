"""Discovery and loading of lens plugins (see :mod:`tpmlab.lenses`)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any

from ..errors import TpmlabError
from .contract import LensInfo, describe

ENTRY_POINT_GROUP = "tpmlab.lenses"
PLUGIN_PACKAGE = "tpmlab.lenses._plugins"
PATH_ENV = "TPMLAB_LENS_PATH"

_lock = threading.RLock()
_loaded: dict[str, Any] = {}  # name -> loaded plugin (module or object)
_registered: dict[str, Any] = {}  # name -> object given to register()
_described: dict[str, LensInfo] = {}  # name -> its LensInfo, once checked


class LensNotFoundError(TpmlabError, LookupError):
    """No lens of that name in any lens folder or entry point."""

    http_status = 404


def lens_dirs() -> list[Path]:
    """Folders searched for plugin files, in order: the wheel's ``tpmlab/_lenses``,
    the checkout's ``lenses/`` next to the package, then ``TPMLAB_LENS_PATH``."""
    package = Path(__file__).resolve().parent.parent
    candidates = [package / "_lenses", package.parent / "lenses"]
    extra = os.environ.get(PATH_ENV, "")
    candidates += [Path(p).expanduser() for p in extra.split(os.pathsep) if p]
    seen, out = set(), []
    for d in candidates:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def _folder_plugins() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in lens_dirs():
        for path in sorted(folder.glob("*.py")):
            if path.stem.startswith("_") or not path.stem.isidentifier():
                continue
            found.setdefault(path.stem, path)
    return found


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in eps}


def sources() -> dict[str, str]:
    """Each available lens and where it comes from (a file path or ``entry point NAME = VALUE``)."""
    out: dict[str, str] = {name: "registered in this process" for name in _registered}
    for name, ep in _entry_points().items():
        out.setdefault(name, f"entry point {ep.name} = {ep.value}")
    for name, path in _folder_plugins().items():
        out[name] = str(path)  # the zoo's own files win over entry points of the same name
    for name in _registered:
        out[name] = "registered in this process"
    return dict(sorted(out.items()))


def available() -> list[str]:
    """Names of every lens that :func:`get` can load."""
    return list(sources())


def register(name: str, lens: Any) -> None:
    """Make ``lens`` (a module or any object keeping the lens contract) available as
    ``get(name)`` in this process; :class:`~tpmlab.lenses.contract.LensContractError` if it
    does not keep the contract."""
    describe(lens, name, "registered in this process")
    with _lock:
        _registered[name] = lens
        _loaded.pop(name, None)
        _described.pop(name, None)


def _package() -> types.ModuleType:
    pkg = sys.modules.get(PLUGIN_PACKAGE)
    if pkg is None:
        pkg = types.ModuleType(PLUGIN_PACKAGE, "Lens plugins loaded by path.")
        pkg.__path__ = []  # a package: plugin modules live under it
        sys.modules[PLUGIN_PACKAGE] = pkg
    return pkg


def _load_file(name: str, path: Path) -> types.ModuleType:
    module_name = f"{PLUGIN_PACKAGE}.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise LensNotFoundError(f"cannot load lens {name!r} from {path}")
    module = importlib.util.module_from_spec(spec)
    _package()
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def get(name: str) -> Any:
    """The lens called ``name``: a plugin module (or the object an entry point names),
    checked against the lens contract (:mod:`tpmlab.lenses.contract`).

    Raises :class:`LensNotFoundError` listing the available names, or
    :class:`~tpmlab.lenses.contract.LensContractError` naming what the plugin lacks.
    """
    return _entry(name)[0]


def info(name: str) -> LensInfo:
    """The lens called ``name`` as the dashboard, the sidebar and the docs read it: its
    ``NAME``, ``TITLE``, ``DESCRIPTION``, ``VIEW``, ``run`` and the defaults of its options."""
    return _entry(name)[1]


def catalog() -> tuple[list[LensInfo], dict[str, str]]:
    """Every available lens that loads and keeps the contract, and for the others the error
    (``{name: message}``): one broken plugin does not hide the rest."""
    found, errors = [], {}
    for name in available():
        try:
            found.append(info(name))
        except Exception as e:  # noqa: BLE001 - a third-party plugin may fail in any way
            errors[name] = f"{type(e).__name__}: {e}"
    return found, errors


def _entry(name: str) -> tuple[Any, LensInfo]:
    with _lock:
        if name in _loaded:
            return _loaded[name], _described[name]
        if name in _registered:
            lens, source = _registered[name], "registered in this process"
        else:
            files = _folder_plugins()
            if name in files:
                lens, source = _load_file(name, files[name]), str(files[name])
            else:
                eps = _entry_points()
                if name not in eps:
                    raise LensNotFoundError(
                        f"no lens named {name!r}; available: {', '.join(available()) or 'none'} "
                        f"(searched {[str(d) for d in lens_dirs()]} and the entry-point group "
                        f"{ENTRY_POINT_GROUP!r})")
                lens, source = eps[name].load(), f"entry point {eps[name].name} = {eps[name].value}"
        described = describe(lens, name, source)  # LensContractError naming what is missing
        _loaded[name], _described[name] = lens, described
        return lens, described


def _clear_cache() -> None:
    """Forget loaded plugins (for tests and after installing a new distribution)."""
    with _lock:
        _loaded.clear()
        _described.clear()
        for key in [k for k in sys.modules if k.startswith(PLUGIN_PACKAGE + ".")]:
            del sys.modules[key]
