"""The lens dashboard: one ipywidgets + plotly dashboard for every lens, driven by its view.

:class:`LensDashboard` reads a lens only through the lens contract
(:mod:`tpmlab.lenses.contract`): the view's ``inputs`` give the prompt boxes, its options
the controls beside them, its metrics the colour menu, its axes the two sliders that move
the selected cell; the figure is the result's own ``plot(metric, selected=...)`` and the
side panel its ``cell(row, col)``. Requests run in a background
:class:`~tpmlab.widgets.jobs.Job` whose ``progress`` is the lens's progress callback (the
kernel stays free; Cancel stops the lens between its passes and drops a late result).

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
from collections import OrderedDict
from typing import Any

import tpmlab.lenses
from tpmlab.lenses.contract import LensInputError

from . import controls as ctl
from . import figures
from .jobs import Job, model_lock

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

#: Results kept per dashboard for live options (a position the attention lens already read).
CACHED_RESULTS = 16


class LensDashboard:
    """Prompt box(es), Run/Cancel, progress, the lens's option controls, a metric menu, the
    figure with a clickable grid, and the detail panel of the selected cell.

    ``lens``: a registered lens name; ``prompt``: what the prompt box(es) start with (a
    ``(clean, corrupted)`` pair for a lens whose inputs are a pair); ``run``: run at once
    when there is a prompt; ``metric``: the metric shown first; every other keyword is an
    option of the lens's ``run`` (a control's first value, or passed as it is).
    """

    def __init__(self, model: Any, lens: str = "logit", prompt: Any = "", *, run: bool = True,
                 metric: str | None = None, **options: Any) -> None:
        import ipywidgets as w
        import plotly.graph_objects as go

        self.info = tpmlab.lenses.info(lens)
        self.view = self.info.view
        unknown = sorted(k for k in options if not self.info.accepts(k))
        if unknown:
            raise LensInputError(f"lens {self.info.name!r} has no option {', '.join(map(repr, unknown))}; "
                             f"its options: {[o.name for o in self.view.options]}")
        self.model = model
        self.result: Any = None
        self.error: BaseException | None = None
        self.job: Job | None = None
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self._marker = f"tpmlab-static-{uuid.uuid4().hex[:10]}"
        self._handles: list[tuple[Any, Any]] = []
        self._quiet = 0  # > 0 while controls are set programmatically
        self._lock = threading.RLock()

        self.boxes = ctl.input_boxes(self.view.inputs, prompt)
        self.prompt = self.boxes[0]
        shown = [o for o in self.view.options if o.shown]
        #: options given as they are (objects, and options without a control)
        self.options = {k: v for k, v in options.items() if k not in {o.name for o in shown}}
        #: the option controls (changing one needs a new run; a live one runs at once)
        self.inputs: dict[str, Any] = {
            o.name: ctl.make(o, options.get(o.name, self.info.defaults.get(o.name))) for o in shown}
        self.run_button = w.Button(description="Run", button_style="primary", icon="play",
                                   layout=ctl.layout(width="90px"))
        self.cancel_button = w.Button(description="Cancel", icon="stop", disabled=True,
                                      layout=ctl.layout(width="90px"))
        self.progress = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                        layout=ctl.layout(width="160px"))
        self.status = w.HTML(value="", layout=ctl.layout(flex="1 1 auto"))
        self.run_button.on_click(lambda _b: self.run())
        self.cancel_button.on_click(lambda _b: self.cancel())
        #: controls that change only the view of the result: the metric and the selected cell
        self.controls: dict[str, Any] = {
            "metric": w.Dropdown(options=[(m.label, m.name) for m in self.view.metrics],
                                 value=self.view.metric(metric).name, description="metric",
                                 layout=ctl.layout(width="300px")),
            self.view.rows.name: w.SelectionSlider(
                options=[("-", 0)], description=self.view.rows.name, continuous_update=False,
                layout=ctl.layout(width="320px")),
            self.view.cols.name: w.SelectionSlider(
                options=[("-", 0)], description=self.view.cols.name, continuous_update=False,
                layout=ctl.layout(width="360px")),
        }
        for control in self.controls.values():
            control.observe(self._on_control, names="value")
        for name, control in self.inputs.items():
            if self.view.option(name).live:
                control.observe(self._on_live, names="value")
        self.prompt.observe(lambda _c: self._fit_positions(), names="value")
        self._fit_positions()

        self.figure_widget = go.FigureWidget(figures.placeholder_figure("press Run"))
        self.detail = w.HTML(value=figures.detail_html(None),
                             layout=ctl.layout(width="300px", min_width="240px", overflow="auto"))
        self._style = w.HTML(value=_CSS.format(marker=self._marker))
        live = [c for n, c in self.inputs.items() if self.view.option(n).live]
        first_row = [*self.boxes, *(c for n, c in self.inputs.items() if not self.view.option(n).live),
                     self.run_button, self.cancel_button]
        self.widget = w.VBox([
            self._style,
            w.HBox(first_row, layout=ctl.layout(flex_flow="row wrap", align_items="center")),
            w.HBox([self.progress, self.status], layout=ctl.layout(align_items="center")),
            w.HBox([*live, *self.controls.values()], layout=ctl.layout(flex_flow="row wrap")),
            w.HBox([w.Box([self.figure_widget], layout=ctl.layout(flex="1 1 auto", min_width="480px")),
                    self.detail], layout=ctl.layout(align_items="flex-start")),
        ])
        self.widget.add_class("tpmlab-dash")
        self.status.add_class("tpmlab-status")
        if run and all(b.value.strip() for b in self.boxes):
            self.run(wait=True)
        else:
            self.refresh()

    @property
    def lens(self) -> str:
        return self.info.name

    @property
    def title(self) -> str:
        return self.info.title

    # -- what runs --------------------------------------------------------------------------------------
    def request(self) -> dict[str, Any]:
        """The inputs and options of a run, read from the controls on the calling thread."""
        options = dict(self.options)
        for name, control in self.inputs.items():
            given, value = ctl.read(self.view.option(name), control)
            if given:
                options[name] = value
        return {"inputs": ctl.read_inputs(self.view.inputs, self.boxes), "options": options}

    def compute(self, job: Job, request: dict[str, Any]) -> Any:
        """Run the lens (in the job's thread); ``job.progress`` hears between its passes."""
        return self.info.run(self.model, *request["inputs"], progress=job.progress,
                             **request["options"])

    @staticmethod
    def _key(request: dict[str, Any]) -> Any:
        return _frozen(request)

    # -- running --------------------------------------------------------------------------------------
    def run(self, *, wait: bool = False) -> Job:
        """Run the lens on the current inputs, in a background thread (``wait``: on this one).
        A run still going is cancelled first."""
        if self.job is not None and not self.job.done:
            self.job.cancel()
        try:
            request = self.request()
        except Exception as e:  # noqa: BLE001 - a bad input is shown like a failed run
            request = e
        job = Job(lambda j: self._locked(j, request), name=self.lens, on_progress=self._on_progress)
        job.on_done = lambda result: self._apply(job, result, request)
        job.on_error = lambda e: self._failed(job, e)
        job.on_cancel = lambda: self._cancelled(job)
        self.job = job
        self.error = None
        self.run_button.disabled, self.cancel_button.disabled = False, False
        self.progress.value, self.progress.bar_style = 0.0, "info"
        self._set_status("running\u2026")
        return job.run_here() if wait else job.start()

    def cancel(self) -> None:
        """Stop the running request (between the lens's passes); its result, if any, is dropped."""
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

    def _locked(self, job: Job, request: Any) -> Any:
        if isinstance(request, Exception):
            raise request
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

    def _apply(self, job: Job | None, result: Any, request: Any) -> None:
        if job is not self.job:  # superseded: a newer request owns the dashboard
            return
        self._cache[self._key(request)] = result
        while len(self._cache) > CACHED_RESULTS:
            self._cache.popitem(last=False)
        self._show(result)
        self.cancel_button.disabled = True
        self.progress.value, self.progress.bar_style = 1.0, "success"
        seconds = f"done in {job.seconds:.1f} s" if job is not None else "kept from an earlier run"
        self._set_status(f"{seconds} \u00b7 plan <code>{html.escape(self.result.plan_digest[:19])}</code>")
        self.refresh()

    def _show(self, result: Any) -> None:
        """Make ``result`` the dashboard's, fitting the sliders to its grid: the selected cell
        stays where it was if the grid kept its shape, else it moves to ``result.focus()``."""
        with self._lock:
            same_shape = self.result is not None and self.result.shape == result.shape
            row, col = self._selected() if same_shape else result.clip(*result.focus())
            self.result = result
            self._quiet += 1
            try:
                for name, labels, index in ((self.view.rows.name, result.row_labels(), row),
                                            (self.view.cols.name, result.col_labels(), col)):
                    self.controls[name].options = [(label, i) for i, label in enumerate(labels)]
                    self.controls[name].value = index
            finally:
                self._quiet -= 1

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

    # -- controls -------------------------------------------------------------------------------------
    def _fit_positions(self) -> None:
        """Offer the prompt's token positions in the position controls."""
        positions = [n for n in self.inputs if self.view.option(n).kind == "position"]
        if not positions:
            return
        text = self.prompt.value
        labels = []
        if text.strip():
            from tpmlab.lenses.common import token_ids, token_strings
            from tpmlab.lenses.result import position_labels

            labels = position_labels(token_strings(self.model, token_ids(self.model, text)))
        self._quiet += 1
        try:
            for name in positions:
                ctl.fit_positions(self.inputs[name], labels)
        finally:
            self._quiet -= 1

    def _on_control(self, change: dict[str, Any]) -> None:
        if not self._quiet:
            self.refresh()

    def _on_live(self, change: dict[str, Any]) -> None:
        """A live option changed: show the result kept for the new request, or run it."""
        if self._quiet or self.result is None:
            return
        try:
            key = self._key(self.request())
        except Exception:  # noqa: BLE001 - the run reports it
            key = None
        if key in self._cache:
            if self.job is not None and not self.job.done:
                self.job.cancel()
            self.job = None
            self._apply(None, self._cache[key], self.request())
        else:
            self.run()

    def _selected(self) -> tuple[int, int]:
        return self.controls[self.view.rows.name].value, self.controls[self.view.cols.name].value

    def select(self, row: int, col: int) -> None:
        """Select cell ``(row, col)`` of the grid (what a click does)."""
        row, col = self.result.clip(row, col)
        self._set_quietly(**{self.view.rows.name: row, self.view.cols.name: col})
        self.refresh()

    def _set_quietly(self, **values: Any) -> None:
        self._quiet += 1
        try:
            for name, value in values.items():
                self.controls[name].value = value
        finally:
            self._quiet -= 1

    # -- showing ----------------------------------------------------------------------------------------
    def figure(self):
        """The plotly figure of the current result, metric and selection: the lens's own plot."""
        return self.result.plot(self.controls["metric"].value, selected=self._selected())

    def detail_data(self) -> Any:
        """The :class:`~tpmlab.lenses.Cell` of the selected cell (``None`` before a result)."""
        return self.result.cell(*self._selected()) if self.result is not None else None

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
            detail = self.detail_data()
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

    def _static_text(self, detail: Any) -> dict[str, str]:
        body = figures.detail_html(detail, marker=self._marker) if detail else \
            f'<div class="{self._marker}"><i>{html.escape(self._summary())}</i></div>'
        return {"text/html": body, "text/plain": self._summary()}

    def _ipython_display_(self) -> None:
        from IPython.display import display

        live = dict(self.widget._repr_mimebundle_())
        live["text/plain"] = f"<{self.title} dashboard: live controls, shown with a running kernel>"
        display(live, raw=True)
        fig = self.current_figure()
        detail = self.detail_data()
        self._handles.append((
            display(self._static_text(detail), raw=True, display_id=True),
            display(figures.static_bundle(fig, self._summary()), raw=True, display_id=True)))


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


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a request (objects count by identity)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, range)):
        return tuple(_frozen(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return ("object", id(value))
    return value


def dashboard(model: Any, lens: str = "logit", prompt: Any = "", **options: Any) -> LensDashboard:
    """An interactive dashboard of the registered lens ``lens`` on ``model`` (any lens that
    keeps the lens contract: the zoo's, an entry point's, one on ``TPMLAB_LENS_PATH``).

    With a prompt, the first run happens now (so the displayed dashboard already shows it);
    later runs (the Run button, :meth:`LensDashboard.run`) go to a background thread.
    ``options``: the lens's options (see its view), and ``metric`` (the one shown first).

    >>> tpmlab.widgets.dashboard(model, "logit", prompt="The Eiffel Tower is in")   # doctest: +SKIP
    """
    return LensDashboard(model, lens, prompt, **options)


__all__ = ["LensDashboard", "dashboard"]
