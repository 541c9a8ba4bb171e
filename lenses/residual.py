"""Residual-stream geometry: how large the residual stream is at every layer and position,
how much each layer changes it, and how close it already is to where it ends.

For a prompt with positions ``p``, the residual entering layer ``l`` is ``x_l[p]`` and the
layer's output ``y_l[p] = x_{l+1}[p]`` (``x_0``: the embeddings, plus learned position
embeddings where the model has them); ``y_F`` is the last layer's output (before the
final norm). Per row (``"input"`` for ``x_0``, ``"l"`` for ``y_l``) and position::

    norm       = ||y_l[p]||_2
    update     = ||y_l[p] - x_l[p]||_2 / ||x_l[p]||_2         what layer l writes, relative
    cos_prev   = cos(y_l[p], x_l[p])                          how much it turns the stream
    cos_final  = cos(y_l[p], y_F[p])                          how close it is to the end

with ``cos(a, b) = a·b / (||a|| ||b||)`` (``torch.nn.functional.cosine_similarity``,
eps 1e-8). The ``"input"`` row has no layer before it: its ``update`` and ``cos_prev`` are
NaN (blank cells). Everything is reduced where the residuals are; only ``[rows, pos]``
numbers come back.

    >>> residual = tpmlab.lenses.get("residual")
    >>> res = residual.run(model, "The Eiffel Tower is located in the city of")
    >>> res.data["update"][1:, -1]       # [layers] how much each layer writes at the last token
    >>> res.plot(metric="cos_final")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from tpmlab.lenses import LensResult, Progress, Provenance
from tpmlab.lenses.common import layer_list, token_ids, token_strings
from tpmlab.lenses.contract import Axis, Cell, LensView, Metric, Option, Table
from tpmlab.lenses.result import grid_table, position_labels, shown, token_label

NAME = "residual"
TITLE = "residual stream geometry"
DESCRIPTION = ("Per layer and position: the residual's norm, how much the layer writes into "
               "it, and its cosine to the previous and to the final residual.")

#: The values per row and position (see the module docstring).
QUANTITIES = ("update", "cos_final", "cos_prev", "norm")

VIEW = LensView(
    inputs="prompt", rows=Axis("layer"), cols=Axis("position"),
    metrics=(
        Metric("update", "relative update", "||y - x|| / ||x||"),
        Metric("cos_final", "cosine to the final residual", "cos(y, y_F)", zmin=-1.0, zmax=1.0,
               centered=True),
        Metric("cos_prev", "cosine to the layer's input", "cos(y, x)", zmin=-1.0, zmax=1.0,
               centered=True),
        Metric("norm", "norm", "||y||"),
    ),
    options=(
        Option("layers", "object", "layers", "which layers (default: all)"),
        Option("include_input", "bool", "input row", "also the residual entering layer 0",
               shown=False),
    ),
    detail="the four quantities at the cell, and the layers that write most at its position",
    example={"prompt": "The Eiffel Tower is located in the city of"})


@dataclass(repr=False)
class ResidualResult(LensResult):
    """``data[q]`` ``[R, P]`` for each of :data:`QUANTITIES`, per row (``rows``: ``"input"``
    and layer numbers) and position (``tokens``); ``data["input_ids"]`` ``[P]``."""

    rows: list[str] | None = None
    tokens: list[str] | None = None

    lens = NAME
    title = TITLE
    view = VIEW

    def table(self) -> list[dict[str, Any]]:
        return grid_table(self.rows, self.tokens, self.data, QUANTITIES)

    # -- the grid: rows x positions --------------------------------------------------------------
    def row_labels(self) -> list[str]:
        return list(self.rows)

    def col_labels(self) -> list[str]:
        return position_labels(self.tokens)

    def _text(self, value: torch.Tensor, spec: str = ".3f") -> str:
        return "\u2013" if value.isnan() else shown(value, spec)

    def hover(self, metric: str) -> list[list[str]]:
        d = self.data
        return [[f"<b>layer {row}</b>, position {p} ({token_label(tok, 16)})<br>"
                 f"norm {self._text(d['norm'][r, p], '.2f')}, relative update "
                 f"{self._text(d['update'][r, p])}<br>cos to input {self._text(d['cos_prev'][r, p])}, "
                 f"to final {self._text(d['cos_final'][r, p])}"
                 for p, tok in enumerate(self.tokens)] for r, row in enumerate(self.rows)]

    def cell(self, row: int, col: int) -> Cell:
        d = self.data
        r, p = self.clip(row, col)
        update = d["update"][:, p]
        written = [i for i in update.nan_to_num(-1.0).argsort(descending=True).tolist()
                   if not update[i].isnan()][:5]
        return Cell(
            title=f"layer {self.rows[r]}, position {p}", token=self.tokens[p],
            tables=(Table(("layer", "relative update here"),
                          tuple((self.rows[i], float(update[i])) for i in written), tokens=False),),
            facts={"norm": self._text(d["norm"][r, p], ".3f"),
                   "relative update": self._text(d["update"][r, p], ".4f"),
                   "cosine to the layer's input": self._text(d["cos_prev"][r, p], ".4f"),
                   "cosine to the final residual": self._text(d["cos_final"][r, p], ".4f")})


def run(model: Any, prompt: str | Sequence[int] | torch.Tensor, *,
        layers: Sequence[int] | None = None, include_input: bool = True,
        progress: Progress | None = None) -> ResidualResult:
    """The geometry of the residual stream of ``prompt`` (text or token ids) at ``layers``
    (default: all), with the embeddings' row first (``include_input``).
    ``progress(done, total, text)``: called before and after the one forward pass."""
    ids = token_ids(model, prompt)
    chosen = layer_list(model, layers)
    if progress is not None:
        progress(0, 1, TITLE)
    with model.trace(input_ids=ids) as tr:
        x = torch.cat([model.layers[i].input for i in chosen], 0).float()   # [L, P, d]
        y = torch.cat([model.layers[i].output for i in chosen], 0).float()  # [L, P, d]
        final = model.layers[-1].output.float()                             # [1, P, d]
        saved = {
            "norm": y.norm(dim=-1).save(),
            "update": ((y - x).norm(dim=-1) / x.norm(dim=-1)).save(),
            "cos_prev": F.cosine_similarity(y, x, dim=-1).save(),
            "cos_final": F.cosine_similarity(y, final, dim=-1).save(),
        }
        if include_input:
            x0 = model.layers[0].input.float()                               # [1, P, d]
            first = {"norm": x0.norm(dim=-1).save(),
                     "cos_final": F.cosine_similarity(x0, final, dim=-1).save()}
    data = {k: v.value.float() for k, v in saved.items()}
    rows = [str(i) for i in chosen]
    if include_input:
        blank = torch.full((1, len(ids)), float("nan"))
        data = {"norm": torch.cat([first["norm"].value.float(), data["norm"]]),
                "update": torch.cat([blank, data["update"]]),
                "cos_prev": torch.cat([blank, data["cos_prev"]]),
                "cos_final": torch.cat([first["cos_final"].value.float(), data["cos_final"]])}
        rows = ["input"] + rows
    data["input_ids"] = ids
    if progress is not None:
        progress(1, 1, TITLE)
    return ResidualResult(data=data, provenance=Provenance.from_traces(model, tr),
                          options={"layers": layers, "include_input": include_input},
                          rows=rows, tokens=token_strings(model, ids))
