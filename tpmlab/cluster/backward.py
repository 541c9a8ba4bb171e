"""A request's backward pass on one pipeline stage.

The backward rides on the replies of the forward chain: stage ``k`` calls stage
``k + 1``'s ``step`` and awaits its reply, so the reply that comes back from the
next stage's worker carries the gradient of stage ``k``'s output (and the values its
backward nodes need from later stages, and the constants' gradients summed so far).
Stage ``k`` back-propagates from its roots (the loss, if the plan's ``backward`` is
anchored here, and its output with that gradient), runs the nodes that waited for
gradients, and returns the gradient of its own input in its reply to stage ``k - 1``:
worker to worker, never through the notebook (in device memory where both stages can open
it, :mod:`.cuda_ipc`: the gradient's buffer is held until this stage's previous stage
acknowledges its copy). What autograd kept (the request's
:class:`~tpmlab.runtime.backward.Backprop`, its leaves and graph) goes with the
request's state when it ends, fails or passes its deadline.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ExecutionError
from .wire import from_wire, to_wire

if TYPE_CHECKING:
    from .actor import StageActor, StageOutput, _Request


def stage_backward(actor: StageActor, st: _Request, reply: dict[str, Any]
                   ) -> tuple[dict[str, Any], StageOutput]:
    """Run this stage's backward (in its thread) from the next stage's ``reply``; return the
    reply's fields for the previous stage and this stage's output for the client. Its parts'
    seconds go to ``st.times``: ``backward in`` (the reply's values onto the device),
    ``backward run`` (autograd and the plan's backward nodes; on a GPU, launching them),
    ``backward out`` (the input's gradient for the previous stage: on a GPU, the wait for
    the backward, then the copy) and ``backward finish`` (the saves, once copied)."""
    start = time.perf_counter()
    req = st.extra.get("req", "")
    # first, before anything changes: a buffer that cannot be opened here raises
    # cuda_ipc.Refused, and the step asks the next stage for the gradient itself
    g_out = reply.get("grad")
    g_out = None if g_out is None else actor._received(g_out, req)
    try:
        return _backward(actor, st, reply, g_out, start)
    finally:  # the gradient's copy is done: it may be acknowledged
        actor.ipc_in.settle(req)


def _backward(actor: StageActor, st: _Request, reply: dict[str, Any], g_out: Any,
              start: float) -> tuple[dict[str, Any], StageOutput]:
    runner, device = st.runner, actor.device
    grads = runner.gradients
    req = st.extra.get("req", "")
    runner.env.update(from_wire(reply.get("carry_back") or {}, device))
    incoming = from_wire(reply.get("constant_grads") or {}, device)
    roots: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
    if runner._owns(runner.schedule.anchor[grads.g.backward]):
        roots.append((runner.env.get(grads.g.loss), None))
    if st.extra.get("out") is not None and g_out is not None:  # no local: a failure's
        roots.append((st.extra["out"], g_out))  # traceback would hold the graph's end
    actor.weights.ready()
    t_in = time.perf_counter()
    try:
        try:
            grads.backward(roots, incoming)
        except torch.OutOfMemoryError as e:
            raise ExecutionError(f"out of memory in the backward on stage {actor.span.index}: "
                                 f"{e}") from None
        finally:
            actor.weights.check()
        t_back = time.perf_counter()
        back: dict[str, Any] = {"grad": None, "constant_grads": {}, "carry_back": {}}
        if not actor.span.is_first:
            hidden = st.extra.get("hidden_in")
            if hidden is not None and hidden.grad is not None:
                deadline = getattr(grads, "deadline", 0.0) or time.monotonic() + 60.0
                back["grad"] = actor._given(actor.ipc_prev, hidden.grad, req, deadline)
            back["constant_grads"] = to_wire(grads.outgoing())
            back["carry_back"] = to_wire(grads.carry_back(actor.owned.start))
        t_host = time.perf_counter()
        output = actor._finish(st, 1)
        st.times.update({"backward in": t_in - start, "backward run": t_back - t_in,
                         "backward out": t_host - t_back,
                         "backward finish": time.perf_counter() - t_host})
    finally:  # the graph's ends: released now, ended or failed, not when the state is dropped
        grads.release()
        st.extra.clear()
    return back, output
