"""A request's backward pass on one pipeline stage.

The backward rides on the replies of the forward chain: stage ``k`` calls stage
``k + 1``'s ``step`` and awaits its reply, so the reply that comes back from the
next stage's worker carries the gradient of stage ``k``'s output (and the values its
backward nodes need from later stages, and the constants' gradients summed so far).
Stage ``k`` back-propagates from its roots (the loss, if the plan's ``backward`` is
anchored here, and its output with that gradient), runs the nodes that waited for
gradients, and returns the gradient of its own input in its reply to stage ``k - 1``:
worker to worker, never through the notebook. What autograd kept (the request's
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
    ``backward to host`` (the input's gradient for the previous stage: on a GPU, the wait for
    the backward, then the copy) and ``backward finish`` (the saves, once copied)."""
    runner, device = st.runner, actor.device
    grads = runner.gradients
    start = time.perf_counter()
    runner.env.update(from_wire(reply.get("carry_back") or {}, device))
    incoming = from_wire(reply.get("constant_grads") or {}, device)
    roots: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
    if runner._owns(runner.schedule.anchor[grads.g.backward]):
        roots.append((runner.env.get(grads.g.loss), None))
    out, g_out = st.extra.get("out"), reply.get("grad")
    if out is not None and g_out is not None:
        roots.append((out, from_wire(g_out, device)))
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
            back["grad"] = None if hidden is None or hidden.grad is None else to_wire(hidden.grad)
            back["constant_grads"] = to_wire(grads.outgoing())
            back["carry_back"] = to_wire(grads.carry_back(actor.owned.start))
        t_host = time.perf_counter()
        output = actor._finish(st, 1)
        st.times.update({"backward in": t_in - start, "backward run": t_back - t_in,
                         "backward to host": t_host - t_back,
                         "backward finish": time.perf_counter() - t_host})
    finally:  # the graph's ends: released now, ended or failed, not when the state is dropped
        grads.release()
        st.extra.clear()
    return back, output
