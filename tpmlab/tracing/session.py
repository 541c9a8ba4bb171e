"""``with model.session():`` several traces recorded together and sent as one request when
the block ends (nnsight's session).

A value of an earlier trace may be used in a later one without saving it. Every engine
runs sessions (in process, on Dask stages, behind a gateway): the earlier trace keeps the
value on the engine (``save(keep=True)``), the later one reads it with a ``from_trace``
node, and the whole session is one request (:mod:`tpmlab.ir.session`): the value never
comes back to the notebook, only what the traces ``.save()`` does, and it is dropped when
the request ends, fails or passes its deadline. On Dask stages a kept value is sent from
the stage that made it up the chain (in the replies, stage to stage) to the first stage,
and down the chain with the hidden state to the stage that reads it. Behind a gateway the
session is validated as a whole, waits in the queue and is charged once, as one request
(:mod:`tpmlab.gateway.sessions`). ``timeout=`` of the traces adds up to the session's
deadline.

Two cases run the traces one after another instead, each its own request: a dry run
(``model.scan``), and a session with a trace of more invokes than the engine (or the
user's tier) takes in one pass; either is refused where a value crosses traces. An engine
without sessions (``run_session`` None) runs them that way too: the earlier trace saves
the value and the later one carries it as a constant, filled in just before it runs
(through the notebook).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LimitError, NotSupportedError
from ..ir.codec import encode_plan
from ..ir.plan import FROM_TRACE
from ..ir.session import encode_session

if TYPE_CHECKING:
    from .model import LabModel
    from .tracer import Trace


class Session:
    """The traces of one ``with model.session()`` block, in the order they were recorded."""

    def __init__(self, model: LabModel) -> None:
        self.model = model
        self.traces: list[Trace] = []
        # the engine runs the session as one request (values between traces stay there)
        self.on_engine = model.run_session is not None

    def __enter__(self) -> Session:
        if self.model.tracing.session is not None:
            raise NotSupportedError("sessions do not nest: record the traces in one session")
        self.model.tracing.session = self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.model.tracing.session = None
        if exc_type is not None:
            return None  # the user's error stands; nothing runs
        if self._one_request():
            self._run_on_engine()
        else:
            for trace in self.traces:
                trace.run()
        return None

    def add(self, trace: Trace) -> None:
        """``trace``'s block has ended: it runs when the session's block ends."""
        self.traces.append(trace)

    def _one_request(self) -> bool:
        from .tracer import Trace

        if not self.on_engine or not self.traces:
            return False
        crossing = any(n.op == FROM_TRACE for t in self.traces for n in t.nodes.values())
        plain = all(type(t).execute is Trace.execute for t in self.traces)  # not a dry run
        per_pass = self.model.limits.max_invokes
        too_many = [k for k, t in enumerate(self.traces) if len(t.invokes) > per_pass]
        if crossing and (too_many or not plain):
            what = (f"trace {too_many[0]} has {len(self.traces[too_many[0]].invokes)} invokes, "
                    f"over the {per_pass} the engine takes in one pass" if too_many
                    else "a dry run (model.scan) cannot read values of other traces")
            raise LimitError(f"this session cannot run as one request: {what}; split it into "
                             "more traces, or pass the value's .value to a separate trace")
        return plain and not too_many

    def _run_on_engine(self) -> None:
        plans = [t.final_plan() for t in self.traces]
        timeouts = [t.timeout for t in self.traces]
        timeout = sum(timeouts) if all(x is not None for x in timeouts) else None
        blob = encode_session(plans) if len(plans) > 1 else None
        if blob is None:  # one trace: an ordinary request
            results = [self.model.run_plan(encode_plan(plans[0]), timeout)]
        else:
            results = self.model.run_session(blob, timeout)
        for trace, (values, meta) in zip(self.traces, results):
            trace.deliver(values, {**meta, "session": len(plans)})
