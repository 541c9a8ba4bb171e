"""Dashboard logic without a browser: real lens runs on a tiny model; changing a control
changes the figure's data as expected; clicks fill the detail panel; long requests report
progress through the lens's own callback, can be cancelled between passes, and a late
result is dropped. One dashboard serves every lens, read through the lens contract."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import tpmlab.lenses
from tpmlab.lenses import Cancelled, plotting
from tpmlab.lenses.contract import LensInputError
from tpmlab.lenses.result import token_label
from tpmlab.widgets import dashboard, figures
from tpmlab.widgets.jobs import Job

from .conftest import PROMPT


class _Points:
    def __init__(self, xs, ys):
        self.xs, self.ys, self.point_inds = xs, ys, [0]


def click(dash, row: int, col: int, trace: int = 0) -> None:
    """What a click on heatmap cell (row, col) in the browser sends back."""
    t = dash.figure_widget.data[trace]
    dash._clicked(t, _Points([t.x[col]], [t.y[row]]), None)


def shapes(dash, name):
    return [s for s in dash.figure_widget.layout.shapes if s.name == name]


@pytest.fixture(scope="module")
def logit_dash(tiny):
    return dashboard(tiny, "logit", prompt=PROMPT)


def test_logit_heatmap_matches_result(logit_dash):
    d, r = logit_dash, logit_dash.result
    trace = d.figure_widget.data[0]
    assert trace.type == "heatmap" and len(trace.z) == len(r.rows) == 5
    assert list(trace.y) == r.rows and len(trace.x) == len(r.tokens)
    torch.testing.assert_close(torch.tensor(trace.z, dtype=torch.float64), r.data["target_prob"].double())
    assert trace.text[2][3] == token_label(r.top_tokens[2][3][0], 7)  # top token in the cell
    hover = trace.hovertext[2][3]  # top-k with probabilities on hover
    assert all(token_label(t, 16) in hover for t in r.top_tokens[2][3])
    assert f"{r.data['top_probs'][2, 3, 0]:.3f}" in hover
    assert "done in" in d.status.value and d.progress.value == 1.0


def test_metric_menu_changes_z(logit_dash):
    d, r = logit_dash, logit_dash.result
    menu = dict(d.controls["metric"].options)  # label -> metric, from the lens's view
    assert list(menu) == ["probability", "rank", "KL", "entropy", "top-1 probability"]
    before = [list(row) for row in d.figure_widget.data[0].z]
    for label, key in [("KL", "kl"), ("entropy", "entropy")]:
        d.controls["metric"].value = menu[label]
        z = torch.tensor(d.figure_widget.data[0].z, dtype=torch.float64)
        torch.testing.assert_close(z, r.data[key].double())
        assert d.figure_widget.data[0].colorbar.title.text == d.view.metric(key).colorbar
    assert d.figure_widget.data[0].colorbar.title.text == "entropy (nats)"
    d.controls["metric"].value = menu["rank"]
    z = torch.tensor(d.figure_widget.data[0].z, dtype=torch.float64)
    torch.testing.assert_close(z, r.data["target_rank"].double().log10())
    assert z[-1].abs().max() == 0  # the last layer ranks the final top-1 first
    d.controls["metric"].value = menu["probability"]
    assert [list(row) for row in d.figure_widget.data[0].z] == before


def test_layer_slider_moves_highlighted_row(logit_dash):
    d = logit_dash
    for row in (1, 3):
        d.controls["layer"].value = row
        (band,) = shapes(d, "selected-row")
        assert (band.y0, band.y1) == (row - 0.5, row + 0.5)
        assert d._selected()[0] == row
    d.controls["position"].value = 2
    (cell,) = shapes(d, "selected-cell")
    assert (cell.x0, cell.y0) == (1.5, 2.5)


def test_click_fills_detail_panel(logit_dash):
    d, r = logit_dash, logit_dash.result
    click(d, 2, 4)
    assert (d.controls["layer"].value, d.controls["position"].value) == (2, 4)
    html = d.detail.value
    assert "layer 1, position 4" in html  # row 2 is the output of layer 1 ("input" is row 0)
    for tok in r.top_tokens[2][4]:
        assert html.count("<tr>") >= 5 and tok.strip()[:3].replace("<", "&lt;") in html
    detail = r.cell(2, 4)
    assert detail == d.detail_data()
    assert [t for t, _ in detail.tables[0].rows] == r.top_tokens[2][4]
    assert detail.tables[0].rows[0][1] == pytest.approx(float(r.data["top_probs"][2, 4, 0]))


def test_static_copy_is_small_plain_json(logit_dash):
    d = logit_dash
    bundle = figures.static_bundle(d.figure(), d._summary())
    spec = bundle[figures.PLOTLY_MIME]
    text = json.dumps(bundle)
    assert spec["data"][0]["type"] == "heatmap" and len(text) < 60_000
    static = d._static_text(d.detail_data())["text/html"]
    assert d._marker in static and d._marker not in d.detail.value
    assert f".jp-OutputArea-child:has(.{d._marker})" in d._style.value


def test_tuned_dashboard_with_a_trained_lens(tiny):
    tuned = tpmlab.lenses.get("tuned")
    n, d = tiny.adapter.n_layers, tiny.adapter.d_model
    rows = ["input"] + [str(i) for i in range(n - 1)]
    lens = tuned.TunedLens(tiny.name, tiny.version, rows, up=torch.zeros(n, d, 2),
                           down=torch.randn(n, d, 2), bias=torch.randn(n, d) * 0.1)
    d = dashboard(tiny, "tuned", prompt=PROMPT, tuned_lens=lens)
    assert d.result.lens == "tuned" and "tuned lens" in d.figure_widget.layout.title.text
    d.controls["metric"].value = "kl"
    torch.testing.assert_close(torch.tensor(d.figure_widget.data[0].z, dtype=torch.float64),
                               d.result.data["kl"].double())


def test_tuned_training_shows_progress_and_cancels(tiny, tmp_path, monkeypatch):
    """The tuned lens trains a missing lens itself, reporting to the dashboard's progress
    callback (nothing global is patched: tqdm stays tqdm) and stopping between steps."""
    import tqdm.auto

    monkeypatch.setenv("TPMLAB_HOME", str(tmp_path))
    seen, bars = [], set()
    d = dashboard(tiny, "tuned", prompt=PROMPT, run=False,
                  training={"steps": 400, "rank": 4, "batch_tokens": 16, "new_tokens": 8,
                            "prompts": ["Hello there", "The capital of"]})
    d.progress.observe(lambda c: (seen.append((c["new"], d.status.value)),
                                  bars.add(tqdm.auto.tqdm)), names="value")
    job = d.run()
    deadline = time.time() + 60
    while not any("training" in s for _, s in seen) and time.time() < deadline:
        time.sleep(0.05)
    d.cancel()
    assert job.wait(30) and job.cancelled
    assert d.result is None and "cancelled" in d.status.value
    assert any("collecting" in s for _, s in seen) and any("training" in s for _, s in seen)
    assert not list(tmp_path.rglob("*.safetensors"))  # a cancelled training caches nothing
    assert bars == {tqdm.auto.tqdm} and tqdm.auto.tqdm.__module__.startswith("tqdm")


def test_attention_grid_detail_and_position(tiny):
    d = dashboard(tiny, "attention", prompt=PROMPT)
    r, a = d.result, tiny.adapter
    trace = d.figure_widget.data[0]
    assert (len(trace.y), len(trace.x)) == (a.n_layers, a.n_heads)
    torch.testing.assert_close(torch.tensor(trace.z, dtype=torch.float64), r.data["dla"][:, 0, :, 0].double())
    click(d, 1, 2)
    detail = r.cell(1, 2)
    assert detail.title == "layer 1, head 2" and "layer 1, head 2" in d.detail.value
    top = tiny.tokenizer.decode([int(r.data["dla_top_ids"][1, 0, 2, 0])])
    assert r.token(r.data["dla_top_ids"][1, 0, 2, 0]) == top
    assert detail.tables[0].rows[0][0] == top and len(detail.tables[1].rows) == 5
    d.controls["metric"].value = "alone_top_prob"
    torch.testing.assert_close(torch.tensor(d.figure_widget.data[0].z, dtype=torch.float64),
                               r.data["alone_top_probs"][:, 0, :, 0].double())
    position = d.inputs["positions"]  # a live option: the prompt's positions, the last chosen
    assert position.value == 9 and [label for label, _ in position.options][3] == "3:\u2423Tower"
    position.value = 3  # a new position: a background request
    d.wait(60)
    assert int(d.result.data["positions"][0]) == 3 and "position 3" in d.figure_widget.layout.title.text
    assert d._selected() == (1, 2)  # the same grid: the selected head stays
    position.value = 9  # read before: shown again without running
    assert d.result is r and "kept from an earlier run" in d.status.value


def test_memory_injection_heatmap_bars_and_cancel(tiny):
    d = dashboard(tiny, "memory_injection",
                  prompt="The Eiffel Tower is in => Paris; Rome is the capital of => Italy",
                  memory="France", taus=(1, 4), max_invokes_per_pass=4)
    r = d.result
    heat, before, after = d.figure_widget.data
    assert (heat.type, before.type, after.type) == ("heatmap", "bar", "bar")
    assert (len(heat.z), len(heat.z[0])) == (tiny.adapter.n_layers, 2)
    assert len(d.result.data["after"][0]) == tiny.adapter.n_layers and r.options["passes"] == 5
    assert len(r.provenance.plan_digests) == 5  # one provenance, from every pass
    assert d.inputs["taus"].value == "1, 4" and r.options["memory"] == "France"
    d.controls["layer"].value, d.controls["tau"].value = 0, 0
    torch.testing.assert_close(torch.tensor(after.y), r.data["after"][:, 0, 0].double(), check_dtype=False)
    d.controls["tau"].value = 1
    torch.testing.assert_close(torch.tensor(d.figure_widget.data[2].y),
                               r.data["after"][:, 0, 1].double(), check_dtype=False)
    torch.testing.assert_close(torch.tensor(d.figure_widget.data[1].y), r.data["before"].double(),
                               check_dtype=False)
    d.controls["metric"].value = "fraction_improved"
    assert max(max(row) for row in d.figure_widget.data[0].z) <= 1.0
    # cancel between passes (here as soon as the first pass is reported, from the job's own
    # thread, so the moment does not depend on the machine's load): the previous result stays
    d.options["max_invokes_per_pass"] = 1
    calls = []

    def on_progress(change):
        calls.append(change["new"])
        if change["new"] > 0:
            d.cancel()

    d.progress.observe(on_progress, names="value")
    job = d.run()
    assert job.wait(60) and job.cancelled and d.result is r
    d.progress.unobserve(on_progress, names="value")
    assert max(calls) == pytest.approx(1 / 18)  # the lens stopped at its next pass boundary
    assert "cancelled (showing the previous result)" in d.status.value


def test_patching_marks_subject(tiny):
    d = dashboard(tiny, "patching", prompt=PROMPT, subject="The Eiffel Tower", samples=2)
    r = d.result
    subject = r.data["subject_positions"].tolist()
    v = r.grid(None, d._selected())
    assert v.marked_cols == subject and v.shape == tuple(r.data["effect"].shape)
    assert d._selected() == r.clip(*r.focus())  # the peak is selected first
    assert all(d.figure_widget.data[0].x[p].startswith("\u25b8") for p in subject)
    assert len([s for s in d.figure_widget.layout.shapes if s.line.dash == "dot"]) == len(subject)
    click(d, 2, subject[-1])
    assert "subject token</td><td>yes" in d.detail.value
    assert f"{float(r.data['effect'][2, subject[-1]]):.4f}" in d.detail.value


def test_runs_in_background_and_late_results_are_dropped(tiny):
    d = dashboard(tiny, "logit", prompt=PROMPT)
    first = d.result
    gate = threading.Event()
    slow = type(d).compute

    def compute(self, job, request):
        gate.wait(30)
        return slow(self, job, request)

    d.compute = compute.__get__(d)
    d.prompt.value = "Paris is the capital of"
    t = time.perf_counter()
    old = d.run()
    assert time.perf_counter() - t < 0.5 and not old.done  # the caller is not blocked
    d.compute = slow.__get__(d)
    d.prompt.value = "Rome is the capital of"
    new = d.run()  # supersedes (cancels) the first request, which finishes its pass first
    gate.set()
    assert old.wait(60) and old.cancelled
    assert new.wait(60) and d.result.tokens[-1] == " of"
    assert "Rome" in "".join(d.result.tokens) and d.result is not first


def test_errors_are_shown_not_raised(tiny):
    d = dashboard(tiny, "patching", prompt=PROMPT, subject="Louvre")
    assert d.result is None and "LensInputError" in d.status.value and "Louvre" in d.status.value
    assert "Louvre" in d.figure_widget.layout.annotations[0].text


def test_job_progress_is_the_lens_callback():
    """``job.progress`` reports, and raises Cancelled once the job is cancelled: a lens's
    ``run`` stops at its next call, between passes."""
    events = []

    def work(job):
        for i in range(3):
            job.progress(i + 1, 3, "steps")
        return 7

    job = Job(work, on_progress=lambda *a: events.append(a))
    assert job.run_here().result == 7 and events == [(1, 3, "steps"), (2, 3, "steps"), (3, 3, "steps")]
    job = Job(work)
    job.cancel()
    job.run_here()
    assert job.cancelled and job.result is None and isinstance(Cancelled("x"), Exception)


def test_unknown_lens():
    with pytest.raises(tpmlab.lenses.LensNotFoundError, match="no lens named 'nope'"):
        dashboard(None, "nope")


def test_unknown_option_is_named(tiny):
    with pytest.raises(LensInputError, match="lens 'logit' has no option 'colour'"):
        dashboard(tiny, "logit", prompt=PROMPT, colour="red")


def test_a_zero_up_to_rounding_is_shown_without_a_sign(logit_dash):
    """The detail panel and hover text print "0.0000", never "-0.0000", for a KL or entropy of
    -0.0 or a hair below zero (what the sign of rounding noise gives on some thread counts)."""
    import dataclasses

    r = logit_dash.result
    data = {k: v.clone() for k, v in r.data.items()}
    data["kl"][-1, -1], data["entropy"][-1, -1] = -0.0, -0.0
    data["kl"][-1, -2], data["entropy"][-1, -2] = -3e-9, -3e-9
    noisy = dataclasses.replace(r, data=data)
    for pos in (-1, -2):
        detail = noisy.cell(-1, pos)
        assert detail.facts["KL(final || layer)"] == "0.0000 nats"
        assert detail.facts["entropy"] == "0.0000 nats"
        assert "-0.0" not in figures.detail_html(detail)
    view = noisy.grid("kl")
    assert "KL 0.000, entropy 0.000 nats" in view.hover[-1][-1]
    assert "-0.000" not in view.hover[-1][-1] + view.hover[-1][-2]


def test_replacing_the_placeholder_tells_the_browser_to_drop_it(monkeypatch):
    """The browser merges a new layout into the old one (Plotly.relayout): what the placeholder
    had and the heatmap leaves out must be reset explicitly, or "press Run" stays on screen.
    (tests/widgets/test_browser.py checks the page itself.)"""
    import plotly.graph_objects as go

    from tpmlab.widgets.dashboards import _sync

    fw = go.FigureWidget(figures.placeholder_figure("press Run"))
    sent = []
    monkeypatch.setattr(fw, "_send_relayout_msg", lambda data, source_view_id=None: sent.append(data))
    view = plotting.HeatmapView(z=[[0.1, 0.2]], x=["0:a", "1:b"], y=["0"], text=None,
                                hover=[["", ""]], title="t", x_title="position", y_title="layer",
                                colorbar="c")
    _sync(fw, plotting.heatmap_figure(view))
    reset = {k: v for msg in sent for k, v in msg.items() if v is None}
    assert {"annotations", "xaxis.visible"} <= set(reset), sent
    assert fw.layout.annotations == () and fw.layout.xaxis.visible is None
