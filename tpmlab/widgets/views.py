"""What a dashboard shows, computed from a lens result and the controls' state alone.

Nothing here touches widgets, a kernel or a browser: a *view* is plain data (lists of
numbers and strings) that :mod:`tpmlab.widgets.figures` turns into a plotly figure, and a
*detail* is the dict shown in the side panel for the selected cell. Tests drive these
functions directly with real lens results.

Axes, everywhere: rows are layers (the first row at the bottom), columns are token
positions (logit, tuned lens, patching), heads (attention lens) or injection scales
(memory injection). A selected cell is ``(row, col)`` as indices into those lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..lenses.result import shown as number

TOP_N = 5  # tokens listed per cell in hover text and detail panels


@dataclass
class HeatmapView:
    """One heatmap: ``z[row][col]`` with row labels ``y`` and column labels ``x``.

    ``text``: the word written in each cell (or ``None``); ``hover``: each cell's hover
    text (HTML); ``selected``: the highlighted ``(row, col)``; ``marked_cols``: columns
    drawn as a band (the subject tokens of a causal trace)."""

    z: list[list[float | None]]
    x: list[str]
    y: list[str]
    text: list[list[str]] | None
    hover: list[list[str]]
    title: str
    x_title: str
    y_title: str
    colorbar: str
    colorscale: str = "Viridis"
    zmid: float | None = None
    zmin: float | None = None
    zmax: float | None = None
    selected: tuple[int, int] | None = None
    marked_cols: list[int] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.y), len(self.x)


def token_label(tok: str, width: int = 10) -> str:
    """A token as shown in a cell or on an axis: whitespace made visible, cut to ``width``."""
    s = tok.replace("\n", "\\n").replace("\t", "\\t")
    if s.startswith(" "):
        s = "\u2423" + s[1:]  # open box: a leading space
    return s if len(s) <= width else s[: width - 1] + "\u2026"


def _clip(sel: tuple[int, int] | None, shape: tuple[int, int]) -> tuple[int, int] | None:
    if sel is None or not shape[0] or not shape[1]:
        return None
    r, c = sel
    return (min(max(int(r), -shape[0]), shape[0] - 1) % shape[0],
            min(max(int(c), -shape[1]), shape[1] - 1) % shape[1])


def _rows(t: torch.Tensor) -> list[list[float | None]]:
    """A 2-D tensor as nested lists of floats (NaN and inf become ``None``: gaps)."""
    return [[v if math.isfinite(v) else None for v in row] for row in t.double().tolist()]


# -- logit lens and tuned lens ----------------------------------------------------------------------

#: menu label -> (metric of LogitLensResult.metric, colour bar title, colour scale)
LOGIT_METRICS: dict[str, tuple[str, str, str]] = {
    "probability": ("target_prob", "P(final top-1)", "Viridis"),
    "rank": ("target_rank", "log10 rank", "Viridis_r"),
    "KL": ("kl", "KL (nats)", "Viridis_r"),
    "entropy": ("entropy", "entropy (nats)", "Viridis_r"),
    "top-1 probability": ("top_prob", "P(top-1)", "Viridis"),
}


def position_labels(tokens: list[str]) -> list[str]:
    """Column labels ``"p:token"`` (unique even when tokens repeat)."""
    return [f"{p}:{token_label(t)}" for p, t in enumerate(tokens)]


def logit_values(result: Any, metric: str) -> torch.Tensor:
    """``[rows, pos]`` values of a menu metric (``rank`` as log10 of the rank)."""
    if metric not in LOGIT_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(LOGIT_METRICS)}")
    z = result.metric(LOGIT_METRICS[metric][0]).double()
    return z.clamp(min=1).log10() if metric == "rank" else z


def logit_view(result: Any, metric: str = "probability",
               selected: tuple[int, int] | None = (-1, -1)) -> HeatmapView:
    """Layers x positions of a logit- or tuned-lens result: the metric as colour, the top
    token written in each cell, the top-k with probabilities on hover."""
    d = result.data
    z = logit_values(result, metric)
    rows, tokens = list(result.rows), list(result.tokens)
    hover = []
    for r, row in enumerate(rows):
        line = []
        for p, tok in enumerate(tokens):
            tops = "<br>".join(f"&nbsp;&nbsp;{token_label(t, 16)!s}&nbsp;&nbsp;{number(pr, '.3f')}" for t, pr in zip(
                result.top_tokens[r][p][:TOP_N], d["top_probs"][r, p, :TOP_N].tolist()))
            line.append(f"<b>layer {row}</b>, position {p} ({token_label(tok, 16)})<br>"
                        f"top {min(TOP_N, d['top_probs'].shape[-1])}:<br>{tops}<br>"
                        f"P(final top-1 {token_label(result.target_tokens[p], 16)}) "
                        f"{number(d['target_prob'][r, p], '.3f')}, rank {int(d['target_rank'][r, p])}<br>"
                        f"KL {number(d['kl'][r, p], '.3f')}, entropy {number(d['entropy'][r, p], '.3f')} nats")
        hover.append(line)
    _, bar, scale = LOGIT_METRICS[metric]
    bounded = metric in ("probability", "top-1 probability")
    return HeatmapView(
        z=_rows(z), x=position_labels(tokens), y=rows,
        text=[[token_label(cell[0], 7) for cell in row] for row in result.top_tokens],
        hover=hover, title=f"{result.lens} lens \u00b7 {metric} \u00b7 {result.provenance.model}",
        x_title="position", y_title="layer", colorbar=bar, colorscale=scale,
        zmin=0.0 if bounded else None, zmax=1.0 if bounded else None,
        selected=_clip(selected, (len(rows), len(tokens))))


def logit_cell(result: Any, row: int, pos: int) -> dict[str, Any]:
    """The detail of one cell: its top-k tokens with probabilities and its statistics."""
    d = result.data
    row, pos = _clip((row, pos), (len(result.rows), len(result.tokens)))
    return {
        "title": f"layer {result.rows[row]}, position {pos}",
        "token": result.tokens[pos],
        "top": list(zip(result.top_tokens[row][pos], d["top_probs"][row, pos].tolist())),
        "top_header": ("token", "probability"),
        "facts": {
            "final top-1": repr(result.target_tokens[pos]),
            "its probability": number(d["target_prob"][row, pos]),
            "its rank": str(int(d["target_rank"][row, pos])),
            "KL(final || layer)": f"{number(d['kl'][row, pos])} nats",
            "entropy": f"{number(d['entropy'][row, pos])} nats",
        },
    }


# -- attention lens -------------------------------------------------------------------------------

#: menu label -> (colour bar title, colour scale, centred at zero)
ATTENTION_METRICS: dict[str, tuple[str, str, bool]] = {
    "direct logit attribution": ("logit", "RdBu", True),
    "head-alone P(target)": ("probability", "Viridis", False),
    "head-alone top-1 probability": ("probability", "Viridis", False),
}


def _decode(result: Any, token_id: int) -> str:
    return result.options["_decode"](int(token_id))


def attention_values(result: Any, metric: str, pos: int = -1, target: int = 0) -> torch.Tensor:
    """``[layers, heads]`` values of a menu metric at result position index ``pos``."""
    d = result.data
    if metric == "direct logit attribution":
        return d["dla"][:, pos, :, target]
    if metric == "head-alone P(target)":
        return d["alone_target_prob"][:, pos, :, target]
    if metric == "head-alone top-1 probability":
        return d["alone_top_probs"][:, pos, :, 0]
    raise ValueError(f"unknown metric {metric!r}; choose from {list(ATTENTION_METRICS)}")


def attention_view(result: Any, metric: str = "direct logit attribution", pos: int = -1,
                   selected: tuple[int, int] | None = (-1, 0), target: int = 0) -> HeatmapView:
    """Layers x heads at one position: the metric as colour; each cell shows the head's top
    token (by DLA for the DLA metric, else by its head-alone distribution)."""
    d = result.data
    z = attention_values(result, metric, pos, target)
    L, H = z.shape
    ids = d["dla_top_ids"] if metric == "direct logit attribution" else d["alone_top_ids"]
    text = [[token_label(_decode(result, ids[i, pos, h, 0]), 7) for h in range(H)] for i in range(L)]
    position = int(d["positions"][pos])
    tgt = result.target_tokens[pos][target]
    hover = []
    for i, layer in enumerate(result.layers):
        line = []
        for h in range(H):
            dla_top = ", ".join(token_label(_decode(result, t), 12)
                                for t in d["dla_top_ids"][i, pos, h, :3].tolist())
            alone = ", ".join(f"{token_label(_decode(result, t), 12)} {number(p, '.2f')}" for t, p in zip(
                d["alone_top_ids"][i, pos, h, :3].tolist(), d["alone_top_probs"][i, pos, h, :3].tolist()))
            line.append(f"<b>L{layer} H{h}</b><br>DLA to {token_label(tgt, 12)}: "
                        f"{number(d['dla'][i, pos, h, target], '.3f')}<br>top DLA: {dla_top}<br>"
                        f"head alone: {alone}")
        hover.append(line)
    bar, scale, centred = ATTENTION_METRICS[metric]
    return HeatmapView(
        z=_rows(z), x=[f"H{h}" for h in range(H)], y=[str(x) for x in result.layers], text=text,
        hover=hover, title=f"attention lens \u00b7 {metric} \u00b7 position {position} "
                           f"({token_label(result.tokens[position])}) \u2192 {token_label(tgt)}",
        x_title="head", y_title="layer", colorbar=bar, colorscale=scale,
        zmid=0.0 if centred else None, selected=_clip(selected, (L, H)))


def head_detail(result: Any, layer: int, head: int, pos: int = -1, target: int = 0) -> dict[str, Any]:
    """One head's top tokens: by direct logit attribution and by its head-alone distribution."""
    d = result.data
    layer, head = _clip((layer, head), tuple(d["dla"].shape[0:3:2]))
    position = int(d["positions"][pos])
    dla = [(_decode(result, t), v) for t, v in zip(d["dla_top_ids"][layer, pos, head].tolist(),
                                                    d["dla_top_values"][layer, pos, head].tolist())]
    alone = [(_decode(result, t), p) for t, p in zip(d["alone_top_ids"][layer, pos, head].tolist(),
                                                      d["alone_top_probs"][layer, pos, head].tolist())]
    return {
        "title": f"layer {result.layers[layer]}, head {head}",
        "token": result.tokens[position],
        "top": dla, "top_header": ("top DLA token", "logit"),
        "more": alone, "more_header": ("head-alone token", "probability"),
        "facts": {
            "position": str(position),
            "target": repr(result.target_tokens[pos][target]),
            "DLA to target": number(d["dla"][layer, pos, head, target]),
            "layer's attention DLA": number(d["layer_dla"][layer, pos, target]),
            "head-alone P(target)": number(d["alone_target_prob"][layer, pos, head, target]),
        },
    }


