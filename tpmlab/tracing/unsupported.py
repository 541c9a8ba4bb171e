"""Constructs researchers bring from nnsight that tpmlab does not offer, each with the
form to use instead (docs/nnsight.md is the whole mapping).

One table, read by the module proxies, the model handle and the value proxies, so that a
missing feature never reads as a typo ("has no submodule 'session'").
"""

from __future__ import annotations

# name -> what to do instead; looked up on module proxies (and so on the model itself)
MODULE_ALTERNATIVES: dict[str, str] = {
    "next": ".next() is not supported: choose generation steps with `with gen.step(i):`, "
            "`with gen.steps(a, b):` or `for step in gen.iter[a:b]:`",
    "iter": ".iter belongs to the generation: `for step in gen.iter[a:b]:` on the object of "
            "`with model.generate(...) as gen`",
    "all": ".all() belongs to the generation: `with gen.all():` on the object of "
           "`with model.generate(...) as gen`",
}

# value proxies: h.name(...) / h.name
VALUE_ALTERNATIVES: dict[str, str] = {
    "tolist": "a traced value has no Python value while tracing: .save() it and read .value "
              "after the `with` block",
    "item": "a traced value has no Python value while tracing: .save() it and read .value "
            "after the `with` block",
    "cpu": ".cpu() is not needed: saved values come back to the notebook's host memory",
    "cuda": ".cuda() is not allowed: values stay on the device of the stage that holds them",
}

CONTROL_FLOW = (
    "a traced value has no truth value while tracing: the plan is data, so a Python "
    "`if`/`while` on it cannot be recorded. Write the data-flow form instead: "
    "`torch.where(cond, a, b)` picks elementwise (e.g. "
    "`h[:] = torch.where((h < 1e5).all(), h * 2, h)`), and `.save()` a value to decide in Python "
    "after the block")

ITERATION = ("a traced value cannot be iterated while tracing (its length is not known to "
             "Python): index it in a loop over a Python range, e.g. "
             "`for i in range(n): h[:, i]`")

STEP_BLOCK = ("`with gen.all() as step:` binds the block of steps, not a step number, so "
              "`if step == 2:` cannot be recorded: write `with gen.step(2):`, or loop over the "
              "steps with `for step in gen.iter[0:n]:` (then `step` is the step's number)")
