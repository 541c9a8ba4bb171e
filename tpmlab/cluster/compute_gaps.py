"""Background work on a stage waits for a gap between the stage's computations.

A stage's hand-over pool (:class:`~.segment_pool.SegmentPool`) makes and registers the
segments the next request's saves go into on a thread of its own. Registering a segment
with CUDA takes the driver's locks, which every kernel launch of the stage's thread needs
too: on one H200
(llama-3-8b-shape, bf16, 1x128, every layer's output saved) stage 0's forward took
23-30 ms with the pool refilling beside it against 13 ms without saves, its thread busy
(CPU time 28 of 33 ms) and its launches 13.4 instead of 8.2 µs each. The stage is idle
between its requests' steps (the other stages compute, the hops travel), so that is where
the pool's work goes: :meth:`Gaps.computing` marks the stage's work, :meth:`Gaps.wait`
blocks the pool's thread until none runs. A stage that never pauses (requests back to back
for :data:`LONGEST_WAIT`) still gets one segment made at a time; its saves meanwhile take
the copy they take without a pool.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: the longest the pool's thread waits for a gap before it makes one segment anyway
LONGEST_WAIT = 1.0
#: background work waits for gaps while True (False: it runs at once, as before). Switched on
#: the workers to compare the two ways (``benchmarks/handover.py --compare-gaps``).
ACTIVE = True


class Gaps:
    """Whether a stage is computing, and a wait for when it is not."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self.waiting = 0  # threads blocked in wait() now (for tests and ``memory()``)

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Mark the calling thread's work as the stage's computation while inside."""
        with self._cond:
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if not self._running:
                    self._cond.notify_all()

    def busy(self) -> bool:
        with self._cond:
            return self._running > 0

    def wait(self, timeout: float = LONGEST_WAIT) -> bool:
        """Block until no computation runs (``True``) or ``timeout`` seconds passed
        (``False``)."""
        with self._cond:
            if not self._running or not ACTIVE:
                return True
            self.waiting += 1
            try:
                return self._cond.wait_for(lambda: not self._running, timeout)
            finally:
                self.waiting -= 1
