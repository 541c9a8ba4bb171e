"""Lens requests run off the kernel's main thread, with progress and cancellation.

A :class:`Job` runs ``work(job)`` in a daemon thread. ``job.progress`` is the lens
contract's progress callback (``run(..., progress=job.progress)``): it reports
``(done, total, text)`` and raises :class:`~tpmlab.lenses.Cancelled` once ``job.cancel()``
was called, so cancelling takes effect between a lens's passes (a forward pass already on
the engine finishes, its result is dropped). ``on_done`` runs only for a job
that finished without being cancelled, so a late result never reaches a dashboard that
has moved on.

Runs on one model are serialised by :func:`model_lock`: a model's tracing context is
shared by its threads, so two dashboards on the same model take turns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..lenses.contract import Cancelled

_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    """The lock serialising dashboard requests on ``model``."""
    with _locks_guard:
        return _locks.setdefault(id(model), threading.Lock())


class Job:
    """One request: ``work(job)`` in a background thread, then ``on_done(result)``,
    ``on_error(exc)`` or (cancelled) ``on_cancel()``; ``on_progress(done, total, text)``
    as it goes. ``Job.run_here`` does the same on the calling thread."""

    def __init__(self, work: Callable[[Job], Any], *, on_done: Callable[[Any], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_cancel: Callable[[], None] | None = None,
                 on_progress: Callable[[int, int, str], None] | None = None, name: str = "lens") -> None:
        self.work, self.name = work, name
        self.on_done, self.on_error, self.on_cancel, self.on_progress = on_done, on_error, on_cancel, on_progress
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self.thread: threading.Thread | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds: float | None = None

    # -- from the work ----------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise :class:`~tpmlab.lenses.Cancelled` if the job was cancelled (call between passes)."""
        if self._cancel.is_set():
            raise Cancelled(self.name)

    def progress(self, done: int, total: int, text: str = "") -> None:
        """Report ``done`` of ``total`` steps; raises :class:`~tpmlab.lenses.Cancelled` once
        cancelled. This is the ``progress`` callback a lens's ``run`` takes."""
        self.check()
        if self.on_progress is not None:
            self.on_progress(done, total, text)

    # -- from the owner ---------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def start(self) -> Job:
        self.thread = threading.Thread(target=self._main, name=f"tpmlab-{self.name}", daemon=True)
        self.thread.start()
        return self

    def run_here(self) -> Job:
        self._main()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finished (``True``) or ``timeout`` seconds passed."""
        return self._finished.wait(timeout)

    def _main(self) -> None:
        started = time.perf_counter()
        try:
            self.result = self.work(self)
            self.check()
        except Cancelled:
            self._finish(started)
            if self.on_cancel is not None:
                self.on_cancel()
            return
        except BaseException as e:  # noqa: BLE001 - reported to the dashboard, not lost in a thread
            self.error = e
            self._finish(started)
            if self.on_error is not None and not self.cancelled:
                self.on_error(e)
            return
        self._finish(started)
        if self.on_done is not None and not self.cancelled:
            self.on_done(self.result)

    def _finish(self, started: float) -> None:
        self.seconds = time.perf_counter() - started
        self._finished.set()
