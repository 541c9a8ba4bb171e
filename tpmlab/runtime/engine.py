"""Running validated plans on a whole model held in this process.

:class:`ModelHost` holds one loaded model with its :class:`ModelInfo` and runs
plan blobs on it: decode, validate, batch, run with a :class:`PlanRunner`,
encode the saved values. Every failure is a named error and leaves the model as
it was (hooks are removed whatever happens).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import ExecutionError, PlanError
from ..ir.codec import decode_plan, dtype_name, encode_result, plan_to_doc
from ..ir.model_info import ModelInfo
from ..ir.plan import Plan
from ..ir.validate import Limits, validate
from .backward import run_with_backward, weight_storages
from .batching import build_batch
from .interleaver import PlanRunner
from .limits import request_limits
from .probe import probe_causal_lm
from .weights import WeightGuard

GENERATED = -1  # result key of the generated token ids (one 1-D tensor per row)


def plan_digest(plan: Plan) -> str:
    """A digest of what the plan does: its graph and constants, not the user's line numbers."""
    doc, tensors = plan_to_doc(plan)
    for node in doc["nodes"]:
        node.pop("line", None)
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


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

    def run_blob(self, blob: bytes, *, limits: Limits | None = None) -> bytes:
        limits = request_limits(self.limits, limits)
        plan = decode_plan(blob, max_bytes=limits.max_plan_bytes)
        values, meta = self.run(plan, limits=limits)
        return encode_result(values, meta)

    def run(self, plan: Plan, *, limits: Limits | None = None
            ) -> tuple[dict[int, Any], dict[str, Any]]:
        """Validate and run ``plan``: its saved values by node id, and the result's metadata
        (provenance; ``compute_seconds``, the whole request; ``node_seconds``, each plan node's
        own time, see :attr:`PlanRunner.node_seconds`). ``limits`` tighten the host's own."""
        if plan.model != self.name:
            raise PlanError(f"the plan is for model {plan.model!r}, this host holds {self.name!r}")
        limits = request_limits(self.limits, limits)
        schedule = validate(plan, self.info, limits=limits, meta_module=self._meta.get)
        start = time.perf_counter()
        kwargs, layout = build_batch(plan, pad_id=self.pad_id, device=self.device,
                                     embed_dtype=self.dtype)
        runner = PlanRunner(plan, self.info, schedule, layout, module_lookup=self._modules.__getitem__,
                            device=self.device, limits=limits, frozen=self._frozen())
        values: dict[int, Any] = {}
        self.weights.ready()
        try:
            if runner.gradients is not None:
                backward_seconds = run_with_backward(self.model, kwargs, runner)
            else:
                with torch.inference_mode():
                    if plan.mode == "trace":
                        runner.begin_step(0)
                        with runner.hooks():
                            self.model(**kwargs, use_cache=False)
                        runner.check_complete(1)
                    else:
                        values[GENERATED] = self._generate(plan, kwargs, layout, runner)
        except (PlanError, ExecutionError):
            raise
        except torch.OutOfMemoryError as e:
            raise ExecutionError(f"out of memory running the plan: {e}") from None
        finally:
            self.weights.check()  # a write validation missed: restore, fail this request
        values.update(runner.results())
        meta = {
            "model": self.name,
            "model_version": self.info.version,
            "plan_digest": plan_digest(plan),
            "tpmlab_version": __version__,
            "compute_seconds": time.perf_counter() - start,
            "node_seconds": runner.node_seconds,
            "device": str(self.device),
        }
        if runner.gradients is not None:
            meta["autograd_bytes"] = [runner.gradients.autograd_bytes]  # per stage: one here
            meta["backward_seconds"] = backward_seconds
        return values, meta

    def _frozen(self) -> frozenset[int]:
        if self.__dict__.get("_weight_storages") is None:
            self._weight_storages = weight_storages(self.model)
        return self._weight_storages

    def _generate(self, plan: Plan, kwargs: dict, layout, runner: PlanRunner) -> list[torch.Tensor]:
        opts = plan.generate
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": opts.max_new_tokens, "do_sample": opts.do_sample,
            "pad_token_id": self.pad_id,
        }
        if "attention_mask" in kwargs:
            gen_kwargs["attention_mask"] = kwargs["attention_mask"]
        for key in ("temperature", "top_k", "top_p"):
            if getattr(opts, key) is not None:
                gen_kwargs[key] = getattr(opts, key)
        if not opts.do_sample:  # greedy: silence the model's default sampling settings
            gen_kwargs.update(temperature=None, top_k=None, top_p=None)
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        if "input_ids" in kwargs:
            gen_kwargs["input_ids"] = kwargs["input_ids"]
        else:
            gen_kwargs["inputs_embeds"] = kwargs["inputs_embeds"]
        with runner.hooks(self.model, count_steps=True):
            out = self.model.generate(**gen_kwargs)
        prompt_len = layout.seq_len if "input_ids" in kwargs else 0
        steps_run = out.shape[1] - prompt_len
        runner.check_complete(steps_run)
        rows = [length for lengths in layout.lengths for length in lengths]
        if prompt_len:
            return [out[i, prompt_len - n:].cpu() for i, n in enumerate(rows)]
        return [out[i].cpu() for i in range(out.shape[0])]
