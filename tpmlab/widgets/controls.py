"""ipywidgets controls for a lens's inputs and options, made from its view alone.

Each :class:`~tpmlab.lenses.Option` kind has one control (:func:`make`) and one way to read
it back into the value ``run`` takes (:func:`read`); the prompt boxes follow the view's
``inputs`` (:func:`input_boxes`, :func:`read_inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..lenses.contract import LensContractError, LensInputError, Option, parse_prompts


def layout(**kw: Any):
    import ipywidgets as w

    return w.Layout(**kw)


def _floats_text(value: Any) -> str:
    return ", ".join(f"{float(t):g}" for t in value) if value is not None else ""


def make(option: Option, value: Any) -> Any:
    """The control of ``option`` showing ``value`` (``run``'s default or the caller's)."""
    import ipywidgets as w

    common = {"description": option.label, "description_tooltip": option.help or option.name}
    kind = option.kind
    if kind == "text":
        return w.Text(value="" if value is None else str(value), placeholder=option.help,
                      layout=layout(width="240px"), **common)
    if kind == "int":
        return w.IntText(value=0 if value is None else int(value), layout=layout(width="160px"), **common)
    if kind == "float":
        return w.FloatText(value=0.0 if value is None else float(value), layout=layout(width="160px"),
                           **common)
    if kind == "bool":
        return w.Checkbox(value=bool(value), indent=False, **common)
    if kind == "choice":
        return w.Dropdown(options=list(option.choices), value=value if value in option.choices
                          else option.choices[0], layout=layout(width="180px"), **common)
    if kind == "floats":
        return w.Text(value=_floats_text(value), placeholder="1, 2, 4", layout=layout(width="160px"),
                      **common)
    if kind == "position":
        control = w.Dropdown(options=[("-", -1)], value=-1, layout=layout(width="220px"), **common)
        control.wanted = -1 if value is None else int(value)  # applied once the prompt is known
        return control
    raise LensContractError(f"option {option.name!r} of kind {kind!r} has no control")


def read(option: Option, control: Any) -> tuple[bool, Any]:
    """``(given, value)`` of a control: empty text is not given (``run``'s default holds)."""
    value = control.value
    if option.kind == "text":
        return (bool(value.strip()), value)
    if option.kind == "floats":
        if not value.strip():
            return False, None
        try:
            return True, tuple(float(t) for t in value.replace(",", " ").split())
        except ValueError:
            raise LensInputError(f"{option.label}: write numbers separated by commas, got {value!r}") from None
    return True, value


def fit_positions(control: Any, labels: Sequence[str]) -> bool:
    """Offer the prompt's positions ``labels`` in a position control; the selection moves to
    the wanted one (default: the last). Returns whether the choices changed."""
    if [o[0] for o in control.options] == list(labels):
        return False
    if not labels:
        control.options, control.value = [("-", -1)], -1
        return True
    n = len(labels)
    wanted = getattr(control, "wanted", -1)
    control.options = [(label, i) for i, label in enumerate(labels)]
    control.value = wanted % n if -n <= wanted < n else n - 1
    control.wanted = -1  # later prompts start at their last position
    return True


def input_boxes(inputs: str, prompt: Any) -> list[Any]:
    """The prompt boxes of a view's ``inputs``, filled from the dashboard's ``prompt``:
    text for ``"prompt"`` and ``"prompts"`` (lines ``prompt => answer``), a ``(clean,
    corrupted)`` pair for ``"pair"``."""
    import ipywidgets as w

    wide = layout(flex="1 1 auto", min_width="320px")
    if inputs == "prompt":
        return [w.Text(value=str(prompt or ""), description="prompt", placeholder="a prompt",
                       layout=wide)]
    if inputs == "pair":
        clean, corrupted = (prompt, "") if isinstance(prompt, str) or prompt is None else prompt
        return [w.Text(value=clean or "", description="clean", placeholder="the clean prompt",
                       layout=wide),
                w.Text(value=corrupted or "", description="corrupted",
                       placeholder="the corrupted prompt", layout=wide)]
    return [w.Textarea(value=str(prompt or ""), description="prompts", rows=2,
                       placeholder="prompt => answer (one per line, or separated by ;)", layout=wide)]


def read_inputs(inputs: str, boxes: Sequence[Any]) -> tuple[Any, ...]:
    """The positional inputs ``run`` takes after the model, from the prompt boxes."""
    if inputs == "prompts":
        return parse_prompts(boxes[0].value)
    texts = tuple(b.value for b in boxes)
    for box, text in zip(boxes, texts):
        if not text.strip():
            raise LensInputError(f"enter {box.placeholder}")
    return texts
