"""One dashboard for every lens: each lens of the zoo opens with its view's example, and a
third-party lens dropped on TPMLAB_LENS_PATH (two prompts in, a layers x positions grid out,
options of several kinds) works the same, with no code of its own in tpmlab.widgets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import tpmlab.lenses
from tpmlab.lenses import discovery
from tpmlab.widgets import LensDashboard, dashboard, figures

ZOO = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "lenses").glob("*.py")
             if not p.stem.startswith("_"))


class _Points:
    def __init__(self, xs, ys):
        self.xs, self.ys, self.point_inds = xs, ys, [0]


def click(dash, row: int, col: int) -> None:
    t = dash.figure_widget.data[0]
    dash._clicked(t, _Points([t.x[col]], [t.y[row]]), None)


def same(z, expected) -> bool:
    """Heatmap values equal, gaps (None) where the expected value is not finite."""
    return all((a is None and (b is None or not math.isfinite(b))) or
               (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12))
               for row_a, row_b in zip(z, expected) for a, b in zip(row_a, row_b)) \
        and len(z) == len(expected)


@pytest.fixture(scope="module")
def lens_home(tmp_path_factory, tiny):
    """A TPMLAB_HOME where the tiny model has a tuned lens cached (training one would take a
    minute: the tuned lens's own tests and test_dashboards cover training)."""
    home = tmp_path_factory.mktemp("home")
    tuned = tpmlab.lenses.get("tuned")
    n, d = tiny.adapter.n_layers, tiny.adapter.d_model
    g = torch.Generator().manual_seed(0)
    lens = tuned.TunedLens(tiny.name, tiny.version, ["input"] + [str(i) for i in range(n - 1)],
                           up=torch.randn(n, d, 2, generator=g) * 0.1,
                           down=torch.randn(n, d, 2, generator=g), bias=torch.zeros(n, d))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TPMLAB_HOME", str(home))
        lens.save(tuned.cache_path(tiny))
    return home


@pytest.mark.parametrize("name", ZOO)
def test_every_lens_opens_in_the_one_dashboard(name, tiny, lens_home, monkeypatch):
    monkeypatch.setenv("TPMLAB_HOME", str(lens_home))
    info = tpmlab.lenses.info(name)
    d = dashboard(tiny, name, **info.view.example)
    assert type(d) is LensDashboard and d.error is None, d.status.value
    r = d.result
    assert r.lens == name and "done in" in d.status.value and d.progress.value == 1.0
    # the controls come from the view
    assert [label for label, _ in d.controls["metric"].options] == [m.label for m in info.view.metrics]
    assert set(d.inputs) == {o.name for o in info.view.options if o.shown}
    assert {info.view.rows.name, info.view.cols.name} <= set(d.controls)
    # the figure is the result's own plot, for every metric
    for metric in info.view.metrics:
        d.controls["metric"].value = metric.name
        expected = r.plot(metric.name, selected=d._selected())
        shown = d.figure_widget.data[0]
        assert shown.type == "heatmap" and list(shown.y) == r.row_labels()
        assert list(shown.x) == r.col_labels()
        assert same(shown.z, expected.data[0].z)
        values = r.metric(metric.name).double()
        if metric.log10:
            values = values.clamp(min=1).log10()
        assert same(shown.z, values.tolist())
        assert shown.colorbar.title.text == metric.colorbar
        assert len(d.figure_widget.data) == (3 if info.view.bars else 1)
    # a click selects that cell and shows its detail
    rows, cols = r.shape
    click(d, rows - 1, cols // 2)
    assert d._selected() == (rows - 1, cols // 2)
    assert d.detail.value == figures.detail_html(r.cell(rows - 1, cols // 2))
    assert r.cell(rows - 1, cols // 2).title in d.detail.value
    static = d._static_text(d.detail_data())["text/html"]
    assert d._marker in static and figures.PLOTLY_MIME in figures.static_bundle(d.figure())


PAIR_LENS = '''
"""A lens written elsewhere: how far apart two prompts' residual streams are."""
import torch

from tpmlab.lenses import Axis, Cell, LensResult, LensView, Metric, Option, Provenance
from tpmlab.lenses.common import layer_list, token_ids, token_strings
from tpmlab.lenses.result import position_labels

NAME = "distance"
TITLE = "residual distance"
DESCRIPTION = "Per layer and position: the distance between a clean and a corrupted residual."
VIEW = LensView(
    inputs="pair", rows=Axis("layer"), cols=Axis("position"),
    metrics=(Metric("distance", "distance"), Metric("cosine", "cosine", centered=True)),
    options=(Option("scale", "float", help="multiplies the distance"),
             Option("norm", "choice", choices=("l2", "l1")),
             Option("squared", "bool")),
    example={"prompt": ("one two three", "one two four")})


class DistanceResult(LensResult):
    lens, title, view = NAME, TITLE, VIEW

    def row_labels(self):
        return [str(i) for i in self.options["layers"]]

    def col_labels(self):
        return position_labels(self.options["tokens"])

    def metric(self, name):
        return self.data[name]

    def cell(self, row, col):
        row, col = self.clip(row, col)
        return Cell(title=f"layer {row}, position {col}",
                    facts={"distance": f"{float(self.data['distance'][row, col]):.4f}"})


def run(model, clean, corrupted, *, scale=1.0, norm="l2", squared=False, progress=None):
    layers = layer_list(model, None)
    if progress is not None:
        progress(0, 1, TITLE)
    with model.trace() as tr:
        with tr.invoke(input_ids=token_ids(model, clean)):
            a = torch.cat([model.layers[i].output for i in layers], 0)
        with tr.invoke(input_ids=token_ids(model, corrupted)):
            b = torch.cat([model.layers[i].output for i in layers], 0)
            d = (a - b).norm(p=2 if norm == "l2" else 1, dim=-1).save()
            c = torch.nn.functional.cosine_similarity(a, b, dim=-1).save()
    if progress is not None:
        progress(1, 1, TITLE)
    distance = d.value * scale
    return DistanceResult(data={"distance": distance ** 2 if squared else distance, "cosine": c.value},
                          provenance=Provenance.from_traces(model, tr),
                          options={"layers": layers, "tokens": token_strings(model, token_ids(model, clean))})
'''


def test_a_third_party_pair_lens(tiny, tmp_path, monkeypatch):
    (tmp_path / "distance.py").write_text(PAIR_LENS)
    monkeypatch.setenv(discovery.PATH_ENV, str(tmp_path))
    discovery._clear_cache()
    try:
        d = dashboard(tiny, "distance", prompt=("one two three", "one two four"), scale=2.0)
        assert [b.description for b in d.boxes] == ["clean", "corrupted"]
        assert d.error is None, d.status.value
        assert (type(d.inputs["scale"]).__name__, type(d.inputs["norm"]).__name__,
                type(d.inputs["squared"]).__name__) == ("FloatText", "Dropdown", "Checkbox")
        assert d.inputs["scale"].value == 2.0 and d.inputs["norm"].value == "l2"
        with tiny.trace() as tr:
            with tr.invoke("one two three"):
                a = tiny.layers[2].output[0].save()
            with tr.invoke("one two four"):
                b = tiny.layers[2].output[0].save()
        expected = 2.0 * (a.value - b.value).norm(dim=-1)
        torch.testing.assert_close(d.result.metric("distance")[2], expected, rtol=1e-4, atol=1e-5)
        assert d.result.metric("distance")[2, 0] == 0  # same first token, same residual
        d.inputs["norm"].value, d.inputs["squared"].value = "l1", True
        d.run(wait=True)
        expected = (2.0 * (a.value - b.value).abs().sum(-1)) ** 2
        torch.testing.assert_close(d.result.metric("distance")[2], expected, rtol=1e-4, atol=1e-4)
        d.boxes[1].value = ""
        d.run(wait=True)
        assert "enter the corrupted prompt" in d.status.value
    finally:
        discovery._clear_cache()
