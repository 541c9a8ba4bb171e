"""Running validated plans on a whole model held in this process.

:class:`ModelHost` holds one loaded model with its :class:`ModelInfo` and runs
plan blobs on it: decode and validate (:mod:`.request`), batch, run with a
:class:`PlanRunner` (generation: the decoding loop of :mod:`.decoding`), encode the
saved values. Every failure is a named error and leaves the model as
it was (hooks are removed whatever happens).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import ExecutionError, PlanError
from ..ir.codec import dtype_name, encode_result
from ..ir.model_info import ModelInfo
from ..ir.plan import Plan
from ..ir.schedule import Schedule
from ..ir.session import check_session, imports_of
from ..ir.validate import Limits
from . import request
from .backward import held, registry, run_with_backward, weight_storages
from .batching import BatchLayout, build_batch
from .decoding import Decoding, eos_ids, next_tokens
from .footprints import Footprints
from .limits import request_limits
from .plan_cache import PlanCache
from .probe import probe_causal_lm
from .runner import PlanRunner, stopping
from .weights import WeightGuard


def model_info_for(name: str, model: nn.Module, version: str, family: str) -> ModelInfo:
    """Measure a loaded model's events and shapes (two tiny forward passes)."""
    events, shapes = probe_causal_lm(model)
    # Tied weights (lm_head tied to the embedding) are listed under every name they have.
    params = {n: [list(p.shape), dtype_name(p.dtype)]
              for n, p in model.named_parameters(remove_duplicate=False)}
    dtype = next(iter(model.parameters())).dtype
    return ModelInfo(name=name, version=version, family=family, dtype=dtype_name(dtype),
                     events=events, shapes=shapes, modules=[n for n, _ in model.named_modules()],
                     params=params, vocab_size=model.get_input_embeddings().num_embeddings)


