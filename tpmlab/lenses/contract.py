"""The lens contract: what every lens module exports, so that the dashboard, the sidebar
and the API reference read a lens without knowing it.

A lens is one Python module (a file in the repository's ``lenses/``, a file in a folder on
``TPMLAB_LENS_PATH``, or a module named by an entry point of the group ``tpmlab.lenses``)
that exports:

=================  ===========================================================================
``NAME``           its name in the registry (``"logit"``)
``TITLE``          a short title for menus (``"logit lens"``)
``DESCRIPTION``    one line: what it measures
``VIEW``           a :class:`LensView`: its inputs, options, axes, metrics and detail panel
``run``            ``run(model, *inputs, progress=None, **options) -> LensResult``
=================  ===========================================================================

``run`` takes the model, then the inputs ``VIEW.inputs`` names (:data:`INPUTS`: one
prompt, a clean/corrupted pair, or prompts with their answers), then keyword options.
Every option the view lists is a keyword parameter of ``run``, and ``run``'s signature
holds its default (one place for each default). ``progress`` is a callback
``progress(done, total, text)`` that ``run`` calls between forward passes (and training
steps); it may raise (e.g. :class:`Cancelled`) to stop the lens there. Nothing global is
patched.

``run`` returns a :class:`~tpmlab.lenses.result.LensResult` whose subclass implements the
grid interface the dashboard reads: ``row_labels()``, ``col_labels()``,
``metric(name) -> [rows, cols]``, ``cell_text``/``hover`` (the word and the hover text of
each cell), ``cell(row, col) -> Cell`` (the detail panel) and, if ``VIEW.bars``,
``bars(row, col) -> Bars``. Computation returns data; ``.plot()`` draws it, without running
anything.

:func:`check` lists what a module lacks; the registry refuses a plugin that does not keep
the contract (:class:`LensContractError` names every missing part).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import TpmlabError

#: ``progress(done, total, text)``: called by a lens between passes; may raise to cancel.
Progress = Callable[[int, int, str], None]

#: The inputs a lens takes, by kind: how many positional arguments ``run`` has after the
#: model, and what they are.
INPUTS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),                  # one prompt (text or token ids)
    "pair": ("clean", "corrupted"),         # a clean and a corrupted prompt
    "prompts": ("prompts", "answers"),      # several prompts, each with its expected answer
}

#: Option kinds and the Python values they hold.
OPTION_KINDS: dict[str, str] = {
    "text": "str",
    "int": "int",
    "float": "float",
    "bool": "bool",
    "choice": "one of `choices` (str)",
    "floats": "a sequence of floats (written `1, 2, 4`)",
    "position": "a token position of the prompt (int; negative counts from the end)",
    "object": "any Python object (not a widget: set it in code)",
}

#: The names a lens module exports (see the module docstring).
EXPORTS = ("NAME", "TITLE", "DESCRIPTION", "VIEW", "run")

#: Keywords of ``tpmlab.widgets.dashboard(model, lens, prompt, *, run, metric, **options)``
#: and of ``run`` itself: no option may take these names.
RESERVED = ("model", "lens", "prompt", "run", "metric", "progress")


class Cancelled(TpmlabError):
    """Raised by a progress callback to stop a lens between passes (its result is dropped)."""


class LensContractError(TpmlabError, TypeError):
    """A lens plugin does not keep the lens contract; the message names what is missing."""


class LensInputError(TpmlabError, ValueError):
    """A lens was given input it cannot use (a prompt, an answer, an option's value); the
    message names the input and what it should be."""

    http_status = 400


@dataclass(frozen=True)
class Option:
    """One keyword option of a lens's ``run``, as a control.

    ``kind``: one of :data:`OPTION_KINDS`; ``label``: the control's caption (default: the
    name); ``help``: one line for the docs and the placeholder; ``choices``: for ``"choice"``;
    ``shown``: a control in the dashboard (else set only as ``dashboard(..., name=value)``);
    ``live``: changing the control runs the lens at once (results are kept per request).
    The default is ``run``'s own (see :func:`describe`).
    """

    name: str
    kind: str
    label: str = ""
    help: str = ""
    choices: tuple[str, ...] = ()
    shown: bool = True
    live: bool = False

    def __post_init__(self) -> None:
        if self.kind not in OPTION_KINDS:
            raise LensContractError(f"option {self.name!r}: kind {self.kind!r} is not one of "
                             f"{sorted(OPTION_KINDS)}")
        if (self.kind == "choice") != bool(self.choices):
            raise LensContractError(f"option {self.name!r}: choices go with kind 'choice' (and only it)")
        if self.kind == "object" and self.shown:
            object.__setattr__(self, "shown", False)  # no control can hold an arbitrary object
        if not self.label:
            object.__setattr__(self, "label", self.name)


@dataclass(frozen=True)
class Axis:
    """One axis of the lens's grid: ``name`` names its control (``"layer"``), ``title`` is
    the axis title (default: the name). The labels of its cells come from the result."""

    name: str
    title: str = ""

    def __post_init__(self) -> None:
        if not self.title:
            object.__setattr__(self, "title", self.name)


@dataclass(frozen=True)
class Metric:
    """One value per grid cell, ``result.metric(name)`` ``[rows, cols]``, and how to colour it.

    ``label``: the menu entry; ``colorbar``: the colour bar's title (default: the label);
    ``zmin``/``zmax``: a fixed colour range (e.g. 0..1 for probabilities); ``centered``:
    ``True`` draws the values on the diverging scale ``diverging`` centred at zero, ``None``
    does so only when some value is negative; ``log10``: colour by ``log10(max(value, 1))``
    (ranks).
    """

    name: str
    label: str
    colorbar: str = ""
    colorscale: str = "Viridis"
    zmin: float | None = None
    zmax: float | None = None
    centered: bool | None = False
    diverging: str = "RdBu"
    log10: bool = False

    def __post_init__(self) -> None:
        if not self.colorbar:
            object.__setattr__(self, "colorbar", self.label)


@dataclass(frozen=True)
class LensView:
    """How a lens is shown: what goes in, the grid that comes out, what a cell tells.

    ``inputs``: a key of :data:`INPUTS`; ``rows``/``cols``: the grid's axes; ``metrics``:
    what can colour the grid (the first is the default); ``options``: the keyword options
    of ``run`` offered as controls; ``detail``: one line saying what a selected cell's panel
    shows; ``bars``: the figure also shows ``result.bars(row, col)`` beside the heatmap;
    ``example``: inputs and options of a small run, as ``dashboard(model, NAME, **example)``
    takes them (``prompt``: the text of the prompt box; for ``"pair"`` a ``(clean,
    corrupted)`` tuple; for ``"prompts"`` lines ``prompt => answer``).
    """

    inputs: str
    rows: Axis
    cols: Axis
    metrics: tuple[Metric, ...]
    options: tuple[Option, ...] = ()
    detail: str = ""
    bars: bool = False
    example: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise LensContractError(f"inputs {self.inputs!r} is not one of {sorted(INPUTS)}")
        if not self.metrics:
            raise LensContractError("a lens view needs at least one metric")
        if self.rows.name == self.cols.name or "metric" in (self.rows.name, self.cols.name):
            raise LensContractError(f"the axes need two names other than 'metric' (they name the "
                             f"dashboard's controls), got {self.rows.name!r} and {self.cols.name!r}")
        for kind, names in (("metric", [m.name for m in self.metrics]),
                            ("option", [o.name for o in self.options])):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise LensContractError(f"{kind} names repeat: {repeated}")
        object.__setattr__(self, "example", MappingProxyType(dict(self.example)))

    def metric(self, name: str | None = None) -> Metric:
        """The metric called ``name`` (default: the first); :class:`LensInputError` (a ``ValueError``) lists the names."""
        if name is None:
            return self.metrics[0]
        for m in self.metrics:
            if m.name == name:
                return m
        raise LensInputError(f"unknown metric {name!r}; choose from {[m.name for m in self.metrics]}")

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)


# -- what a result hands the dashboard --------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """A two-column table of the detail panel: ``header`` and ``(key, value)`` rows.
    ``tokens``: the keys are tokens (shown quoted, so that spaces show)."""

    header: tuple[str, str]
    rows: tuple[tuple[str, float | str], ...]
    tokens: bool = True


@dataclass(frozen=True)
class Cell:
    """The detail panel of one grid cell: a title, the token at that place (if any),
    tables, and named facts (strings, formatted for people)."""

    title: str
    token: str | None = None
    tables: tuple[Table, ...] = ()
    facts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Bars:
    """A grouped bar chart beside the heatmap, for the selected cell: one bar per category
    and series; ``series`` is ``(name, values, colour)`` per group."""

    title: str
    categories: tuple[str, ...]
    series: tuple[tuple[str, tuple[float, ...], str], ...]
    y_title: str = ""


# -- checking and describing a lens module ----------------------------------------------------------

@dataclass(frozen=True)
class LensInfo:
    """A lens as the dashboard, the sidebar and the docs see it: the module's exports and
    the defaults of its options (read from ``run``'s signature)."""

    name: str
    title: str
    description: str
    view: LensView
    run: Callable[..., Any]
    defaults: Mapping[str, Any]
    source: str = ""

    def accepts(self, option: str) -> bool:
        """Whether ``run`` takes ``option`` as a keyword."""
        _, keywords, var_kw = _parameters(self.run)
        return option in keywords or var_kw

    def to_dict(self) -> dict[str, Any]:
        """What the sidebar's REST endpoint lists (JSON)."""
        return {"name": self.name, "title": self.title, "description": self.description,
                "inputs": self.view.inputs}


def _parameters(run: Any) -> tuple[list[inspect.Parameter], dict[str, inspect.Parameter], bool]:
    params = list(inspect.signature(run).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return positional, keywords, any(p.kind == p.VAR_KEYWORD for p in params)


def check(lens: Any, name: str | None = None) -> list[str]:
    """What ``lens`` (a module or any object) lacks to keep the contract; empty if nothing.

    ``name``: the name it is registered under (its ``NAME`` must be the same)."""
    problems = [f"no {attr}" for attr in EXPORTS if not hasattr(lens, attr)]
    if problems:
        return problems
    for attr in ("NAME", "TITLE", "DESCRIPTION"):
        value = getattr(lens, attr)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{attr} is not a non-empty string")
        elif "\n" in value.strip():
            problems.append(f"{attr} is not one line")
    if name is not None and getattr(lens, "NAME", None) != name:
        problems.append(f"NAME is {lens.NAME!r} but the lens is registered as {name!r}")
    view = lens.VIEW
    if not isinstance(view, LensView):
        problems.append(f"VIEW is a {type(view).__name__}, not a tpmlab.lenses.LensView")
    if not callable(lens.run):
        return problems + ["run is not callable"]
    try:
        positional, keywords, var_kw = _parameters(lens.run)
    except (TypeError, ValueError):
        return problems + ["run has no signature to read"]
    if "progress" not in keywords and not var_kw:
        problems.append("run() takes no progress= callback")
    if isinstance(view, LensView):
        wanted = 1 + len(INPUTS[view.inputs])
        if len(positional) < wanted:
            problems.append(f"run() takes {len(positional)} positional argument(s); inputs "
                            f"{view.inputs!r} need {wanted}: model, {', '.join(INPUTS[view.inputs])}")
        for option in view.options:
            if option.name in RESERVED:
                problems.append(f"option {option.name!r} has a reserved name ({', '.join(RESERVED)})")
            elif option.name not in keywords and not var_kw:
                problems.append(f"option {option.name!r} is not a keyword parameter of run()")
    return problems


def describe(lens: Any, name: str | None = None, source: str = "") -> LensInfo:
    """The :class:`LensInfo` of ``lens``; :class:`LensContractError` if it breaks the contract."""
    problems = check(lens, name)
    if problems:
        raise LensContractError(f"lens {name or getattr(lens, 'NAME', lens)!r}"
                                + (f" ({source})" if source else "")
                                + " does not keep the lens contract (tpmlab.lenses.contract): "
                                + "; ".join(problems))
    _, keywords, _ = _parameters(lens.run)
    defaults = {}
    for option in lens.VIEW.options:
        p = keywords.get(option.name)
        defaults[option.name] = None if p is None or p.default is p.empty else p.default
    return LensInfo(name=lens.NAME, title=lens.TITLE.strip(), description=lens.DESCRIPTION.strip(),
                    view=lens.VIEW, run=lens.run, defaults=MappingProxyType(defaults),
                    source=source)


# -- inputs as text -----------------------------------------------------------------------------------

def parse_prompts(text: str) -> tuple[list[str], list[str]]:
    """The ``"prompts"`` input as a dashboard's text box holds it: ``prompt => answer``, one
    per line or separated by ``;``. The answer is read as it follows the prompt, so a space
    is put before it (``=> Paris`` is the token ``" Paris"``)."""
    prompts, answers = [], []
    for part in text.replace("\n", ";").split(";"):
        if not part.strip():
            continue
        if "=>" not in part:
            raise LensInputError(f"write each prompt as 'prompt => answer', got {part.strip()!r}")
        prompt, answer = part.split("=>", 1)
        prompts.append(prompt.strip())
        answers.append(" " + answer.strip())
    if not prompts:
        raise LensInputError("enter at least one line 'prompt => answer'")
    return prompts, answers


class Steps:
    """Report one phase of work, ``total`` steps called ``text``: to a progress callback, to a
    console bar (``progress=True``: tqdm), or nowhere (``None``/``False``)."""

    def __init__(self, progress: Progress | bool | None, total: int, text: str) -> None:
        self.total, self.text = total, text
        self.callback: Progress | None = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=text)

    def __call__(self, done: int, note: str = "") -> None:
        """``done`` of ``total`` steps are finished (the callback may raise to cancel)."""
        if self.callback is not None:
            self.callback(done, self.total, self.text)
        elif self.bar is not None:
            self.bar.update(done - self.bar.n)
            if note:
                self.bar.set_postfix_str(note)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
