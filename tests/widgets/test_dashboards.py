"""Dashboard logic without a browser: real lens runs on a tiny model; changing a control
changes the figure's data as expected; clicks fill the detail panel; long requests report
progress, can be cancelled, and a late result is dropped."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import tpmlab.lenses
from tpmlab.widgets import dashboard, figures, views
from tpmlab.widgets.jobs import Cancelled, Job, tqdm_progress

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
    assert trace.text[2][3] == views.token_label(r.top_tokens[2][3][0], 7)  # top token in the cell
    hover = trace.hovertext[2][3]  # top-k with probabilities on hover
    assert all(views.token_label(t, 16) in hover for t in r.top_tokens[2][3])
    assert f"{r.data['top_probs'][2, 3, 0]:.3f}" in hover
    assert "done in" in d.status.value and d.progress.value == 1.0


def test_metric_menu_changes_z(logit_dash):
    d, r = logit_dash, logit_dash.result
    before = [list(row) for row in d.figure_widget.data[0].z]
    for metric, key in [("KL", "kl"), ("entropy", "entropy")]:
        d.controls["metric"].value = metric
        z = torch.tensor(d.figure_widget.data[0].z, dtype=torch.float64)
        torch.testing.assert_close(z, r.data[key].double())
        assert d.figure_widget.data[0].colorbar.title.text == views.LOGIT_METRICS[metric][1]
    d.controls["metric"].value = "rank"
    z = torch.tensor(d.figure_widget.data[0].z, dtype=torch.float64)
    torch.testing.assert_close(z, r.data["target_rank"].double().log10())
    assert z[-1].abs().max() == 0  # the last layer ranks the final top-1 first
    d.controls["metric"].value = "probability"
    assert [list(row) for row in d.figure_widget.data[0].z] == before


def test_layer_slider_moves_highlighted_row(logit_dash):
    d = logit_dash
    for row in (1, 3):
        d.controls["layer"].value = row
        (band,) = shapes(d, "selected-row")
        assert (band.y0, band.y1) == (row - 0.5, row + 0.5)
        assert d.view().selected[0] == row
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
    detail = views.logit_cell(r, 2, 4)
    assert [t for t, _ in detail["top"]] == r.top_tokens[2][4]
    assert detail["top"][0][1] == pytest.approx(float(r.data["top_probs"][2, 4, 0]))


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
    d.controls["metric"].value = "KL"
    torch.testing.assert_close(torch.tensor(d.figure_widget.data[0].z, dtype=torch.float64),
                               d.result.data["kl"].double())


def test_tuned_training_shows_progress_and_cancels(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TPMLAB_HOME", str(tmp_path))
    seen = []
    d = dashboard(tiny, "tuned", prompt=PROMPT, run=False,
                  train={"steps": 400, "rank": 4, "batch_tokens": 16, "new_tokens": 8,
                         "prompts": ["Hello there", "The capital of"]})
    d.progress.observe(lambda c: seen.append((c["new"], d.status.value)), names="value")
    job = d.run()
    deadline = time.time() + 60
    while not any("training" in s for _, s in seen) and time.time() < deadline:
        time.sleep(0.05)
    d.cancel()
    assert job.wait(30) and job.cancelled
    assert d.result is None and "cancelled" in d.status.value
    assert any("collecting" in s for _, s in seen) and any("training" in s for _, s in seen)
    assert not list(tmp_path.rglob("*.safetensors"))  # a cancelled training caches nothing


def test_attention_grid_detail_and_position(tiny):
    d = dashboard(tiny, "attention", prompt=PROMPT)
    r, a = d.result, tiny.adapter
    trace = d.figure_widget.data[0]
    assert (len(trace.y), len(trace.x)) == (a.n_layers, a.n_heads)
    torch.testing.assert_close(torch.tensor(trace.z, dtype=torch.float64), r.data["dla"][:, 0, :, 0].double())
    click(d, 1, 2)
    detail = views.head_detail(r, 1, 2, 0)
    assert detail["title"] == "layer 1, head 2" and "layer 1, head 2" in d.detail.value
    top = r.options["_decode"](int(r.data["dla_top_ids"][1, 0, 2, 0]))
    assert detail["top"][0][0] == top and len(detail["more"]) == 5
    d.controls["metric"].value = "head-alone top-1 probability"
    torch.testing.assert_close(torch.tensor(d.figure_widget.data[0].z, dtype=torch.float64),
                               r.data["alone_top_probs"][:, 0, :, 0].double())
    d.controls["position"].value = 3  # a new position: a background request
    d.wait(60)
    assert int(d.result.data["positions"][0]) == 3 and "position 3" in d.figure_widget.layout.title.text


def test_memory_injection_heatmap_bars_and_cancel(tiny):
    d = dashboard(tiny, "memory", prompt="The Eiffel Tower is in => Paris; Rome is the capital of => Italy",
                  memory="France", taus=(1, 4), layers_per_batch=2)
    r = d.result
    heat, before, after = d.figure_widget.data
    assert (len(heat.z), len(heat.z[0])) == (tiny.adapter.n_layers, 2)
    assert len(d.result.data["after"][0]) == tiny.adapter.n_layers and r.options["passes"] >= 2
    d.controls["layer"].value, d.controls["tau"].value = 0, 0
    torch.testing.assert_close(torch.tensor(after.y), r.data["after"][:, 0, 0].double(), check_dtype=False)
    d.controls["tau"].value = 1
    torch.testing.assert_close(torch.tensor(d.figure_widget.data[2].y),
                               r.data["after"][:, 0, 1].double(), check_dtype=False)
    torch.testing.assert_close(torch.tensor(d.figure_widget.data[1].y), r.data["before"].double(),
                               check_dtype=False)
    d.controls["stat"].value = "fraction_improved"
    assert max(max(row) for row in d.figure_widget.data[0].z) <= 1.0
    # cancel between batches: the previous result stays
    d.options["layers_per_batch"] = 1
    started = threading.Event()
    d.progress.observe(lambda c: started.set() if c["new"] > 0 else None, names="value")
    job = d.run()
    assert started.wait(60)
    d.cancel()
    assert job.wait(60) and job.cancelled and d.result is r


def test_patching_marks_subject(tiny):
    d = dashboard(tiny, "patching", prompt=PROMPT, subject="The Eiffel Tower", samples=2)
    r = d.result
    subject = r.data["subject_positions"].tolist()
    v = d.view()
    assert v.marked_cols == subject and v.shape == tuple(r.data["effect"].shape)
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
    assert d.result is None and "ValueError" in d.status.value and "Louvre" in d.status.value
    assert "Louvre" in d.figure_widget.layout.annotations[0].text


def test_job_and_tqdm_progress():
    events = []

    def work(job):
        from tqdm.auto import tqdm

        for _ in tqdm(range(3), desc="steps"):
            pass
        return 7

    job = Job(lambda j: _with(j, work), on_progress=lambda *a: events.append(a))
    assert job.run_here().result == 7 and events == [(1, 3, "steps"), (2, 3, "steps"), (3, 3, "steps")]
    job = Job(lambda j: _with(j, work))
    job.cancel()
    job.run_here()
    assert job.cancelled and job.result is None and isinstance(Cancelled("x"), Exception)


def _with(job, work):
    with tqdm_progress(job):
        return work(job)


def test_unknown_lens():
    with pytest.raises(ValueError, match="no dashboard for lens 'nope'"):
        dashboard(None, "nope")


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
        detail = views.logit_cell(noisy, -1, pos)
        assert detail["facts"]["KL(final || layer)"] == "0.0000 nats"
        assert detail["facts"]["entropy"] == "0.0000 nats"
        assert "-0.0" not in figures.detail_html(detail)
    view = views.logit_view(noisy, "KL")
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
    view = views.HeatmapView(z=[[0.1, 0.2]], x=["0:a", "1:b"], y=["0"], text=None,
                             hover=[["", ""]], title="t", x_title="position", y_title="layer",
                             colorbar="c")
    _sync(fw, figures.heatmap_figure(view))
    reset = {k: v for msg in sent for k, v in msg.items() if v is None}
    assert {"annotations", "xaxis.visible"} <= set(reset), sent
    assert fw.layout.annotations == () and fw.layout.xaxis.visible is None
