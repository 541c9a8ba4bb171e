"""Interactive lens dashboards: ipywidgets controls around a plotly figure.

Each dashboard holds a lens result and the controls' state; :meth:`LensDashboard.view`
and :meth:`LensDashboard.figure` compute what is shown from those two alone (see
:mod:`tpmlab.widgets.views`), so the logic is tested without a browser. Requests run in a
background :class:`~tpmlab.widgets.jobs.Job` (the kernel stays free; Cancel stops a sweep
between batches and drops a late result).

Displayed in a notebook, a dashboard writes three outputs: the live widget (controls, a
``plotly.graph_objects.FigureWidget`` whose cells can be clicked, the detail panel), then a
static copy of the detail panel and of the figure (``application/vnd.plotly.v1+json``),
refreshed on every change. A ``<style>`` inside the live widget hides the static copy while
the widget is rendered; a saved notebook opened without a kernel has no widget, so it shows
the static figure. Widget state need not be saved (and should not be: plotly's widget
carries its whole JavaScript bundle, about 5 MB).
"""

from __future__ import annotations

import html
import threading
import uuid
from typing import Any, ClassVar

import tpmlab.lenses

from . import figures, views
from .jobs import Cancelled, Job, model_lock, tqdm_progress

_CSS = """
<style>
.jp-OutputArea-child:has(.{marker}), .jp-OutputArea-child:has(.{marker}) + .jp-OutputArea-child {{
  display: none; }}
.tpmlab-dash .tpmlab-detail {{ font-size: 12px; line-height: 1.35; padding: 4px 8px; }}
.tpmlab-dash .tpmlab-detail table {{ border-collapse: collapse; margin: 6px 0; width: 100%; }}
.tpmlab-dash .tpmlab-detail th {{ text-align: left; border-bottom: 1px solid #ccc; font-weight: 600; }}
.tpmlab-dash .tpmlab-detail td {{ padding: 1px 6px 1px 0; vertical-align: top; }}
.tpmlab-dash .tpmlab-detail code {{ background: #f3f4f6; padding: 0 3px; border-radius: 3px; }}
.tpmlab-dash .tpmlab-status {{ font-size: 12px; color: #555; }}
</style>
"""


def _layout(**kw: Any):
    import ipywidgets as w

    return w.Layout(**kw)