class ModelHost:
    """One whole model in this process, ready to run plans.

    ``source``: where the weights came from; a request that writes into them fails and
    they are restored from it (see :class:`~tpmlab.runtime.weights.WeightGuard`)."""

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, version: str, family: str,
                 *, source: Any, limits: Limits = Limits(),
                 meta_model: nn.Module | None = None) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.info = model_info_for(name, model, version, family)
        self._modules = dict(model.named_modules())
        self._meta = dict(meta_model.named_modules()) if meta_model is not None else {}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.weights = WeightGuard(model, source, dtype=self.dtype)
        self._backprops = registry()  # requests' gradient state, for autograd_held()
        self.footprints = Footprints()  # what the model's ops keep for a backward, by shape
        self.plans = PlanCache()  # decoded, validated plans by their bytes: a repeat skips both

    def run_blob(self, blob: bytes, *, limits: Limits | None = None,
                 timeout: float | None = None) -> bytes:
        plan, limits = request.decode(blob, self.limits, limits)
        values, meta = self.run(plan, limits=limits, timeout=timeout)
        return encode_result(values, meta)

    def autograd_held(self) -> dict[str, int]:
        """Gradient state requests still hold here (:func:`~tpmlab.runtime.backward.held`):
        zeros whenever no request with a backward is running."""
        return held(self._backprops)

    def run(self, plan: Plan, *, limits: Limits | None = None, timeout: float | None = None
            ) -> tuple[dict[int, Any], dict[str, Any]]:
        """Validate and run ``plan``: its saved values by node id, and the result's metadata
        (:func:`~tpmlab.runtime.request.result_meta`; ``node_seconds``, each plan node's own
        time, see :attr:`PlanRunner.node_seconds`). ``limits`` tighten the host's own.
        ``timeout``: seconds a request with a backward may run (its backward stops past them);
        a forward-only request runs to its end."""
        limits = request_limits(self.limits, limits)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.execute(plan, self.admit(plan, limits), limits, deadline=deadline)

    def admit(self, plan: Plan, limits: Limits) -> Schedule:
        """Validate ``plan`` under ``limits`` (already the host's, tightened by the caller's):
        its schedule, or a :class:`PlanError` naming the problem."""
        return request.admit(plan, model=self.name, info=self.info, limits=limits,
                             meta_module=self._meta.get)

    def admit_blob(self, blob: bytes, caller: Limits | None = None
                   ) -> tuple[Plan, Limits, Schedule, str]:
        """Decode and :meth:`admit` plan bytes under the host's limits tightened by the
        ``caller``'s: the plan, those limits, its schedule and its digest. The same bytes
        under the same limits again are neither decoded nor validated again
        (:class:`~tpmlab.runtime.plan_cache.PlanCache`, as a pipeline's first stage does)."""
        limits = request_limits(self.limits, caller)

        def admit() -> tuple[Plan, tuple[Schedule, str]]:
            plan = request.decode(blob, limits)[0]
            return plan, (self.admit(plan, limits), request.plan_digest(plan))

        plan, (schedule, digest) = self.plans.get(blob, ("admit", limits), admit)
        return plan, limits, schedule, digest

    def run_session(self, plans: list[Plan], *, limits: Limits | None = None,
                    deadline: float | None = None) -> list[tuple[dict[int, Any], dict[str, Any]]]:
        """Validate a session's plans as a whole (:func:`~tpmlab.ir.session.check_session`),
        then run them in order: the values a trace keeps (``save(keep=True)``) stay here and
        fill later traces' ``from_trace`` nodes; each trace's saved values and metadata. The
        kept values are dropped when this returns or raises."""
        limits = request_limits(self.limits, limits)
        schedules = check_session(plans, self.info, model=self.name, limits=limits,
                                  meta_module=self._meta.get)
        store: dict[tuple[int, int], Any] = {}  # (trace, save node id) -> kept value
        out = []
        for k, (plan, schedule) in enumerate(zip(plans, schedules)):
            imports = {i: store[src] for i, src in imports_of(plans, k).items()}
            kept: dict[int, Any] = {}
            out.append(self.execute(plan, schedule, limits, deadline=deadline, imports=imports,
                                    kept=kept))
            store.update({(k, i): v for i, v in kept.items()})
        return out

    def execute(self, plan: Plan, schedule: Schedule, limits: Limits, *,
                deadline: float | None = None, imports: dict[int, Any] | None = None,
                kept: dict[int, Any] | None = None, digest: str | None = None
                ) -> tuple[dict[int, Any], dict[str, Any]]:
        """Run a plan that :meth:`admit` let in (or a merge of such plans, with the schedule of
        :func:`~tpmlab.runtime.request.follow`): what :meth:`run` answers. ``deadline``
        (:func:`time.monotonic`): where a backward stops. In a session, ``imports`` fill its
        ``from_trace`` nodes and ``kept`` receives the values it keeps. ``digest``: the
        plan's digest where the caller has it already."""
        start = time.perf_counter()
        kwargs, layout = build_batch(plan, pad_id=self.pad_id, device=self.device,
                                     embed_dtype=self.dtype)
        runner = PlanRunner(plan, self.info, schedule, layout, module_lookup=self._modules.__getitem__,
                            device=self.device, limits=limits, frozen=self._frozen(),
                            imports=imports, footprints=self.footprints)
        values: dict[int, Any] = {}
        if runner.gradients is not None:
            self._backprops.add(runner.gradients)
            runner.gradients.deadline = deadline
        self.weights.ready()
        try:
            if runner.gradients is not None:
                backward_seconds = run_with_backward(self.model, kwargs, runner)
            else:
                with torch.inference_mode():
                    if plan.mode == "trace":
                        runner.begin_step(0)
                        if not runner.stops_before(0):
                            with runner.hooks(), stopping():
                                self.model(**kwargs, use_cache=False)
                        runner.check_complete(1)
                    else:
                        generated = self._generate(plan, kwargs, layout, runner)
                        if generated is not None:
                            values[request.GENERATED] = generated
        except (PlanError, ExecutionError):
            raise
        except torch.OutOfMemoryError as e:
            raise ExecutionError(f"out of memory running the plan: {e}") from None
        finally:
            self.weights.check()  # a write validation missed: restore, fail this request
            if runner.gradients is not None:
                runner.gradients.release()  # the graph goes, whatever happened
        values.update(runner.results())
        meta = request.result_meta(plan, model=self.name, info=self.info, started=start,
                                   node_seconds=runner.node_seconds, device=self.device,
                                   digest=digest)
        if runner.gradients is not None:
            meta["autograd_bytes"] = [runner.gradients.autograd_bytes]  # per stage: one here
            meta["backward_seconds"] = backward_seconds
            # where an in-process backward request's time went (benchmarks/gradients.py)
            meta["phase_seconds"] = {"forward": runner.gradients.forward_seconds,
                                     "copies to host": runner.copy_seconds,
                                     "device wait": runner.sync_seconds}
        if kept is not None:
            kept.update(runner.kept)
        return values, meta

    def _frozen(self) -> frozenset[int]:
        if self.__dict__.get("_weight_storages") is None:
            self._weight_storages = weight_storages(self.model)
        return self._weight_storages

    def _generate(self, plan: Plan, kwargs: dict[str, torch.Tensor], layout: BatchLayout,
                  runner: PlanRunner) -> list[torch.Tensor] | None:
        """The decoding loop (:class:`~tpmlab.runtime.decoding.Decoding`) on the whole model,
        its KV cache in this process: each row's tokens, or ``None`` where the plan's
        ``tracer.stop()`` ended the generation (no later layer or step ran)."""
        eos = eos_ids(plan.generate, self.model.generation_config)
        decoding = Decoding(plan.generate, kwargs.get("input_ids"), kwargs["attention_mask"],
                            kwargs["position_ids"], eos=eos, pad_id=self.pad_id,
                            tokenizer=self.tokenizer)
        cache = DynamicCache(config=self.model.config)
        with runner.hooks():
            for feed in decoding:
                inputs = ({"input_ids": feed.input_ids} if feed.input_ids is not None
                          else {"inputs_embeds": kwargs["inputs_embeds"]})
                runner.begin_step(feed.step)
                out = None
                if not runner.stops_before(feed.step):
                    with stopping():
                        out = self.model(**inputs, attention_mask=feed.attention_mask,
                                         position_ids=feed.position_ids, cache=cache,
                                         use_cache=True, logits_to_keep=1)
                if out is None:  # tracer.stop() was reached in this step's pass
                    decoding.halt()
                    continue
                decoding.advance(next_tokens(plan.generate, decoding.ids, out.logits[:, -1, :],
                                             feed.step))
        runner.check_complete(decoding.steps_run)
        if decoding.halted:
            return None
        return decoding.outputs([n for lengths in layout.lengths for n in lengths])