# -- memory injection -------------------------------------------------------------------------------

MEMORY_STATS = ("mean_delta", "mean_after", "median_delta", "fraction_improved")


def memory_view(result: Any, stat: str = "mean_delta",
                selected: tuple[int, int] | None = (0, 0)) -> HeatmapView:
    """Layers x tau of a :meth:`summary` statistic (changes centred at zero)."""
    if stat not in MEMORY_STATS:
        raise ValueError(f"unknown statistic {stat!r}; choose from {MEMORY_STATS}")
    cells = {(r["layer"], r["tau"]): r for r in result.summary()}
    z = [[cells[(layer, tau)][stat] for tau in result.taus] for layer in result.layers]
    hover = [[f"<b>layer {layer}, \u03c4 {tau:g}</b><br>mean P before {number(c['mean_before'])}"
              f"<br>mean P after {number(c['mean_after'])}<br>improved {number(c['fraction_improved'], '.0%')}"
              for tau in result.taus for c in [cells[(layer, tau)]]] for layer in result.layers]
    return HeatmapView(
        z=z, x=[f"{t:g}" for t in result.taus], y=[str(x) for x in result.layers], text=None,
        hover=hover, title=f"memory injection \u00b7 {stat} \u00b7 {result.provenance.model}",
        x_title="\u03c4 (scale)", y_title="layer", colorbar=stat,
        colorscale="RdBu" if "delta" in stat else "Viridis",
        zmid=0.0 if "delta" in stat else None,
        selected=_clip(selected, (len(result.layers), len(result.taus))))