class LensDashboard:
    """Base of the dashboards: prompt box, Run/Cancel, progress, controls, figure, detail.

    Subclasses define :attr:`lens`, :meth:`_make_controls`, :meth:`compute` (runs in the
    job thread), :meth:`view`/:meth:`figure`, :meth:`detail_data` and :meth:`select`."""

    lens: ClassVar[str] = ""
    title: ClassVar[str] = "lens"

    def __init__(self, model: Any, prompt: str = "", *, run: bool = True, **options: Any) -> None:
        import ipywidgets as w
        import plotly.graph_objects as go

        self.model = model
        self.options = options
        self.result: Any = None
        self.error: BaseException | None = None
        self.job: Job | None = None
        self._marker = f"tpmlab-static-{uuid.uuid4().hex[:10]}"
        self._handles: list[tuple[Any, Any]] = []
        self._quiet = 0  # > 0 while controls are set programmatically
        self._lock = threading.RLock()

        self.prompt = w.Text(value=prompt, description="prompt", placeholder="a prompt",
                             layout=_layout(flex="1 1 auto", min_width="320px"))
        self.run_button = w.Button(description="Run", button_style="primary", icon="play",
                                   layout=_layout(width="90px"))
        self.cancel_button = w.Button(description="Cancel", icon="stop", disabled=True,
                                      layout=_layout(width="90px"))
        self.progress = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                        layout=_layout(width="160px"))
        self.status = w.HTML(value="", layout=_layout(flex="1 1 auto"))
        self.run_button.on_click(lambda _b: self.run())
        self.cancel_button.on_click(lambda _b: self.cancel())
        self.inputs: dict[str, Any] = self._make_inputs()
        self.controls: dict[str, Any] = self._make_controls()
        for control in self.controls.values():
            control.observe(self._on_control, names="value")
        self.figure_widget = go.FigureWidget(figures.placeholder_figure("press Run"))
        self.detail = w.HTML(value=figures.detail_html(None),
                             layout=_layout(width="300px", min_width="240px", overflow="auto"))
        self._style = w.HTML(value=_CSS.format(marker=self._marker))
        first_row = [self.prompt, *self.inputs.values(), self.run_button, self.cancel_button]
        self.widget = w.VBox([
            self._style,
            w.HBox(first_row, layout=_layout(flex_flow="row wrap", align_items="center")),
            w.HBox([self.progress, self.status], layout=_layout(align_items="center")),
            w.HBox(list(self.controls.values()), layout=_layout(flex_flow="row wrap")),
            w.HBox([w.Box([self.figure_widget], layout=_layout(flex="1 1 auto", min_width="480px")),
                    self.detail], layout=_layout(align_items="flex-start")),
        ])
        self.widget.add_class("tpmlab-dash")
        self.status.add_class("tpmlab-status")
        if run and self.prompt.value:
            self.run(wait=True)
        else:
            self.refresh()

    # -- to override ----------------------------------------------------------------------------------
    def _make_inputs(self) -> dict[str, Any]:
        """Widgets beside the prompt whose change needs a new run."""
        return {}

    def _make_controls(self) -> dict[str, Any]:
        """Widgets that change only the view of the current result."""
        return {}

    def request(self) -> dict[str, Any]:
        """The inputs of a run, read on the calling thread."""
        return {"prompt": self.prompt.value, **{k: v.value for k, v in self.inputs.items()}}

    def compute(self, job: Job, request: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _reset_controls(self) -> None:
        """Fit the controls to a new result (keeping the selection where it still fits)."""

    def view(self) -> views.HeatmapView:
        raise NotImplementedError

    def figure(self):
        """The plotly figure of the current result and controls."""
        return figures.heatmap_figure(self.view())

    def detail_data(self) -> dict[str, Any] | None:
        return None

    def select(self, row: int, col: int) -> None:
        """Select cell ``(row, col)`` of the heatmap (what a click does)."""
        raise NotImplementedError

    # -- running --------------------------------------------------------------------------------------
    def run(self, *, wait: bool = False) -> Job:
        """Run the lens on the current inputs, in a background thread (``wait``: on this one).
        A run still going is cancelled first."""
        if self.job is not None and not self.job.done:
            self.job.cancel()
        request = self.request()
        job = Job(lambda j: self._locked(j, request), name=self.lens, on_progress=self._on_progress)
        job.on_done = lambda result: self._apply(job, result)
        job.on_error = lambda e: self._failed(job, e)
        job.on_cancel = lambda: self._cancelled(job)
        self.job = job
        self.error = None
        self.run_button.disabled, self.cancel_button.disabled = False, False
        self.progress.value, self.progress.bar_style = 0.0, "info"
        self._set_status("running\u2026")
        return job.run_here() if wait else job.start()

    def cancel(self) -> None:
        """Stop the running request (between batches); its result, if any, is dropped."""
        if self.job is not None and not self.job.done:
            self.job.cancel()
            self._set_status("cancelling\u2026")

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the current request is done; return the result (re-raise its error)."""
        if self.job is not None:
            self.job.wait(timeout)
            if self.job.error is not None:
                raise self.job.error
        self.refresh()
        return self.result

    def _locked(self, job: Job, request: dict[str, Any]) -> Any:
        lock = model_lock(self.model)
        while not lock.acquire(timeout=0.1):
            job.check()
        try:
            job.check()
            return self.compute(job, request)
        finally:
            lock.release()

    def _on_progress(self, done: int, total: int, text: str) -> None:
        self.progress.value = done / total if total else 0.0
        self._set_status(f"{html.escape(text)} {done}/{total}" if total else html.escape(text))

    def _apply(self, job: Job, result: Any) -> None:
        if job is not self.job:  # superseded: a newer request owns the dashboard
            return
        with self._lock:
            self.result = result
            self._quiet += 1
            try:
                self._reset_controls()
            finally:
                self._quiet -= 1
        self.cancel_button.disabled = True
        self.progress.value, self.progress.bar_style = 1.0, "success"
        self._set_status(f"done in {job.seconds:.1f} s \u00b7 plan "
                         f"<code>{html.escape(self.result.plan_digest[:19])}</code>")
        self.refresh()

    def _failed(self, job: Job, e: BaseException) -> None:
        if job is not self.job:
            return
        self.error = e
        self.cancel_button.disabled = True
        self.progress.bar_style = "danger"
        self._set_status(f"<b>{type(e).__name__}</b>: {html.escape(str(e))}")
        if self.result is None:
            self.refresh()

    def _cancelled(self, job: Job) -> None:
        if job is not self.job:
            return
        self.cancel_button.disabled = True
        self.progress.bar_style = "warning"
        self._set_status("cancelled" + (" (showing the previous result)" if self.result is not None else ""))

    def _set_status(self, text: str) -> None:
        self.status.value = f"<span>{text}</span>"

    # -- showing ----------------------------------------------------------------------------------------
    def _on_control(self, change: dict[str, Any]) -> None:
        if not self._quiet:
            self.refresh()

    def current_figure(self):
        """:meth:`figure`, or a placeholder before the first result."""
        if self.result is None:
            message = (f"{type(self.error).__name__}: {self.error}" if self.error is not None
                       else "enter a prompt and press Run")
            return figures.placeholder_figure(message)
        return self.figure()

    def refresh(self) -> None:
        """Redraw the figure, the detail panel and the static copy from the current state."""
        with self._lock:
            fig = self.current_figure()
            _sync(self.figure_widget, fig)
            if self.figure_widget.data:
                self.figure_widget.data[0].on_click(self._clicked)
            detail = self.detail_data() if self.result is not None else None
            self.detail.value = figures.detail_html(detail)
            for text_handle, fig_handle in self._handles:
                text_handle.update(self._static_text(detail), raw=True)
                fig_handle.update(figures.static_bundle(fig, self._summary()), raw=True)

    def _clicked(self, trace: Any, points: Any, state: Any) -> None:
        if not points.point_inds or self.result is None:
            return
        x, y = list(trace.x), list(trace.y)
        try:
            row, col = y.index(points.ys[0]), x.index(points.xs[0])
        except ValueError:
            return
        self.select(row, col)

    def _summary(self) -> str:
        if self.result is None:
            return f"{self.title} dashboard (no result)"
        return f"{self.title} dashboard: {self.result.provenance.model}, plan {self.result.plan_digest[:19]}"

    def _static_text(self, detail: dict[str, Any] | None) -> dict[str, str]:
        body = figures.detail_html(detail, marker=self._marker) if detail else \
            f'<div class="{self._marker}"><i>{html.escape(self._summary())}</i></div>'
        return {"text/html": body, "text/plain": self._summary()}

    def _ipython_display_(self) -> None:
        from IPython.display import display

        live = dict(self.widget._repr_mimebundle_())
        live["text/plain"] = f"<{self.title} dashboard: live controls, shown with a running kernel>"
        display(live, raw=True)
        fig = self.current_figure()
        detail = self.detail_data() if self.result is not None else None
        self._handles.append((
            display(self._static_text(detail), raw=True, display_id=True),
            display(figures.static_bundle(fig, self._summary()), raw=True, display_id=True)))

    def _set_quietly(self, **values: Any) -> None:
        self._quiet += 1
        try:
            for name, value in values.items():
                self.controls[name].value = value
        finally:
            self._quiet -= 1


def _sync(fw: Any, fig: Any) -> None:
    """Make FigureWidget ``fw`` show ``fig``. Traces are replaced, not updated, so that
    properties one view sets and the next leaves out (``zmin``, ``zmid``) do not linger.

    The layout needs more care: the browser applies a new layout with ``Plotly.relayout``,
    which *merges*, so what the old layout had and the new one leaves out (the placeholder's
    "press Run" annotation, its hidden axes) would stay on screen although the Python side
    has forgotten it. Those properties are reset explicitly first (``null`` in a relayout
    restores plotly's default; for ``annotations`` and ``shapes`` it removes them all).
    """
    new = fig.to_dict()
    stale = _left_out(fw.layout.to_plotly_json(), new["layout"])
    if stale:
        fw.plotly_relayout(stale)
    with fw.batch_update():
        fw.layout = new["layout"]
    fw.data = []
    if new["data"]:
        fw.add_traces(new["data"])


def _left_out(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, None]:
    """``{"path.to.property": None}`` for each property of ``old`` that ``new`` does not set."""
    out: dict[str, None] = {}
    for key, value in old.items():
        if key == "template" and not prefix:
            continue  # every figure here sets the same template in full
        if key not in new:
            out[prefix + key] = None
        elif isinstance(value, dict) and isinstance(new[key], dict):
            out.update(_left_out(value, new[key], f"{prefix}{key}."))
    return out


def _options(labels: list[str]) -> list[tuple[str, int]]:
    return [(label, i) for i, label in enumerate(labels)]


def _keep(value: Any, n: int, default: int) -> int:
    return value if isinstance(value, int) and 0 <= value < n else default % n


# -- logit lens and tuned lens --------------------------------------------------------------------

class LogitLensDashboard(LensDashboard):
    """Logit lens: layers x positions, top token per cell, metric menu, layer and position
    sliders; a click shows the cell's top-k."""

    lens = "logit"
    title = "logit lens"

    def _make_controls(self) -> dict[str, Any]:
        import ipywidgets as w

        return {
            "metric": w.Dropdown(options=list(views.LOGIT_METRICS),
                                 value=self.options.get("metric", "probability"),
                                 description="metric", layout=_layout(width="240px")),
            "layer": w.SelectionSlider(options=[("-", 0)], description="layer",
                                       continuous_update=False, layout=_layout(width="320px")),
            "position": w.SelectionSlider(options=[("-", 0)], description="position",
                                          continuous_update=False, layout=_layout(width="360px")),
        }

    def compute(self, job: Job, request: dict[str, Any]) -> Any:
        job.progress(0, 1, f"{self.lens} lens")
        result = tpmlab.lenses.get("logit").run(self.model, request["prompt"],
                                                top_k=self.options.get("top_k", views.TOP_N))
        job.progress(1, 1, f"{self.lens} lens")
        return result

    def _reset_controls(self) -> None:
        r = self.result
        layer, pos = self.controls["layer"], self.controls["position"]
        old_layer, old_pos = layer.value, pos.value
        layer.options = _options(list(r.rows))
        pos.options = _options(views.position_labels(r.tokens))
        layer.value = _keep(old_layer if self._had_result else None, len(r.rows), -1)
        pos.value = _keep(old_pos if self._had_result else None, len(r.tokens), -1)
        self._had_result = True

    _had_result = False

    def view(self) -> views.HeatmapView:
        c = self.controls
        return views.logit_view(self.result, c["metric"].value, (c["layer"].value, c["position"].value))

    def detail_data(self) -> dict[str, Any]:
        return views.logit_cell(self.result, self.controls["layer"].value, self.controls["position"].value)

    def select(self, row: int, col: int) -> None:
        self._set_quietly(layer=row, position=col)
        self.refresh()


class TunedLensDashboard(LogitLensDashboard):
    """Tuned lens: as the logit lens; a model without a trained lens gets one trained first
    (progress bar, cancellable between steps) and cached in ``$TPMLAB_HOME``.

    Options: ``tuned_lens`` (a ready :class:`TunedLens`), ``train`` (keyword arguments for the
    lens's ``train``)."""

    lens = "tuned"
    title = "tuned lens"

    def compute(self, job: Job, request: dict[str, Any]) -> Any:
        tuned = tpmlab.lenses.get("tuned")
        lens = self.options.get("tuned_lens")
        if lens is None:
            try:
                lens = tuned.load(self.model)
            except FileNotFoundError:
                with tqdm_progress(job):
                    lens = tuned.train(self.model, **self.options.get("train", {}))
                job.check()
                lens.save(tuned.cache_path(self.model))
            self.options["tuned_lens"] = lens
        job.progress(0, 1, "tuned lens")
        result = tuned.run(self.model, request["prompt"], lens=lens,
                           top_k=self.options.get("top_k", views.TOP_N))
        job.progress(1, 1, "tuned lens")
        return result


# -- attention lens -----------------------------------------------------------------------------------

class AttentionLensDashboard(LensDashboard):
    """Attention lens: a layer x head grid at one position (top token per cell), metric
    menu, layer/head sliders; changing the position runs the lens there (results cached)."""

    lens = "attention"
    title = "attention lens"

    def __init__(self, model: Any, prompt: str = "", **options: Any) -> None:
        self._cache: dict[tuple[str, int], Any] = {}
        super().__init__(model, prompt, **options)

    def _make_controls(self) -> dict[str, Any]:
        import ipywidgets as w

        a = self.model.adapter
        controls = {
            "metric": w.Dropdown(options=list(views.ATTENTION_METRICS), description="metric",
                                 value=self.options.get("metric", "direct logit attribution"),
                                 layout=_layout(width="300px")),
            "position": w.Dropdown(options=[("-", 0)], description="position", layout=_layout(width="220px")),
            "layer": w.SelectionSlider(options=_options([str(i) for i in range(a.n_layers)]),
                                       value=a.n_layers - 1, description="layer",
                                       continuous_update=False, layout=_layout(width="300px")),
            "head": w.IntSlider(min=0, max=a.n_heads - 1, value=0, description="head",
                                continuous_update=False, layout=_layout(width="260px")),
        }
        self.prompt.observe(lambda _c: self._fit_positions(), names="value")
        return controls

    def _fit_positions(self) -> None:
        from tpmlab.lenses.common import token_ids, token_strings

        text = self.prompt.value
        if not text:
            return
        labels = views.position_labels(token_strings(self.model, token_ids(self.model, text)))
        control = self.controls["position"]
        if [o[0] for o in control.options] != labels:
            self._quiet += 1
            try:
                control.options = _options(labels)
                control.value = len(labels) - 1
            finally:
                self._quiet -= 1

    def request(self) -> dict[str, Any]:
        self._fit_positions()
        return {"prompt": self.prompt.value, "position": self.controls["position"].value}

    def _on_control(self, change: dict[str, Any]) -> None:
        if self._quiet:
            return
        if change["owner"] is self.controls["position"] and self.result is not None:
            key = (self.prompt.value, change["new"])
            if key in self._cache:
                self.result = self._cache[key]
            else:
                self.run()
                return
        self.refresh()

    def compute(self, job: Job, request: dict[str, Any]) -> Any:
        key = (request["prompt"], request["position"])
        if key not in self._cache:
            job.progress(0, 1, "attention lens")
            self._cache[key] = tpmlab.lenses.get("attention").run(
                self.model, request["prompt"], positions=[request["position"]],
                top_k=self.options.get("top_k", views.TOP_N))
        job.progress(1, 1, "attention lens")
        return self._cache[key]

    def view(self) -> views.HeatmapView:
        c = self.controls
        return views.attention_view(self.result, c["metric"].value, 0, (c["layer"].value, c["head"].value))

    def detail_data(self) -> dict[str, Any]:
        return views.head_detail(self.result, self.controls["layer"].value, self.controls["head"].value, 0)

    def select(self, row: int, col: int) -> None:
        self._set_quietly(layer=row, head=col)
        self.refresh()


# -- memory injection ---------------------------------------------------------------------------------

def _merge_provenance(results: list[Any]) -> Any:
    prov = results[0].provenance
    for r in results[1:]:
        prov.plan_digests.extend(r.provenance.plan_digests)
    return prov


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


class MemoryInjectionDashboard(LensDashboard):
    """Memory injection: a layer x tau heatmap of a summary statistic beside before/after
    bars of the selected cell. The prompt box holds ``prompt => answer`` lines (``;``
    separates several). The sweep runs a few layers per request, with progress and Cancel.

    Options: ``memory``, ``taus`` (default ``1, 2, 4, 8``), ``layers``, ``variant``,
    ``layers_per_batch``."""

    lens = "memory_injection"
    title = "memory injection"

    def _make_inputs(self) -> dict[str, Any]:
        import ipywidgets as w

        taus = self.options.get("taus", (1.0, 2.0, 4.0, 8.0))
        return {
            "memory": w.Text(value=self.options.get("memory", ""), description="memory",
                             layout=_layout(width="220px")),
            "taus": w.Text(value=", ".join(f"{t:g}" for t in taus), description="\u03c4",
                           layout=_layout(width="160px")),
        }

    def _make_controls(self) -> dict[str, Any]:
        import ipywidgets as w

        return {
            "stat": w.Dropdown(options=list(views.MEMORY_STATS), value="mean_delta",
                               description="statistic", layout=_layout(width="260px")),
            "layer": w.SelectionSlider(options=[("-", 0)], description="layer",
                                       continuous_update=False, layout=_layout(width="300px")),
            "tau": w.SelectionSlider(options=[("-", 0)], description="\u03c4",
                                     continuous_update=False, layout=_layout(width="260px")),
        }

    @staticmethod
    def parse_prompts(text: str) -> tuple[list[str], list[str]]:
        """``"prompt => answer; prompt => answer"`` (or one per line) as two lists."""
        prompts, answers = [], []
        for part in text.replace("\n", ";").split(";"):
            if not part.strip():
                continue
            if "=>" not in part:
                raise ValueError(f"write each prompt as 'prompt => answer', got {part.strip()!r}")
            prompt, answer = part.split("=>", 1)
            prompts.append(prompt.strip())
            answers.append(" " + answer.strip())
        return prompts, answers

    def compute(self, job: Job, request: dict[str, Any]) -> Any:
        from tpmlab.lenses.common import layer_list

        mi = tpmlab.lenses.get("memory_injection")
        prompts, answers = self.parse_prompts(request["prompt"])
        if not request["memory"].strip():
            raise ValueError("enter a memory (the text to inject)")
        taus = [float(t) for t in request["taus"].replace(",", " ").split()]
        layers = layer_list(self.model, self.options.get("layers"))
        per_layer = len(prompts) * len(taus)
        size = self.options.get("layers_per_batch") or max(1, mi.MAX_INVOKES_PER_PASS // max(1, per_layer))
        memory = mi.memory_vector(self.model, request["memory"], self.options.get("variant", "embed"))
        parts = []
        chunks = _chunks(layers, size)
        for i, chunk in enumerate(chunks):
            job.progress(i, len(chunks), "memory injection: layers")
            parts.append(mi.sweep(self.model, prompts, answers, memory=memory, layers=chunk, taus=taus,
                                  variant=self.options.get("variant", "embed")))
        job.progress(len(chunks), len(chunks), "memory injection: layers")
        import torch

        first = parts[0]
        data = dict(first.data, after=torch.cat([p.data["after"] for p in parts], 1))
        options = dict(first.options, passes=sum(p.options["passes"] for p in parts),
                       memory_text=request["memory"])
        return type(first)(data=data, provenance=_merge_provenance(parts), options=options,
                           prompts=prompts, layers=[x for p in parts for x in p.layers], taus=taus)

    def _reset_controls(self) -> None:
        r = self.result
        layer, tau = self.controls["layer"], self.controls["tau"]
        layer.options = _options([str(x) for x in r.layers])
        tau.options = _options([f"{t:g}" for t in r.taus])
        best = r.best()
        layer.value, tau.value = r.layers.index(best["layer"]), r.taus.index(best["tau"])

    def view(self) -> views.HeatmapView:
        c = self.controls
        return views.memory_view(self.result, c["stat"].value, (c["layer"].value, c["tau"].value))

    def figure(self):
        c = self.controls
        return figures.memory_figure(self.view(), views.memory_bars(self.result, c["layer"].value,
                                                                    c["tau"].value))

    def detail_data(self) -> dict[str, Any]:
        return views.memory_cell(self.result, self.controls["layer"].value, self.controls["tau"].value)

    def select(self, row: int, col: int) -> None:
        self._set_quietly(layer=row, tau=col)
        self.refresh()


# -- activation patching ------------------------------------------------------------------------------

class PatchingDashboard(LensDashboard):
    """Causal tracing: indirect effect per layer x position with the subject tokens marked;
    layer/position sliders; a click shows the cell's probabilities. Runs a few layers per
    request, with progress and Cancel.

    Options: ``subject``, ``answer`` (default: the model's top-1), ``kind``
    (``resid``/``attn``/``mlp``), ``samples``, ``window``, ``layers``."""

    lens = "patching"
    title = "causal tracing"

    def _make_inputs(self) -> dict[str, Any]:
        import ipywidgets as w

        return {
            "subject": w.Text(value=self.options.get("subject", ""), description="subject",
                              layout=_layout(width="240px")),
            "answer": w.Text(value=self.options.get("answer", ""), description="answer",
                             placeholder="model's top-1", layout=_layout(width="200px")),
            "kind": w.Dropdown(options=["resid", "attn", "mlp"], value=self.options.get("kind", "resid"),
                               description="state", layout=_layout(width="170px")),
        }

    def _make_controls(self) -> dict[str, Any]:
        import ipywidgets as w

        return {
            "layer": w.SelectionSlider(options=[("-", 0)], description="layer",
                                       continuous_update=False, layout=_layout(width="300px")),
            "position": w.SelectionSlider(options=[("-", 0)], description="position",
                                          continuous_update=False, layout=_layout(width="360px")),
        }

    def compute(self, job: Job, request: dict[str, Any]) -> Any:
        import torch

        from tpmlab.lenses.common import layer_list, token_ids

        patching = tpmlab.lenses.get("patching")
        if not request["subject"].strip():
            raise ValueError("enter the subject (a part of the prompt to corrupt)")
        n_pos = len(token_ids(self.model, request["prompt"]))
        layers = layer_list(self.model, self.options.get("layers"))
        size = self.options.get("layers_per_batch") or max(1, patching.MAX_INVOKES_PER_PASS // n_pos)
        chunks = _chunks(layers, size)
        kw = {"subject": request["subject"], "answer": request["answer"] or None,
              "kind": request["kind"], "samples": self.options.get("samples", 5),
              "window": self.options.get("window", 1 if request["kind"] == "resid" else 10),
              "seed": self.options.get("seed", 0)}
        parts = []
        for i, chunk in enumerate(chunks):
            job.progress(i, len(chunks), "causal tracing: layers")
            parts.append(patching.causal_trace(self.model, request["prompt"], layers=chunk, **kw))
        job.progress(len(chunks), len(chunks), "causal tracing: layers")
        first = parts[0]  # same seed: the same noise and baselines in every part
        data = dict(first.data, effect=torch.cat([p.data["effect"] for p in parts], 0))
        options = dict(first.options, passes=sum(p.options["passes"] for p in parts))
        return type(first)(data=data, provenance=_merge_provenance(parts), options=options,
                           layers=[x for p in parts for x in p.layers], tokens=first.tokens)

    def _reset_controls(self) -> None:
        r = self.result
        layer, pos = self.controls["layer"], self.controls["position"]
        layer.options = _options([str(x) for x in r.layers])
        pos.options = _options(views.position_labels(r.tokens))
        peak = r.peak()
        layer.value, pos.value = r.layers.index(peak["layer"]), peak["position"]

    def view(self) -> views.HeatmapView:
        c = self.controls
        return views.patching_view(self.result, (c["layer"].value, c["position"].value))

    def detail_data(self) -> dict[str, Any]:
        return views.patching_cell(self.result, self.controls["layer"].value, self.controls["position"].value)

    def select(self, row: int, col: int) -> None:
        self._set_quietly(layer=row, position=col)
        self.refresh()


DASHBOARDS: dict[str, type[LensDashboard]] = {
    "logit": LogitLensDashboard,
    "tuned": TunedLensDashboard,
    "attention": AttentionLensDashboard,
    "memory_injection": MemoryInjectionDashboard,
    "patching": PatchingDashboard,
}
ALIASES = {"memory": "memory_injection", "causal_trace": "patching", "causal_tracing": "patching"}


def dashboard(model: Any, lens: str = "logit", prompt: str = "", **options: Any) -> LensDashboard:
    """An interactive dashboard of ``lens`` on ``model`` (see :data:`DASHBOARDS`).

    With a prompt, the first run happens now (so the displayed dashboard already shows it);
    later runs (the Run button, :meth:`LensDashboard.run`) go to a background thread.

    >>> tpmlab.widgets.dashboard(model, "logit", prompt="The Eiffel Tower is in")   # doctest: +SKIP
    """
    name = ALIASES.get(lens, lens)
    if name not in DASHBOARDS:
        raise ValueError(f"no dashboard for lens {lens!r}; choose from {sorted(DASHBOARDS)}")
    return DASHBOARDS[name](model, prompt, **options)


__all__ = ["ALIASES", "DASHBOARDS", "AttentionLensDashboard", "Cancelled", "LensDashboard",
           "LogitLensDashboard", "MemoryInjectionDashboard", "PatchingDashboard",
           "TunedLensDashboard", "dashboard"]
