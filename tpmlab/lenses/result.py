"""The base of every lens result: the data, where it came from, a table, a grid and a figure.

Computation and plotting are kept apart: a lens's ``run`` returns a :class:`LensResult`
subclass holding tensors (``data``) and provenance (:class:`Provenance`); ``.table()``
flattens it into a list of dicts (no pandas needed; ``.to_pandas()`` when pandas is
installed); the grid interface (rows x columns, a value per metric, the text and detail of
each cell) is what the dashboard reads; ``.plot()`` draws that grid from the data alone,
without running anything. Also here: how numbers and tokens are written for people.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .._version import __version__
from .contract import Bars, Cell, LensView, Metric

if TYPE_CHECKING:
    from .plotting import HeatmapView


@dataclass(frozen=True)
class Provenance:
    """What produced a result: the model, its weights' version and the plans that ran.

    ``plan_digests`` holds one digest per trace the lens ran (in order);
    :attr:`plan_digest` is that digest when there was one trace, else a digest of the list.
    Built once, from every trace of the run (:meth:`from_traces`), and never changed.
    """

    model: str = ""
    model_version: str = ""
    plan_digests: tuple[str, ...] = ()
    tpmlab_version: str = __version__

    @classmethod
    def from_traces(cls, model: Any, *traces: Any) -> Provenance:
        """The provenance of a run of ``traces`` (finished traces: anything with
        ``.result.meta``) on ``model``."""
        version, tpmlab_version, digests = getattr(model, "version", ""), __version__, []
        for tr in traces:
            meta = tr.result.meta if getattr(tr, "result", None) is not None else {}
            version = meta.get("model_version") or version
            tpmlab_version = meta.get("tpmlab_version") or tpmlab_version
            if meta.get("plan_digest"):
                digests.append(meta["plan_digest"])
        return cls(model=getattr(model, "name", ""), model_version=version,
                   plan_digests=tuple(digests), tpmlab_version=tpmlab_version)

    @property
    def plan_digest(self) -> str:
        if len(self.plan_digests) == 1:
            return self.plan_digests[0]
        h = hashlib.sha256("\n".join(self.plan_digests).encode())
        return "sha256:" + h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_version": self.model_version,
                "plan_digest": self.plan_digest, "plan_digests": list(self.plan_digests),
                "tpmlab_version": self.tpmlab_version}


@dataclass(repr=False)
class LensResult:
    """Tensors computed by a lens, with provenance, and the grid a dashboard shows.

    Subclasses set :attr:`lens`, :attr:`title` and :attr:`view` (the lens module's
    ``NAME``, ``TITLE`` and ``VIEW``), add :meth:`table` rows and implement the grid:
    :meth:`row_labels` and :meth:`col_labels` at least (and :meth:`metric` unless each
    metric is a ``data`` entry of that name); :meth:`cell_text`,
    :meth:`hover`, :meth:`cell`, :meth:`heading`, :meth:`focus`, :meth:`marked_cols` and
    :meth:`bars` have plain defaults. :meth:`plot` draws the grid from the data alone.
    """

    data: dict[str, torch.Tensor]
    provenance: Provenance
    options: dict[str, Any] = field(default_factory=dict)

    lens: ClassVar[str] = "lens"
    title: ClassVar[str] = "lens"
    view: ClassVar[LensView | None] = None

    @property
    def model_version(self) -> str:
        return self.provenance.model_version

    @property
    def plan_digest(self) -> str:
        return self.provenance.plan_digest

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.data[key]

    def table(self) -> list[dict[str, Any]]:
        """One dict per row (plain Python values)."""
        raise NotImplementedError

    def to_pandas(self):
        """The table as a ``pandas.DataFrame`` (needs pandas, which tpmlab does not require)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("to_pandas() needs pandas; .table() gives the same rows as a "
                              "list of dicts") from e
        return pd.DataFrame(self.table())

    # -- the grid ---------------------------------------------------------------------------------
    def row_labels(self) -> list[str]:
        """The labels of the grid's rows (``view.rows``)."""
        raise NotImplementedError

    def col_labels(self) -> list[str]:
        """The labels of the grid's columns (``view.cols``), unique."""
        raise NotImplementedError

    def metric(self, name: str) -> torch.Tensor:
        """``[rows, cols]`` values of the view's metric ``name`` (``LensInputError`` for another
        name); by default ``data[name]``."""
        self.view.metric(name)
        return self.data[name].float()

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the grid."""
        return len(self.row_labels()), len(self.col_labels())

    def marked_cols(self) -> list[int]:
        """Columns drawn as a band (none by default)."""
        return []

    def cell_text(self, metric: str) -> list[list[str]] | None:
        """The word written in each cell when ``metric`` colours the grid (none by default)."""
        return None

    def hover(self, metric: str) -> list[list[str]]:
        """Each cell's hover text (HTML): by default its place and the value of every metric."""
        rows, cols, v = self.row_labels(), self.col_labels(), self.view
        values = {m.name: self.metric(m.name).tolist() for m in v.metrics}
        return [[f"<b>{v.rows.name} {row}</b>, {v.cols.name} {col}<br>"
                 + "<br>".join(f"{m.label}: {shown(values[m.name][r][c])}" for m in v.metrics)
                 for c, col in enumerate(cols)] for r, row in enumerate(rows)]

    def cell(self, row: int, col: int) -> Cell:
        """The detail panel of cell ``(row, col)`` (negative indices count from the end):
        by default its place and the value of every metric."""
        row, col = self.clip(row, col)
        v = self.view
        return Cell(title=f"{v.rows.name} {self.row_labels()[row]}, "
                          f"{v.cols.name} {self.col_labels()[col]}",
                    facts={m.label: shown(self.metric(m.name)[row, col]) for m in v.metrics})

    def heading(self, metric: Metric) -> str:
        """The figure's title when ``metric`` colours the grid."""
        return f"{self.title} \u00b7 {metric.label} \u00b7 {self.provenance.model}"

    def focus(self) -> tuple[int, int]:
        """The cell selected first (by default the last row's last column)."""
        return -1, -1

    def bars(self, row: int, col: int) -> Bars | None:
        """Bars shown beside the heatmap for the selected cell (when ``view.bars``)."""
        return None

    def clip(self, row: int, col: int) -> tuple[int, int]:
        """``(row, col)`` as indices into the grid (negative ones from the end, clamped)."""
        n_rows, n_cols = self.shape
        return (min(max(int(row), -n_rows), n_rows - 1) % n_rows,
                min(max(int(col), -n_cols), n_cols - 1) % n_cols)

    def grid(self, metric: str | None = None,
             selected: tuple[int, int] | None = None) -> HeatmapView:
        """The heatmap of ``metric`` (default: the view's first) as plain data, with cell
        ``selected`` outlined."""
        from .plotting import HeatmapView

        m = self.view.metric(metric)
        z = self.metric(m.name).double()
        if m.log10:
            z = z.clamp(min=1).log10()
        centred = bool((z < 0).any()) if m.centered is None else m.centered
        return HeatmapView(
            z=[[x if math.isfinite(x) else None for x in row] for row in z.tolist()],
            x=self.col_labels(), y=self.row_labels(), text=self.cell_text(m.name),
            hover=self.hover(m.name), title=self.heading(m), x_title=self.view.cols.title,
            y_title=self.view.rows.title, colorbar=m.colorbar,
            colorscale=m.diverging if centred else m.colorscale, zmid=0.0 if centred else None,
            zmin=m.zmin, zmax=m.zmax,
            selected=None if selected is None else self.clip(*selected),
            marked_cols=self.marked_cols())

    def plot(self, metric: str | None = None, *, selected: tuple[int, int] | None = None,
             title: str | None = None):
        """A plotly figure: the grid coloured by ``metric`` (default: the view's first), cell
        ``selected`` outlined; with bars of that cell (or of :meth:`focus`) where the view
        has them."""
        from .plotting import heatmap_figure, heatmap_with_bars

        view = self.grid(metric, selected)
        if title is not None:
            view.title = title
        bars = self.bars(*(selected or self.focus())) if self.view.bars else None
        return heatmap_figure(view) if bars is None else heatmap_with_bars(view, bars)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in self.data.items()
                           if isinstance(v, torch.Tensor))
        return (f"<{type(self).__name__} {self.provenance.model} "
                f"{self.model_version[:19]} {shapes}>")


