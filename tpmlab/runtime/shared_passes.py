"""Requests from several threads on one in-process model: queued, and merged into shared
forward passes.

A plan's hooks sit on the model's shared modules, so two passes at once would read each
other's values; and one pass already uses every core (or the whole GPU). So each model
has one *pass thread*. A request is validated in its caller's thread (its errors are
raised there, before it waits for anything), then queued. The pass thread takes the
oldest queued request and, if it can share a pass (:func:`~tpmlab.ir.merge.can_merge`),
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
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import TpmlabError
from ..ir.merge import can_merge, merge_key, merge_plans, split_values
from ..ir.plan import Plan
from ..ir.schedule import Schedule
from ..ir.validate import Limits
from . import request
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


class BackendClosedError(TpmlabError):
    """A request was queued on a model that was undeployed (or its backend closed)."""

    http_status = 503


@dataclass
class _Queued:
    plan: Plan
    schedule: Schedule
    limits: Limits
    key: tuple | None  # merge key; None: runs alone
    lengths: list[int]  # each row's number of positions
    future: Future = field(default_factory=Future)


class PassQueue:
    """The requests on one :class:`~tpmlab.runtime.engine.ModelHost`, run by its pass thread.

    ``passes`` and ``requests`` count the forward passes run and the requests they served
    (``requests / passes``: how many requests a pass merged, on average)."""

    def __init__(self, host: ModelHost, policy: BatchPolicy = BatchPolicy()) -> None:
        self.host = host
        self.policy = policy
        self.passes = 0
        self.requests = 0
        self._cond = threading.Condition()
        self._queue: deque[_Queued] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        """Requests waiting for a pass."""
        return len(self._queue)

    def run(self, plan: Plan, limits: Limits) -> Result:
        """Validate ``plan`` here, under ``limits`` (the host's, tightened by the caller's),
        then wait for a pass to run it: its saved values and metadata, as
        :meth:`ModelHost.run` answers them, plus ``batch_size`` (requests in its pass)."""
        schedule = self.host.admit(plan, limits)
        merges = can_merge(plan)
        item = _Queued(plan, schedule, limits, merge_key(plan) if merges else None,
                       [int(plan.tensors[t].shape[0]) for inv in plan.invokes for t in inv.tensors])
        with self._cond:
            if self._closed:
                raise BackendClosedError(f"model {self.host.name!r} is not deployed any more; "
                                         "deploy it again to run requests on it")
            self._queue.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=f"tpmlab-passes-{self.host.name}")
                self._thread.start()
            self._cond.notify()
        return item.future.result()

    def close(self) -> None:
        """Refuse new requests and fail the queued ones; a pass under way finishes."""
        with self._cond:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for item in queued:
            item.future.set_exception(BackendClosedError(
                f"model {self.host.name!r} was undeployed before this request ran"))

    # -- the pass thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    # idle (or closed): end; a later request starts a new thread
                    if self._closed or not self._cond.wait(self.policy.idle_seconds):
                        if not self._queue:
                            self._thread = None
                            return
                group = self._take()
            try:
                self._serve(group)
            finally:  # whatever happened, no caller waits forever
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(TpmlabError("the request's pass ended "
                                                              "without a result"))

    def _take(self) -> list[_Queued]:
        """The oldest request and the later ones that may share its pass (under the lock)."""
        first = self._queue.popleft()
        group = [first]
        if first.key is None:
            return group
        p = self.policy
        rows, longest, real = len(first.lengths), max(first.lengths), sum(first.lengths)
        kept: deque[_Queued] = deque()
        for item in self._queue:
            if item.key == first.key and len(group) < p.max_requests:
                r = rows + len(item.lengths)
                n = max(longest, *item.lengths)
                t = real + sum(item.lengths)
                if r <= p.max_rows and r * n <= p.max_cells and t >= p.min_fill * r * n:
                    group.append(item)
                    rows, longest, real = r, n, t
                    continue
            kept.append(item)
        self._queue = kept
        return group

    def _serve(self, group: list[_Queued]) -> None:
        self.passes += 1
        self.requests += len(group)
        if len(group) > 1:
            try:
                merged, mapping = merge_plans([item.plan for item in group])
                schedule = request.follow(merged, self.host.info)
                values, meta = self.host.execute(merged, schedule,
                                                 merged_limits([item.limits for item in group]))
            except Exception:  # noqa: BLE001 - run each alone: a bad request fails only itself
                self.passes += len(group) - 1
                for item in group:
                    self._alone(item)
                return
            seconds = split_values(meta.get("node_seconds", {}), mapping)
            for item, part, own in zip(group, split_values(values, mapping), seconds):
                item.future.set_result((part, dict(
                    meta, plan_digest=request.plan_digest(item.plan), node_seconds=own,
                    batch_size=len(group))))
            return
        self._alone(group[0])

    def _alone(self, item: _Queued) -> None:
        try:
            values, meta = self.host.execute(item.plan, item.schedule, item.limits)
        except BaseException as e:  # noqa: BLE001 - the caller's error, raised in its thread
            item.future.set_exception(e)
        else:
            item.future.set_result((values, dict(meta, batch_size=1)))
