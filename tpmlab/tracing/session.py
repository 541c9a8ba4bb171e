"""``with model.session():`` several traces recorded together and run one after another
when the block ends (nnsight's session).

A value of an earlier trace may be used in a later one without saving it: the earlier
trace saves it and the later one carries it as a constant, filled in just before it runs.
The value passes through the notebook between the two requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import NotSupportedError

if TYPE_CHECKING:
    from .model import LabModel
    from .tracer import Trace


class Session:
    """The traces of one ``with model.session()`` block, in the order they were recorded."""

    def __init__(self, model: LabModel) -> None:
        self.model = model
        self.traces: list[Trace] = []

    def __enter__(self) -> Session:
        if self.model.tracing.session is not None:
            raise NotSupportedError("sessions do not nest: record the traces in one session")
        self.model.tracing.session = self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.model.tracing.session = None
        if exc_type is not None:
            return None  # the user's error stands; nothing runs
        for trace in self.traces:
            trace.run()
        return None

    def add(self, trace: Trace) -> None:
        """``trace``'s block has ended: it runs when the session's block ends."""
        self.traces.append(trace)
