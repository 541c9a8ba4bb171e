"""Write the API reference, ``docs/api/*.md``, from the docstrings and signatures.

    python docs/build_api.py            # rewrite docs/api/
    python docs/build_api.py --check    # exit 1 if docs/api/ differs from the code

Only the standard library's :mod:`inspect` is used. Each page lists the public
classes and functions of one module in source order, with their signatures and
docstrings; ``tests/notebooks/test_api_docs.py`` fails when a page is stale.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api"

# (page, title, module or "lens:NAME", names to document or None for every public one)
PAGES: list[tuple[str, str, str, list[str] | None]] = [
    ("connect", "Connecting: `tpmlab.connect` and `Lab`", "tpmlab.lab", ["connect", "Lab"]),
    ("model", "The model proxy: `LabModel` and `Envoy`", "tpmlab.tracing.model", ["LabModel"]),
    ("envoy", "Module proxies: `Envoy`", "tpmlab.tracing.envoy", ["Envoy"]),
    ("tracing", "Traces and generation: `Trace`, `Generate`, `TraceResult`", "tpmlab.tracing.tracer",
     ["Trace", "Generate", "TraceResult"]),
    ("proxy", "Traced values: `Proxy`", "tpmlab.tracing.proxy", ["Proxy", "ValueNotReady"]),
    ("errors", "Errors", "tpmlab.errors", None),
    ("cluster", "The Dask engine: `DaskBackend`", "tpmlab.cluster.backend", ["DaskBackend"]),
    ("local", "The in-process engine: `LocalBackend`", "tpmlab.runtime.backend",
     ["Backend", "LocalBackend"]),
    ("lenses", "The lens zoo: registry and results", "tpmlab.lenses", None),
    ("lens-logit", "Lens `logit`", "lens:logit", None),
    ("lens-tuned", "Lens `tuned`", "lens:tuned", None),
    ("lens-attention", "Lens `attention`", "lens:attention", None),
    ("lens-memory-injection", "Lens `memory_injection`", "lens:memory_injection", None),
    ("lens-patching", "Lens `patching`", "lens:patching", None),
]


def load(target: str):
    if target.startswith("lens:"):
        import tpmlab.lenses

        return tpmlab.lenses.get(target.split(":", 1)[1])
    return importlib.import_module(target)


def clean(text: str) -> str:
    """Reprs that name memory addresses are not stable: keep the object's name only."""
    return re.sub(r"<(function|class|built-in function) ([\w.]+)[^>]*>", r"\2", text)


def signature(obj) -> str:
    try:
        text = clean(str(inspect.signature(obj)))
        return re.sub(r"(: |-> )'([^']*)'", r"\1\2", text)  # postponed annotations, unquoted
    except (TypeError, ValueError):
        return "(...)"


def doc(obj) -> str:
    text = inspect.getdoc(obj) or ""
    return text.strip() + "\n" if text.strip() else "*(no docstring)*\n"


def public_names(module, names: list[str] | None) -> list[str]:
    if names is not None:
        return names
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return sorted(exported, key=lambda n: (not inspect.isclass(getattr(module, n)), n))
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere
        found.append((inspect.getsourcelines(obj)[1], name))
    return [name for _, name in sorted(found)]


def members(cls) -> list[tuple[str, object]]:
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_") and not (name in ("__call__", "__getitem__") and value.__doc__):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            out.append((name, value))
    return out


def render_class(name: str, cls) -> list[str]:
    lines = [f"## class `{name}{signature(cls)}`\n", doc(cls)]
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    if bases:
        lines.insert(1, f"Bases: {', '.join(f'`{b}`' for b in bases)}\n")
    for mname, member in members(cls):
        if isinstance(member, property):
            lines += [f"### property `{name}.{mname}`\n", doc(member.fget) if member.fget else ""]
        else:
            lines += [f"### `{name}.{mname}{signature(member)}`\n", doc(member)]
    return lines


def render(page: str, title: str, target: str, names: list[str] | None) -> str:
    module = load(target)
    where = (f"lens plugin, loaded by `tpmlab.lenses.get({target.split(':')[1]!r})` "
             f"(file `lenses/{target.split(':')[1]}.py`)" if target.startswith("lens:")
             else f"module `{target}`")
    lines = [f"# {title}\n", f"*{where}; generated from the docstrings by `docs/build_api.py`.*\n"]
    if module.__doc__:
        lines.append(inspect.cleandoc(module.__doc__) + "\n")
    for name in public_names(module, names):
        obj = getattr(module, name)
        if inspect.isclass(obj):
            lines += render_class(name, obj)
        elif callable(obj):
            lines += [f"## `{name}{signature(obj)}`\n", doc(obj)]
        else:
            lines += [f"## `{name}`\n", f"`{clean(repr(obj))}`\n"]
    return "\n".join(lines).rstrip() + "\n"


def index() -> str:
    lines = ["# API reference\n",
             "*Generated from the docstrings by `docs/build_api.py`; "
             "`python docs/build_api.py` rewrites these pages.*\n"]
    lines += [f"- [{title}]({page}.md)" for page, title, _, _ in PAGES]
    return "\n".join(lines) + "\n"


def build() -> dict[str, str]:
    pages = {f"{page}.md": render(page, title, target, names)
             for page, title, target, names in PAGES}
    pages["index.md"] = index()
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    pages = build()
    if args.check:
        stale = [name for name, text in pages.items()
                 if not (args.out / name).is_file() or (args.out / name).read_text() != text]
        extra = sorted(p.name for p in args.out.glob("*.md") if p.name not in pages)
        for name in stale + extra:
            print(f"{args.out / name} is out of date; run python docs/build_api.py", file=sys.stderr)
        return 1 if stale or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.md"):
        if old.name not in pages:
            old.unlink()
    for name, text in pages.items():
        (args.out / name).write_text(text)
    print(f"wrote {len(pages)} pages to {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