def plain(value: Any) -> Any:
    """A tensor element (or anything) as a plain Python value for tables (``-0.0`` as ``0.0``)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    return value + 0.0 if isinstance(value, float) else value  # IEEE: -0.0 + 0.0 == +0.0


def shown(value: Any, spec: str = ".4f") -> str:
    """``format(value, spec)`` for people, with no sign on a number that rounds to zero.

    ``-0.00001`` and ``-0.0`` show as ``"0.0000"``, not ``"-0.0000"``: a quantity that is
    zero up to rounding noise (which changes with the order of a reduction, so with the
    thread count) must print the same every time.
    """
    value = float(value)
    text = format(value, spec)
    mantissa = re.split("[eE]", text)[0]
    if math.isfinite(value) and "-" in mantissa and not any(c in "123456789" for c in mantissa):
        return format(0.0, spec)
    return text


def token_label(tok: str, width: int = 10) -> str:
    """A token as shown in a cell or on an axis: whitespace made visible, cut to ``width``."""
    s = tok.replace("\n", "\\n").replace("\t", "\\t")
    if s.startswith(" "):
        s = "\u2423" + s[1:]  # open box: a leading space
    return s if len(s) <= width else s[: width - 1] + "\u2026"


def grid_table(rows: Sequence[Any], tokens: Sequence[str], data: dict[str, torch.Tensor],
               keys: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of :meth:`LensResult.table` for a layer x position grid: one per cell, with
    its ``layer`` (``rows[r]``), ``position``, ``token`` and ``data[k][r, p]`` for each key."""
    return [{"layer": row, "position": p, "token": tok, **{k: plain(data[k][r, p]) for k in keys}}
            for r, row in enumerate(rows) for p, tok in enumerate(tokens)]


def position_labels(tokens: list[str]) -> list[str]:
    """Column labels ``"p:token"`` (unique even when tokens repeat)."""
    return [f"{p}:{token_label(t)}" for p, t in enumerate(tokens)]