def memory_bars(result: Any, layer: int, tau: int) -> dict[str, Any]:
    """Before/after first-token probability per prompt at ``(layer, tau)`` indices."""
    layer, tau = _clip((layer, tau), (len(result.layers), len(result.taus)))
    return {"prompts": [token_label(p, 24) for p in result.prompts],
            "before": result.data["before"].tolist(),
            "after": result.data["after"][:, layer, tau].tolist(),
            "title": f"layer {result.layers[layer]}, \u03c4 {result.taus[tau]:g}"}


def memory_cell(result: Any, layer: int, tau: int) -> dict[str, Any]:
    bars = memory_bars(result, layer, tau)
    rows = [(p, f"{number(b, '.3f')} \u2192 {number(a, '.3f')}") for p, b, a in zip(result.prompts, bars["before"], bars["after"])]
    return {"title": bars["title"], "token": None, "top": rows,
            "top_header": ("prompt", "P(answer) before \u2192 after"), "facts": {
                "memory variant": str(result.options.get("variant")),
                "mean change": f"{number(sum(a - b for a, b in zip(bars['after'], bars['before'])) / len(rows), '+.4f')}",
            }}


# -- activation patching ----------------------------------------------------------------------------

def patching_view(result: Any, selected: tuple[int, int] | None = (0, 0)) -> HeatmapView:
    """Layers x positions of the indirect effect (or normalised logit difference), the subject
    tokens marked."""
    e = result.data["effect"]
    subject = [int(p) for p in result.data.get("subject_positions", torch.zeros(0)).tolist()]
    x = [("\u25b8" if p in subject else "") + lab for p, lab in enumerate(position_labels(result.tokens))]
    metric = result.options.get("metric", "effect")
    hover = [[f"<b>layer {layer}</b>, position {p} ({token_label(t, 16)})"
              f"{' (subject)' if p in subject else ''}<br>{metric}: {number(e[i, p])}"
              for p, t in enumerate(result.tokens)] for i, layer in enumerate(result.layers)]
    centred = bool((e < 0).any())
    return HeatmapView(
        z=_rows(e), x=x, y=[str(x) for x in result.layers], text=None, hover=hover,
        title=f"{result.options.get('method', 'patching')} ({result.options.get('kind', '')}) "
              f"\u00b7 {result.provenance.model}",
        x_title="position (\u25b8 subject)", y_title="layer", colorbar=metric,
        colorscale="RdBu_r" if centred else "Purples", zmid=0.0 if centred else None,
        selected=_clip(selected, tuple(e.shape)), marked_cols=subject)


def patching_cell(result: Any, layer: int, pos: int) -> dict[str, Any]:
    d = result.data
    layer, pos = _clip((layer, pos), tuple(d["effect"].shape))
    effect = float(d["effect"][layer, pos])
    facts = {"effect": number(effect), "metric": str(result.options.get("metric"))}
    if "p_clean" in d:
        facts.update({"P(answer) clean": number(d["p_clean"]),
                      "P(answer) corrupted": number(d["p_corrupt"]),
                      "P(answer) restored here": number(d["p_corrupt"] + effect)})
        subject = d["subject_positions"].tolist()
        facts["subject token"] = "yes" if pos in subject else "no"
    if "logit_diff" in d:
        facts.update({"logit diff clean": number(d["ld_clean"], ".3f"),
                      "logit diff corrupted": number(d["ld_corrupt"], ".3f"),
                      "logit diff patched": number(d["logit_diff"][layer, pos], ".3f")})
    column = d["effect"][:, pos]
    best = int(column.argmax())
    facts["strongest layer at this position"] = f"{result.layers[best]} ({number(column[best])})"
    return {"title": f"layer {result.layers[layer]}, position {pos}", "token": result.tokens[pos],
            "top": [], "facts": facts}
