"""Requests from several threads on one in-process model: queued, and merged into shared
forward passes.

A plan's hooks sit on the model's shared modules, so two passes at once would read each
other's values; and one pass already uses every core (or the whole GPU). So each model
has one pass at a time. A caller that finds no pass running and nothing queued runs its
request itself, in its own thread; otherwise it queues its plan bytes and waits for the
model's *pass thread*, which decodes and validates what arrived (a refused request fails alone, its error raised in its
caller's thread), takes the oldest admitted request and, if it can share a pass (:func:`~tpmlab.ir.merge.can_merge`),
every later queued request compatible with it: the same
:func:`~tpmlab.ir.merge.merge_key` (model, version, input kind) and a merged batch within
:class:`BatchPolicy` (requests, rows, padded cells, padding). It merges them
(:func:`~tpmlab.ir.merge.merge_plans`) into one forward pass and hands each caller its own
values and node timings (:func:`~tpmlab.ir.merge.split_values`).

Each invoke owns its rows (DESIGN.md contract 9), so a request's values from a merged
pass are bit for bit those of the same batch in which the other requests do nothing;
against the request run alone they agree to float rounding (the kernels' summation order
depends on the batch's shape, not on other rows' values).

Requests that cannot merge (generation, a backward, points that read the whole batch,
another input kind, a batch that would be mostly padding) run alone in their turn; the
requests a pass skips keep their order, and the oldest request always goes next. If a
merged pass fails, each of its requests runs again alone, so a bad request fails only
itself. One thread per model also means one OpenMP team (one CUDA stream) doing the
work, not one per caller.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ModelUndeployedError, TpmlabError
from ..ir.merge import MergeBudget, can_merge, merge_key, merge_plans, row_lengths, split_values
from ..ir.plan import Plan
from ..ir.schedule import Schedule
from ..ir.validate import Limits
from . import compute_threads, request
from .limits import merged_limits

if TYPE_CHECKING:
    from .engine import ModelHost

Result = tuple[dict[int, Any], dict[str, Any]]


@dataclass(frozen=True)
class BatchPolicy:
    """How far a pass may grow by merging queued requests."""

    max_requests: int = 32  # requests in one pass
    max_rows: int = 64  # rows of the merged batch
    max_cells: int = 16_384  # rows x padded length: bounds the pass's activation memory
    min_fill: float = 0.75  # real tokens / (rows x padded length): bounds the padding computed
    idle_seconds: float = 2.0  # the pass thread ends after this long with nothing queued
    # Before a pass, wait for as many requests as the last pass served (its callers, woken
    # by their results, are about to queue their next ones), for at most this fraction of
    # the last pass's time and at most ``max_linger_seconds``. One caller never waits.
    linger: float = 0.1
    max_linger_seconds: float = 0.05
    # Merge only while merged passes cost no more per batch cell (row x position) than
    # passes of one request, as measured on this model (a running average of each); while
    # they cost more, every ``probe_every``-th chance to merge still merges, to measure again.
    # On a GPU a merged pass costs far less per cell; on a CPU it can cost more (larger
    # tensors, the same arithmetic per row).
    adaptive: bool = True
    probe_every: int = 16

    @property
    def budget(self) -> MergeBudget:
        return MergeBudget(self.max_requests, self.max_rows, self.max_cells, self.min_fill)


@dataclass(eq=False)
class _Queued:
    blob: bytes
    caller_limits: Limits | None
    future: Future = field(default_factory=Future)
    # set when the pass thread admits it:
    plan: Plan | None = None
    schedule: Schedule | None = None
    limits: Limits | None = None
    digest: str | None = None  # the plan's digest (:func:`~tpmlab.runtime.request.plan_digest`)
    key: tuple | None = None  # merge key; None: runs alone
    deadline: float | None = None  # time.monotonic() where its backward stops (if it has one)
    lengths: list[int] = field(default_factory=list)  # each row's number of positions


class PassQueue:
    """The requests on one :class:`~tpmlab.runtime.engine.ModelHost`, run by its pass thread.

    The caller's thread only queues the plan bytes and waits: decoding and validation run
    in the pass thread, just before the pass, so that callers never hold the interpreter
    while a pass runs (each of its torch calls would wait for them) and the queue fills at
    once. ``passes`` and ``requests`` count the forward passes run and the requests they
    served (``requests / passes``: how many requests a pass merged, on average)."""

    def __init__(self, host: ModelHost, policy: BatchPolicy = BatchPolicy()) -> None:
        self.host = host
        self.policy = policy
        self.passes = 0
        self.requests = 0
        self._cond = threading.Condition()
        self._incoming: deque[_Queued] = deque()  # as the callers queued them
        self._ready: deque[_Queued] = deque()  # admitted; touched only by whoever holds the pass
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last = (1, 0.0)  # the last pass: requests served, seconds
        self._busy = False  # a pass is being run (by the pass thread or a caller)
        self.cell_seconds: dict[bool, float | None] = {False: None, True: None}  # alone, merged
        self._declined = 0  # chances to merge not taken since the last merged pass

    @property
    def queued(self) -> int:
        """Requests waiting for a pass."""
        return len(self._incoming) + len(self._ready)

    def run_plan(self, blob: bytes, limits: Limits | None = None, timeout: float | None = None
                 ) -> tuple[dict[int, Any], dict[str, Any], Plan]:
        """:meth:`run`, and the plan it decoded from ``blob``. ``timeout``: seconds, from now,
        after which a request's backward stops (a plan with a backward runs alone)."""
        item = _Queued(blob, limits,
                       deadline=None if timeout is None else time.monotonic() + timeout)
        with self._cond:
            if self._closed:
                raise ModelUndeployedError(f"model {self.host.name!r} is not deployed any more; "
                                           "deploy it again to run requests on it")
            # nothing running, nothing queued: run it here, in the caller's thread, as a
            # lone caller always has (no hand-over); requests that come meanwhile queue
            mine = not self._busy and not self._incoming and not self._ready
            if mine:
                self._busy = True
            else:
                self._incoming.append(item)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, daemon=True,
                                                    name=f"tpmlab-passes-{self.host.name}")
                    self._thread.start()
                self._cond.notify_all()
        if mine:
            compute_threads.settle_once()  # a new caller thread's first pass as any later one
            self._run_group([item], [])
        return item.future.result()

    def run(self, blob: bytes, limits: Limits | None = None) -> Result:
        """Run the plan in ``blob`` under the host's limits tightened by the caller's
        ``limits``, in a pass of its own or shared: its saved values and metadata, as
        :meth:`ModelHost.run` answers them, plus ``batch_size`` (requests in its pass).
        Raises what running it alone would (a :class:`PlanError` naming the problem...)."""
        values, meta, _ = self.run_plan(blob, limits)
        return values, meta

    def run_alone(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` in this thread while it holds the model's pass: nothing else runs on the
        model meanwhile (a session's traces, one after another, :meth:`ModelHost.run_session`)."""
        with self._cond:
            while self._busy:
                self._cond.wait()
            if self._closed:
                raise ModelUndeployedError(f"model {self.host.name!r} is not deployed any more; "
                                           "deploy it again to run requests on it")
            self._busy = True
        try:
            return fn()
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        """Refuse new requests and fail the queued ones; a pass under way finishes, and the
        pass thread ends before this returns (up to ``timeout`` seconds): a thread still in
        torch when the interpreter exits aborts the process."""
        with self._cond:
            self._closed = True
            queued, self._incoming = list(self._incoming), deque()
            thread = self._thread
            self._cond.notify_all()
        for item in queued:
            item.future.set_exception(ModelUndeployedError(
                f"model {self.host.name!r} was undeployed before this request ran"))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the pass thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        compute_threads.settle()  # this thread's first pass computes as the caller's do
        while True:
            with self._cond:
                while self._busy or not (self._incoming or self._ready):
                    idle = not (self._incoming or self._ready)
                    if idle and self._closed:
                        self._thread = None
                        return
                    # idle this long: end; a later request starts a new thread
                    if not self._cond.wait(self.policy.idle_seconds) and not self._busy \
                            and not (self._incoming or self._ready):
                        self._thread = None
                        return
                self._busy = True  # callers queue until this pass is done
                self._linger()
                arrived, self._incoming = self._incoming, deque()
            self._run_group(arrived, None)

    def _run_group(self, arrived: list[_Queued], group: list[_Queued] | None) -> None:
        """Admit ``arrived``, then serve ``group`` (``None``: the next group of the admitted
        requests); the caller holds the pass (``_busy``), released here."""
        started = time.perf_counter()
        served = 0
        try:
            admitted = [item for item in arrived if self._admit(item)]
            if group is None:
                self._ready.extend(admitted)
                group = self._take() if self._ready else []
            else:  # the caller's own request
                group = admitted
            served = len(group)
            if group:
                self._serve(group)
        finally:
            for item in group or ():  # whatever happened, no caller waits forever
                if not item.future.done():
                    item.future.set_exception(TpmlabError("the request's pass ended "
                                                          "without a result"))
            with self._cond:
                if served:
                    self._last = (served, time.perf_counter() - started)
                self._busy = False
                self._cond.notify_all()

    def _linger(self) -> None:
        """Give the last pass's callers a moment to queue again (under the lock)."""
        served, seconds = self._last
        left = min(self.policy.linger * seconds, self.policy.max_linger_seconds)
        deadline = time.monotonic() + left
        while len(self._incoming) + len(self._ready) < served and not self._closed and left > 0:
            self._cond.wait(left)
            left = deadline - time.monotonic()

    def _admit(self, item: _Queued) -> bool:
        """Decode and validate a queued request (a repeated plan: neither, see
        :meth:`ModelHost.admit_blob`); a refused one fails here, alone."""
        try:
            plan, limits, item.schedule, item.digest = self.host.admit_blob(
                item.blob, item.caller_limits)
        except BaseException as e:  # noqa: BLE001 - the caller's error, raised in its thread
            item.future.set_exception(e)
            return False
        item.plan, item.limits, item.blob = plan, limits, b""
        item.key = merge_key(plan) if can_merge(plan) else None
        item.lengths = row_lengths(plan)
        return True

    def _take(self) -> list[_Queued]:
        """The oldest admitted request and the later ones that may share its pass."""
        first = self._ready.popleft()
        group = [first]
        if first.key is None or not self._merging_pays():
            return group
        budget = self.policy.budget
        taken = budget.group(first.lengths)
        kept: deque[_Queued] = deque()
        for item in self._ready:
            if item.key == first.key and taken.add(item.lengths):
                group.append(item)
            else:
                kept.append(item)
        self._ready = kept
        return group

    def _merging_pays(self) -> bool:
        alone, merged = self.cell_seconds[False], self.cell_seconds[True]
        if not self.policy.adaptive or alone is None or merged is None or merged <= alone \
                or not any(item.key is not None for item in self._ready):
            return True
        self._declined += 1
        if self._declined >= self.policy.probe_every:
            self._declined = 0
            return True
        return False

    def _measured(self, group: list[_Queued], seconds: float) -> None:
        """Fold a trace pass's seconds per batch cell into its kind's running average."""
        if any(item.key is None for item in group):
            return  # generation, backward...: not comparable
        cells = sum(len(item.lengths) for item in group) * max(max(i.lengths) for i in group)
        kind = len(group) > 1
        old, new = self.cell_seconds[kind], seconds / max(cells, 1)
        self.cell_seconds[kind] = new if old is None else 0.8 * old + 0.2 * new

    def _serve(self, group: list[_Queued]) -> None:
        self.passes += 1
        self.requests += len(group)
        if len(group) > 1:
            try:
                merged, mapping = merge_plans([item.plan for item in group])
                schedule = request.follow(merged, self.host.info)
                started = time.perf_counter()
                values, meta = self.host.execute(merged, schedule,
                                                 merged_limits([item.limits for item in group]))
                self._measured(group, time.perf_counter() - started)
            except Exception:  # noqa: BLE001 - run each alone: a bad request fails only itself
                self.passes += len(group) - 1
                for item in group:
                    self._alone(item)
                return
            seconds = split_values(meta.get("node_seconds", {}), mapping)
            for item, part, own in zip(group, split_values(values, mapping), seconds):
                item.future.set_result((part, dict(
                    meta, plan_digest=item.digest or request.plan_digest(item.plan),
                    node_seconds=own,
                    batch_size=len(group)), item.plan))
            return
        self._alone(group[0])

    def _alone(self, item: _Queued) -> None:
        try:
            started = time.perf_counter()
            values, meta = self.host.execute(item.plan, item.schedule, item.limits,
                                             deadline=item.deadline, digest=item.digest)
            self._measured([item], time.perf_counter() - started)
        except BaseException as e:  # noqa: BLE001 - the caller's error, raised in its thread
            item.future.set_exception(e)
        else:
            item.future.set_result((values, dict(meta, batch_size=1), item.plan))
