"""Choosing generation steps: the object of ``with gen.steps(...) as block`` and the
unrolled loop ``for step in gen.iter[a:b]``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from ..errors import NotSupportedError
from .unsupported import STEP_BLOCK


@dataclass(frozen=True, eq=False)
class StepBlock:
    """The steps ``start <= step < stop`` of a ``with gen.steps(...)`` block (``stop=None``:
    to the end). It is not a step number: comparing it raises rather than being silently
    false."""

    start: int
    stop: int | None

    def _refuse(self, *_: Any) -> Any:
        raise NotSupportedError(STEP_BLOCK)

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse  # type: ignore[assignment]
    __bool__ = __int__ = __index__ = _refuse  # type: ignore[assignment]
    __hash__ = object.__hash__


class StepIter:
    """``gen.iter[a:b]`` / ``gen.iter[i]``: the loop runs its body once per step."""

    def __init__(self, steps: Callable[[int, int | None], AbstractContextManager],
                 max_new_tokens: int, *, stopped: Callable[[], bool] = lambda: False,
                 past_end: Callable[[], None] = lambda: None) -> None:
        self._steps = steps
        self._n = max_new_tokens
        self._stopped = stopped  # tracer.stop() was called: the loop ends
        self._past_end = past_end  # called when a loop that asked for steps past the end ends

    def __getitem__(self, index: int | slice) -> Iterator[int]:
        if isinstance(index, int):
            indices = range(self._n)[index:index + 1 or None]
            past_end = index >= self._n
        elif isinstance(index, slice):
            indices = range(self._n)[index]
            past_end = index.stop is None or index.stop > self._n
        else:
            raise NotSupportedError("gen.iter takes a step number or a slice of steps")
        return self._unroll(indices, past_end)

    def _unroll(self, indices: range, past_end: bool) -> Iterator[int]:
        for i in indices:
            with self._steps(i, i + 1):
                yield i
            if self._stopped():  # as in nnsight, a tracer.stop() in the body ends the loop
                return
        if past_end:
            self._past_end()
