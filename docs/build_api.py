"""Write the API reference, ``docs/api/*.md``, from the docstrings and signatures.

    python docs/build_api.py            # rewrite docs/api/
    python docs/build_api.py --check    # exit 1 if docs/api/ differs from the code

Only the standard library's :mod:`inspect` is used. Each page lists the public
classes and functions of one module in source order, with their signatures and
docstrings; ``tests/notebooks/test_api_docs.py`` fails when a page is stale.

The lens pages come from the lens registry, one per lens of the zoo (``lenses/``), each
with its view (inputs, options and their defaults, axes, metrics, detail panel) read from
the lens contract: adding a lens adds its page with no edit here.
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

# (page, title, module, names to document or None for every public one); the lens pages follow
PAGES: list[tuple[str, str, str, list[str] | None]] = [
    ("connect", "Connecting: `tpmlab.connect` and `Lab`", "tpmlab.lab", ["connect", "Lab"]),
    ("model", "The model proxy: `LabModel` and `Envoy`", "tpmlab.tracing.model", ["LabModel"]),
    ("envoy", "Module proxies: `Envoy`", "tpmlab.tracing.envoy", ["Envoy"]),
    ("tracing", "Traces: `Trace`, `TraceResult`", "tpmlab.tracing.tracer",
     ["Trace", "TraceResult"]),
    ("generate", "Generation: `Generate`", "tpmlab.tracing.generate", ["Generate"]),
    ("proxy", "Traced values: `Proxy`", "tpmlab.tracing.proxy", ["Proxy", "ValueNotReady"]),
    ("errors", "Errors", "tpmlab.errors", None),
    ("cluster", "The Dask engine: `DaskBackend`", "tpmlab.cluster.backend", ["DaskBackend"]),
    ("remote", "Remote values: `tpmlab.remote`", "tpmlab.remote",
     ["RemoteValue", "concatenate", "stack", "check_index", "check_reduction"]),
    ("deployments", "Deployments on the scheduler: `tpmlab.cluster.deployments`",
     "tpmlab.cluster.deployments", None),
    ("gateway-errors", "Errors as HTTP answers: `tpmlab.gateway.errors`", "tpmlab.gateway.errors",
     None),
    ("local", "The in-process engine: `LocalBackend`", "tpmlab.runtime.backend",
     ["Backend", "LocalBackend"]),
    ("lenses", "The lens zoo: the lens contract, registry and results", "tpmlab.lenses", None),
    ("lens-helpers", "Helpers for writing a lens: `tpmlab.lenses.common`", "tpmlab.lenses.common",
     None),
    ("widgets", "Lens dashboards: `tpmlab.widgets`", "tpmlab.widgets", None),
]
ZOO = ROOT / "lenses"


def lens_pages(zoo: Path = ZOO) -> list[tuple[str, str, str, list[str] | None]]:
    """One page per registered lens whose module is a file of ``zoo``, in name order."""
    import tpmlab.lenses

    pages = []
    for name, source in tpmlab.lenses.sources().items():
        if Path(source).parent.resolve() == zoo.resolve():
            info = tpmlab.lenses.info(name)
            pages.append((f"lens-{name.replace('_', '-')}", f"Lens `{name}`: {info.title}",
                          f"lens:{name}", None))
    return pages


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


def render_view(name: str) -> list[str]:
    """The lens's view (its contract with the dashboard) as tables."""
    import tpmlab.lenses
    from tpmlab.lenses.contract import INPUTS

    info = tpmlab.lenses.info(name)
    v = info.view
    lines = ["## The lens's view\n",
             f"*{info.description}* Inputs: `{v.inputs}` "
             f"(`run(model, {', '.join(INPUTS[v.inputs])}, ..., progress=None)`). "
             f"Grid: rows `{v.rows.title}` x columns `{v.cols.title}`."
             + (" Beside the heatmap: bars of the selected cell." if v.bars else "") + "\n",
             f"Detail panel: {v.detail}\n" if v.detail else ""]
    if v.options:
        params = inspect.signature(info.run).parameters
        lines += ["| option | kind | default | control | what |", "|---|---|---|---|---|"]
        for o in v.options:
            control = ("live " if o.live else "") + ("shown" if o.shown else "code only")
            required = o.name in params and params[o.name].default is inspect.Parameter.empty
            default = "required" if required else f"`{clean(repr(info.defaults[o.name]))}`"
            lines.append(f"| `{o.name}` | {o.kind}{' ' + str(list(o.choices)) if o.choices else ''} "
                         f"| {default} | {control} | {o.help} |")
        lines.append("")
    lines += ["| metric | menu label | colour |", "|---|---|---|"]
    for m in v.metrics:
        colour = f"{m.diverging} centred at 0" if m.centered else m.colorscale
        if m.centered is None:
            colour = f"{m.colorscale}; {m.diverging} centred at 0 when a value is negative"
        if m.zmin is not None or m.zmax is not None:
            colour += f", range {m.zmin}..{m.zmax}"
        lines.append(f"| `{m.name}` | {m.label} | {colour}{', log10' if m.log10 else ''} |")
    return lines + [""]


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
    lens = target.split(":", 1)[1] if target.startswith("lens:") else None
    where = (f"lens plugin, loaded by `tpmlab.lenses.get({lens!r})` (file `lenses/"
             f"{Path(module.__file__).name}`)" if lens else f"module `{target}`")
    lines = [f"# {title}\n", f"*{where}; generated from the docstrings by `docs/build_api.py`.*\n"]
    if module.__doc__:
        lines.append(inspect.cleandoc(module.__doc__) + "\n")
    if lens:
        lines += render_view(lens)
    seen: dict[int, str] = {}
    for name in public_names(module, names):
        obj = getattr(module, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and id(obj) in seen:
            lines += [f"## `{name}`\n", f"The same as `{seen[id(obj)]}`.\n"]
            continue
        seen[id(obj)] = name
        if inspect.isclass(obj):
            lines += render_class(name, obj)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            lines += [f"## `{name}{signature(obj)}`\n", doc(obj)]
        else:
            lines += [f"## `{name}`\n", f"`{clean(repr(obj))}`\n"]
    return "\n".join(lines).rstrip() + "\n"


def index(pages: list[tuple[str, str, str, list[str] | None]]) -> str:
    lines = ["# API reference\n",
             "*Generated from the docstrings by `docs/build_api.py`; "
             "`python docs/build_api.py` rewrites these pages.*\n"]
    lines += [f"- [{title}]({page}.md)" for page, title, _, _ in pages]
    return "\n".join(lines) + "\n"


def build(zoo: Path = ZOO) -> dict[str, str]:
    """Every page's text by file name: the modules of :data:`PAGES`, then one page per lens
    of ``zoo`` (the repository's ``lenses/`` folder)."""
    listed = PAGES + lens_pages(zoo)
    pages = {f"{page}.md": render(page, title, target, names)
             for page, title, target, names in listed}
    pages["index.md"] = index(listed)
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
