"""nnsight's tutorial operations written twice: for tpmlab and for nnsight 0.8 on the same
weights. Each port returns the two lists of tensors, to be compared; the in-process and the
Dask-stage tests run the same ports (tests/core/test_nnsight_parity.py,
tests/cluster/test_cluster_nnsight.py)."""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F  # noqa: N812

from tpmlab.ir.validate import Limits

PROMPT = "The Eiffel Tower is located in the city of"
PROMPTS = ["Hi there", PROMPT, "One two three four", "A", "Paris is the capital of"]


def nn_model_for(model, attn_implementation: str | None = None):
    """nnsight's wrapper around a separate copy of ``model``'s weights."""
    import nnsight

    hf = model.source.load().model
    if attn_implementation:
        hf.set_attn_implementation(attn_implementation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nnsight.LanguageModel(hf, tokenizer=model.tokenizer)


def nn_path(nn_model, path: str):
    env = nn_model
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def nn_layers(nn_model, model):
    return nn_path(nn_model, model.adapter.layers)


def reflected_and_function_forms(model, nn_model):
    """Numbers or tensors left of an operator, and torch / functional forms of ops."""
    ones = torch.ones(model.d_model)

    def body(h):
        return [1 - h, 2 * h, 0.5 + h, ones + h, F.softmax(h, dim=-1), F.log_softmax(h, dim=-1),
                F.relu(h), F.gelu(h), torch.add(h, 1), torch.where(h > 0, h, 0.5 * h),
                torch.softmax(h, -1)]

    with model.trace(PROMPT):
        ours = [v.save() for v in body(model.layers[0].output)]
    with nn_model.trace(PROMPT):  # nnsight hands back saved names, not lists of them
        theirs = list().save()
        theirs.extend(body(nn_layers(nn_model, model)[0].output))
    return [p.value for p in ours], list(theirs)


def skip_module(model, nn_model):
    """``layer.skip(value)``: the layer's output is the given value."""
    with model.trace(PROMPT):
        model.layers[1].skip(model.layers[0].output)
        ours = [model.layers[1].output.save(), model.output.logits.save()]
    layers = nn_layers(nn_model, model)
    with nn_model.trace(PROMPT):
        layers[1].skip(layers[0].output)
        skipped = layers[1].output.save()
        logits = nn_model.output.logits.save()
    return [p.value for p in ours], [skipped, logits]


def tuple_output_replacement(model, nn_model):
    """A whole tuple output replaced: the attention's ``(output, weights)``."""
    attn_path = f"{model.layers[1].path}.{model.adapter.attn}"
    attn = model.envoy(attn_path)
    with model.trace(PROMPT):
        attn.output = (attn.output[0] * 0.5, attn.output[1])
        ours = [model.layers[1].output.save(), model.output.logits.save()]
    nn_attn = nn_path(nn_model, attn_path)
    with nn_model.trace(PROMPT):
        nn_attn.output = (nn_attn.output[0] * 0.5, nn_attn.output[1])
        layer = nn_layers(nn_model, model)[1].output.save()
        logits = nn_model.output.logits.save()
    return [p.value for p in ours], [layer, logits]


def persistent_edit(model, nn_model):
    """``model.edit()``: a new handle whose traces apply the edit; ``inplace=True`` and
    ``clear_edits()`` on the handle itself; the unedited model is unchanged."""
    v = torch.linspace(-1, 1, model.d_model)
    with model.edit() as (_, edited):
        edited.layers[1].output[:, -1] += v
    with edited.trace(PROMPT):
        ours = [edited.output.logits.save()]
    with model.trace(PROMPT):
        ours.append(model.output.logits.save())
    try:
        with model.edit(inplace=True):
            model.layers[0].output[:] *= 0.5
        with model.trace(PROMPT):
            ours.append(model.output.logits.save())
    finally:
        model.clear_edits()
    with model.trace(PROMPT):
        ours.append(model.output.logits.save())
    layers = nn_layers(nn_model, model)
    with nn_model.edit() as (_, nn_edited):
        nn_layers(nn_edited, model)[1].output[:, -1] += v
    with nn_edited.trace(PROMPT):
        edited_logits = nn_edited.output.logits.save()
    with nn_model.trace(PROMPT):
        plain = nn_model.output.logits.save()
    with nn_model.edit(inplace=True):
        layers[0].output[:] *= 0.5
    with nn_model.trace(PROMPT):
        inplace = nn_model.output.logits.save()
    nn_model.clear_edits()
    with nn_model.trace(PROMPT):
        cleared = nn_model.output.logits.save()
    return [p.value for p in ours], [edited_logits, plain, inplace, cleared]


class SparseAutoencoder(torch.nn.Module):
    """A user's own module (an SAE): it runs on the engine as whitelisted ops of its
    weights, which travel with the plan as constants (no code travels)."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W_enc = torch.nn.Parameter(torch.randn(d_model, d_hidden, generator=g) / d_model**0.5)
        self.b_enc = torch.nn.Parameter(torch.full((d_hidden,), -0.1))
        self.W_dec = torch.nn.Parameter(torch.randn(d_hidden, d_model, generator=g) / d_hidden**0.5)
        self.b_dec = torch.nn.Parameter(torch.zeros(d_model))

    def forward(self, x):
        features = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        return features @ self.W_dec + self.b_dec


def auxiliary_modules(model, nn_model):
    """An SAE and a probe (``nn.Sequential`` of LayerNorm, Linear, GELU) called on module
    values, the SAE also attached to a layer (``layer.sae = sae``); the SAE's reconstruction
    patched in at two layers."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(model.d_model, 96)
    probe = torch.nn.Sequential(torch.nn.LayerNorm(model.d_model), torch.nn.Linear(model.d_model, 8),
                                torch.nn.GELU(), torch.nn.Linear(8, 2))
    model.layers[1].sae = sae  # attached to a module, as nnsight allows
    with model.trace(PROMPT) as tr:
        ours = [probe(model.layers[0].output).softmax(-1).save()]
        model.layers[0].output = sae(model.layers[0].output)
        model.layers[1].output = model.layers[1].sae(model.layers[1].output)
        ours.append(model.output.logits.save())
    assert len(tr.tensors) == 1 + 6 + 4  # the prompt, the probe, the SAE once (used twice)
    layers = nn_layers(nn_model, model)
    layers[1].sae = sae
    with nn_model.trace(PROMPT):
        probs = probe(layers[0].output).softmax(-1).save()
        layers[0].output = sae(layers[0].output)
        layers[1].output = layers[1].sae(layers[1].output)
        logits = nn_model.output.logits.save()
    return [p.value for p in ours], [probs, logits]


def dry_run_shapes(model, nn_model):
    """``model.scan(prompt)``: shapes without running (here: no request reaches the engine)."""
    with model.scan(PROMPT) as tr:
        h = model.layers[0].output.save()
        logits = model.output.logits.save()
    assert tr.result.meta["dry_run"] and h.value.device.type == "meta"
    with nn_model.scan(PROMPT):
        nn_h = nn_layers(nn_model, model)[0].output.save()
        nn_logits = nn_model.output.logits.save()
    return ([torch.tensor(list(h.value.shape)), torch.tensor(list(logits.value.shape))],
            [torch.tensor(list(nn_h.shape)), torch.tensor(list(nn_logits.shape))])


def session_patching(model, nn_model):
    """``model.session()``: two-pass activation patching, the first trace's value used in the
    second without saving it."""
    clean, corrupt = "The Colosseum is in the city of", PROMPT
    with model.session():
        with model.trace(clean):
            h = model.layers[1].output[:, -1]
        with model.trace(corrupt):
            model.layers[1].output[:, -1] = h
            ours = model.output.logits[:, -1].save()
    layers = nn_layers(nn_model, model)
    with nn_model.session():
        with nn_model.trace(clean):
            nn_h = layers[1].output[:, -1]
        with nn_model.trace(corrupt):
            layers[1].output[:, -1] = nn_h
            theirs = nn_model.output.logits[:, -1].save()
    return [ours.value], [theirs]


def session_patching_across_layers(model, nn_model):
    """Two-pass activation patching in a session, the value kept on the engine: a clean
    activation of the last layer patched into the first layer of a corrupted run, and one of
    the first layer into the last (on 2 stages each crosses stages, both ways). Only what is
    saved comes back: the clean activations are in no result."""
    clean, corrupt = "The Colosseum is in the city of", PROMPT
    last = model.adapter.n_layers - 1
    with model.session():
        with model.trace(clean) as first:
            early = model.layers[0].output[:, 2]
            late = model.layers[last].output[:, -1]
        with model.trace(corrupt) as second:
            model.layers[0].output[:, -1] = late
            ours = [model.output.logits[:, -1].save()]
        with model.trace(corrupt) as third:
            model.layers[last].output[:, 2] = early * 0.5
            ours.append(model.output.logits[:, -1].save())
    assert first.result.values == {}  # the kept values never came back
    assert len(second.result.values) == len(third.result.values) == 1
    layers = nn_layers(nn_model, model)
    with nn_model.session():
        with nn_model.trace(clean):
            nn_early = layers[0].output[:, 2]
            nn_late = layers[last].output[:, -1]
        with nn_model.trace(corrupt):
            layers[0].output[:, -1] = nn_late
            a = nn_model.output.logits[:, -1].save()
        with nn_model.trace(corrupt):
            layers[last].output[:, 2] = nn_early * 0.5
            b = nn_model.output.logits[:, -1].save()
    return [p.value for p in ours], [a, b]


def stop_early(model, nn_model):
    """``tracer.stop()`` after the values of interest: the pass ends there (a patch at
    layer 0, read at layer 1)."""
    v = torch.linspace(-1, 1, model.d_model)
    with model.trace(PROMPT) as tr:
        first = model.layers[0].output.clone().save()
        model.layers[0].output[:, -1] += v
        ours = [first, model.layers[1].output.save()]
        tr.stop()
    layers = nn_layers(nn_model, model)
    with nn_model.trace(PROMPT) as tr:
        nn_first = layers[0].output.clone().save()
        layers[0].output[:, -1] += v
        second = layers[1].output.save()
        tr.stop()
    return [p.value for p in ours], [nn_first, second]


def cross_invoke_barrier(model, nn_model):
    """nnsight's barrier idiom: invoke 1's layer-0 output patched into invoke 2 at the same
    module point (two prompts of one length, so the values fit)."""
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    other = ids.flip(-1)
    with model.trace() as tr:
        barrier = tr.barrier(2)
        with tr.invoke(ids):
            h = model.layers[0].output
            barrier()
            clean = model.output.logits.save()
        with tr.invoke(other):
            barrier()
            model.layers[0].output = h
            ours = [model.layers[1].output.save(), model.output.logits.save()]
    layers = nn_layers(nn_model, model)
    with nn_model.trace() as tr:
        barrier = tr.barrier(2)
        with tr.invoke(ids):
            nn_h = layers[0].output
            barrier()
            nn_clean = nn_model.output.logits.save()
        with tr.invoke(other):
            barrier()
            layers[0].output = nn_h
            patched = layers[1].output.save()
            logits = nn_model.output.logits.save()
    torch.testing.assert_close(ours[1].value, clean.value)  # invoke 2 became invoke 1
    return [clean.value] + [p.value for p in ours], [nn_clean, patched, logits]


def _tensors_of(kwargs: dict) -> dict:
    """The tensors among keyword inputs (a tuple of them, as rotary embeddings: each)."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            out.update({f"{key}[{i}]": v for i, v in enumerate(value)})
    return out


def module_inputs(model, nn_model):
    """``.inputs`` (``(args, kwargs)``) and ``.input`` of a layer read, saved and replaced;
    the model's own inputs in an invoke (``model.inputs``, tpmlab also ``invoke.inputs``)."""
    layer = model.layers[-1]  # on 2 stages: the last stage's
    with model.trace() as tr:
        with tr.invoke(PROMPT) as invoke:
            root = invoke.inputs.save()
            root_kwargs = model.inputs[1]  # the same value
            ids = root_kwargs["input_ids"].save()
            args, kwargs = layer.inputs
            ours = [args[0].save(), kwargs.save(), layer.input.save()]
            layer.inputs = ((args[0] * 2,), kwargs)
            ours.append(layer.output.save())
            ours.append(model.output.logits.save())
    nn_layer = nn_layers(nn_model, model)[-1]
    with nn_model.trace() as tr:
        with tr.invoke(PROMPT):
            nn_root = nn_model.inputs.save()
            nn_args, nn_kwargs = nn_layer.inputs
            theirs = list().save()
            theirs.extend([nn_args[0], nn_kwargs, nn_layer.input])
            nn_layer.inputs = ((nn_args[0] * 2,), nn_kwargs)
            theirs.extend([nn_layer.output, nn_model.output.logits])
    ours = [p.value for p in ours]
    assert root.value[0] == () and nn_root[0] == ()
    assert torch.equal(ids.value, root.value[1]["input_ids"])
    keys = ("input_ids", "attention_mask", "position_ids")
    mine, nn_kw = _tensors_of(ours[1]), _tensors_of(theirs[1])
    common = sorted(set(mine) & set(nn_kw))
    if model.adapter.family != "gpt2":
        assert "position_embeddings[0]" in common, (sorted(mine), sorted(nn_kw))
    return ([root.value[1][k] for k in keys if k in nn_root[1]] + [ours[0], ours[2]] + ours[3:]
            + [mine[k] for k in common],
            [nn_root[1][k] for k in keys if k in nn_root[1]] + [theirs[0], theirs[2]] + theirs[3:]
            + [nn_kw[k] for k in common])


def attention_patterns(model, nn_model):
    """Attention probabilities (nnsight: ``.source`` or ``output_attentions`` with eager
    attention), first and last layer."""
    layers = [0, model.adapter.n_layers - 1]
    with model.trace(PROMPT):
        ours = [model.attention_probs(i).save() for i in layers]
    eager = nn_model_for(model, "eager")
    with eager.trace(PROMPT, output_attentions=True):
        attentions = eager.output.attentions.save()
    return [p.value for p in ours], [attentions[i] for i in layers]


def source_values(model, nn_model):
    """``.source`` inside the last layer: the attention function's output (the heads'
    outputs and the attention weights, nnsight's under eager attention) and the MLP's
    activation read; then one head zeroed through the attention function's output."""
    layer = model.layers[-1]
    attn = model.envoy(f"{layer.path}.{model.adapter.attn}")
    mlp = model.envoy(f"{layer.path}.{model.adapter.mlp}")
    act = next(name for name in mlp.module._modules if name.startswith("act"))
    with model.trace(PROMPT):
        both = attn.source.attention_interface_1.output.save()
        activation = getattr(mlp.source, f"self_{act}_0").output.save()
    with model.trace(PROMPT):
        heads, _ = attn.source.attention_interface_1.output
        heads[:, :, 0] = 0
        logits = model.output.logits.save()
    eager = nn_model_for(model, "eager")
    nn_attn, nn_mlp = nn_path(eager, attn.path), nn_path(eager, mlp.path)
    with eager.trace(PROMPT):
        nn_both = nn_attn.source.attention_interface_1.output.save()
        nn_activation = getattr(nn_mlp.source, f"self_{act}_0").output.save()
    with eager.trace(PROMPT):
        nn_attn.source.attention_interface_1.output[0][:, :, 0] = 0
        nn_logits = eager.output.logits.save()
    return ([both.value[0], both.value[1], activation.value, logits.value],
            [nn_both[0], nn_both[1], nn_activation, nn_logits])


def cache_modules(model, nn_model):
    """``tracer.cache(modules=...)``: many modules' outputs in one call."""
    with model.trace(PROMPT) as tr:
        cache = tr.cache(modules=[model.layers[0], model.layers[-1]])
    layers = nn_layers(nn_model, model)
    with nn_model.trace(PROMPT) as tr:
        nn_cache = tr.cache(modules=[layers[0], layers[-1]])
    paths = [model.layers[0].path, model.layers[-1].path]
    return ([cache[p].value for p in paths],
            [nn_cache["model." + p].output for p in paths])


def whole_batch_invoke(model, nn_model):
    """An empty ``tr.invoke()`` addresses the whole batch of the other invokes (padded on
    the left, as the model sees it); each row is compared over its real tokens."""
    with model.trace() as tr:
        for p in PROMPTS[:2]:
            with tr.invoke(p):
                pass
        with tr.invoke():
            first = model.layers[0].output.clone().save()
            model.layers[0].output[:, -1] = 0.0
            last = model.layers[1].output[:, -1].save()
    layers = nn_layers(nn_model, model)
    with nn_model.trace() as tr:
        for p in PROMPTS[:2]:
            with tr.invoke(p):
                pass
        with tr.invoke():
            nn_first = layers[0].output.clone().save()
            layers[0].output[:, -1] = 0.0
            nn_last = layers[1].output[:, -1].save()
    n = len(model.tokenizer(PROMPTS[0])["input_ids"])
    return ([first.value[0, -n:], first.value[1], last.value],
            [nn_first[0, -n:], nn_first[1], nn_last])


def generation_steps(model, nn_model):
    """``for step in tracer.iter[0:3]: if step == 1: ...``, nnsight's walkthrough idiom."""
    v = torch.full((model.d_model,), 2.0)
    with model.generate(PROMPT, max_new_tokens=3) as gen:
        ours = []
        for step in gen.iter[0:3]:
            if step == 1:
                model.layers[1].output[:, -1] += v
            ours.append(model.layers[1].output.save())
    layers = nn_layers(nn_model, model)
    with nn_model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
        theirs = list().save()
        for step in tracer.iter[0:3]:
            if step == 1:
                layers[1].output[:, -1] += v
            theirs.append(layers[1].output.clone())
    return [p.value for p in ours], list(theirs)


def stop_in_generation(model, nn_model):
    """``tracer.stop()`` inside a generation: in ``for step in tracer.iter[...]`` (a patch at
    step 1, a stop at step 2) the loop and the generation end there; in a ``with`` block of
    every step (nnsight's block form) the block runs once, at step 0. No tokens come back."""
    v = torch.full((model.d_model,), 2.0)
    with model.generate(PROMPT, max_new_tokens=4) as gen:
        ours = []
        for step in gen.iter[0:4]:
            if step == 1:
                model.layers[0].output[:, -1] += v
            ours.append(model.layers[1].output.save())
            if step == 2:
                gen.stop()
    assert len(ours) == 3 and gen.output_ids == [] and gen.text == []
    with model.generate(PROMPT, max_new_tokens=4) as gen:
        with gen.all():
            ours.append(model.layers[1].output.save())
            gen.stop()
    assert gen.output_ids == []
    layers = nn_layers(nn_model, model)
    with nn_model.generate(PROMPT, max_new_tokens=4, do_sample=False) as tracer:
        theirs = list().save()
        for step in tracer.iter[0:4]:
            if step == 1:
                layers[0].output[:, -1] += v
            theirs.append(layers[1].output.clone())
            if step == 2:
                tracer.stop()
    assert len(theirs) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnsight's block form is deprecated, and still runs
        with nn_model.generate(PROMPT, max_new_tokens=4, do_sample=False) as tracer:
            once = list().save()  # the block runs in its own scope: a name set there is lost
            with tracer.all():
                once.append(layers[1].output.clone())
                tracer.stop()
    assert len(once) == 1
    return [p.value for p in ours], [*theirs, *once]


def many_invokes(model, nn_model, per_pass: int = 2):
    """More invokes than one pass takes: split into passes, the same numbers as one batch."""
    saved_limits = model.limits
    model.limits = dataclasses.replace(model.limits, max_invokes=per_pass)
    try:
        with model.trace() as tr:
            ours = []
            for p in PROMPTS:
                with tr.invoke(p):
                    model.layers[0].output[:, -1] *= 0.5
                    ours.append(model.output.logits[:, -1].save())
        passes = tr.result.meta["passes"]
    finally:
        model.limits = saved_limits
    assert passes == -(-len(PROMPTS) // per_pass)
    layers = nn_layers(nn_model, model)
    with nn_model.trace() as tr:
        theirs = list().save()
        for p in PROMPTS:
            with tr.invoke(p):
                layers[0].output[:, -1] *= 0.5
                theirs.append(nn_model.output.logits[:, -1])
    return [p.value for p in ours], list(theirs)


def seeded_noise(model, nn_model):
    """``torch.randn_like`` on the engine from a seeded generator: the same numbers as
    nnsight adding the noise drawn from a generator of that seed."""
    with model.trace(PROMPT, seed=1234) as tr:
        h = model.layers[0].output
        noise = torch.randn_like(h)
        model.layers[0].output = h + 0.1 * noise
        ours = [noise.save(), model.output.logits.save()]
    seed = tr.result.meta["seed"]
    assert seed == 1234
    node_seed = next(n.kwargs["seed"] for n in tr.nodes.values() if n.op == "randn_like")
    shape = ours[0].value.shape
    drawn = torch.randn(shape, generator=torch.Generator().manual_seed(node_seed))
    layers = nn_layers(nn_model, model)
    with nn_model.trace(PROMPT):
        layers[0].output = layers[0].output + 0.1 * drawn
        logits = nn_model.output.logits.save()
    return [p.value for p in ours], [drawn, logits]


PORTS = [reflected_and_function_forms, skip_module, tuple_output_replacement, persistent_edit,
         auxiliary_modules, dry_run_shapes, session_patching, session_patching_across_layers,
         stop_early, module_inputs,
         cross_invoke_barrier, source_values,
         attention_patterns,
         cache_modules, whole_batch_invoke,
         generation_steps, stop_in_generation, many_invokes, seeded_noise]

__all__ = ["PORTS", "Limits", "nn_model_for"]
