"""nnsight constructs on tpmlab: those a plan cannot express, or that tpmlab does not offer,
fail with an error that names the construct and the form to use instead; the one silent
difference (a saved value is a copy) warns; seeds, caches, splitting into passes and
persistent edits behave as documented in docs/nnsight.md."""

from __future__ import annotations

import pytest
import torch

from tpmlab.errors import NotSupportedError, TpmlabError
from tpmlab.tracing.saves import SavedValueWrittenWarning

MODEL = "tiny-llama"
PROMPT = "The Eiffel Tower is located in"


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model(MODEL)


def _model_attr(name):
    def body(m):
        getattr(m, name)()
    return body


def _in_trace(body):
    def run(m):
        with m.trace(PROMPT) as tr:
            body(m, tr)
    return run


def _in_generate(body):
    def run(m):
        with m.generate(PROMPT, max_new_tokens=3) as gen:
            body(m, gen)
    return run


def _if_on_value(m, tr):
    if (m.layers[0].output < 1e5).all():
        pass


def _loop_over_value(m, tr):
    for _ in m.layers[0].output:
        pass


def _step_block_compared(m, gen):
    with gen.all() as step:
        if step == 2:
            m.layers[0].output[:] = 0


CASES = {
    # construct: (what runs, words the message must hold)
    "module.source value not offered": (
        _in_trace(lambda m, tr: m.layers[0].self_attn.source.apply_rotary_pos_emb_0),
        [".source.apply_rotary_pos_emb_0", "attention_interface_1", "self_q_proj_0",
         "attention_probs"]),
    "if on a value": (_in_trace(_if_on_value), ["torch.where", "`if`"]),
    "loop over a value": (_in_trace(_loop_over_value), ["iterated", "range"]),
    "recording after tracer.stop()": (_in_trace(lambda m, tr: (tr.stop(), m.layers[0].output)),
                                      ["after tracer.stop()", "end of the block"]),
    "tracer.next()": (_in_generate(lambda m, gen: gen.next()), ["next", "gen.step"]),
    "with gen.all() as step: if step == 2": (_in_generate(_step_block_compared),
                                             ["gen.step(2)", "gen.iter"]),
    "trace(..., remote=True)": (lambda m: m.trace(PROMPT, remote=True), ["remote", "gateway"]),
    "value.item()": (_in_trace(lambda m, tr: m.layers[0].output.item()), [".save()"]),
    "unknown method": (_in_trace(lambda m, tr: m.layers[0].output.frobnicate(1)),
                       ["frobnicate", "whitelisted"]),
    "torch function outside the whitelist": (
        _in_trace(lambda m, tr: torch.special.erf(m.layers[0].output)), ["erf", "whitelist"]),
    "a generator object": (
        _in_trace(lambda m, tr: torch.randn_like(m.layers[0].output,
                                                 generator=torch.Generator())),
        ["generator", "seed="]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unsupported_construct_names_itself_and_the_alternative(model, case):
    body, words = CASES[case]
    with pytest.raises(NotSupportedError) as err:
        body(model)
    assert isinstance(err.value, TpmlabError)
    for word in words:
        assert word in str(err.value), (case, str(err.value))
    assert "has no submodule" not in str(err.value)


def test_a_typo_is_still_a_typo(model):
    with pytest.raises(AttributeError, match="has no submodule 'layerz'"):
        _ = model.model.layerz


def test_write_after_save_warns_and_the_save_is_the_earlier_value(model):
    with pytest.warns(SavedValueWrittenWarning, match="copy made at .save()"):
        with model.trace(PROMPT):
            h = model.layers[0].output
            saved = h.save()
            before = h.clone().save()
            h[:] = 0  # nnsight's saved value would now read 0
    torch.testing.assert_close(saved.value, before.value)
    assert saved.value.abs().sum() > 0


def test_save_after_the_write_does_not_warn(model, recwarn):
    with model.trace(PROMPT):
        h = model.layers[0].output
        h[:, -1] = 0
        saved = h.save()
    assert not [w for w in recwarn if issubclass(w.category, SavedValueWrittenWarning)]
    assert saved.value[:, -1].abs().sum() == 0


def test_replacing_a_saved_output_keeps_the_saved_value_as_nnsight_does(model, recwarn):
    with model.trace(PROMPT):
        old = model.layers[0].output.save()
        model.layers[0].output = model.layers[0].output * 0
        new = model.layers[0].output.save()
    assert not [w for w in recwarn if issubclass(w.category, SavedValueWrittenWarning)]
    assert old.value.abs().sum() > 0 and new.value.abs().sum() == 0


def test_random_values_are_reproducible_and_recorded(model):
    def draw(seed):
        with model.trace(PROMPT, seed=seed) as tr:
            noise = torch.randn_like(model.layers[0].output).save()
            uniform = torch.rand_like(model.layers[0].output).save()
        return tr, noise.value, uniform.value

    tr, a, u = draw(7)
    _, b, _ = draw(7)
    _, c, _ = draw(8)
    assert tr.result.meta["seed"] == 7
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert 0 <= u.min() and u.max() < 1
    with model.trace(PROMPT) as tr:  # no seed given: one is chosen and recorded
        torch.randn_like(model.layers[0].output).save()
    assert isinstance(tr.result.meta["seed"], int)


def test_a_trace_that_cannot_be_split_says_why(model, monkeypatch):
    import dataclasses

    from tpmlab.errors import LimitError

    monkeypatch.setattr(model, "limits", dataclasses.replace(model.limits, max_invokes=1))
    with pytest.raises(LimitError, match="cannot be split") as err:
        with model.trace() as tr:
            with tr.invoke("Hello"):
                a = model.layers[0].output[:, -1]
            with tr.invoke("World"):
                (model.layers[0].output[:, -1] - a).save()
    assert "test_nnsight_constructs.py" in err.value.line


def test_cache_with_a_filter(model):
    with model.trace(PROMPT) as tr:
        cache = tr.cache(filter=lambda path: path.endswith("mlp"))
    n = model.adapter.n_layers
    assert sorted(cache) == [f"model.layers.{i}.mlp" for i in range(n)]
    assert cache["model.layers.0.mlp"].value.shape[-1] == model.d_model


def test_an_edit_applies_at_every_generation_step(model):
    v = torch.linspace(-3, 3, model.d_model)
    with model.edit() as (_, edited):
        edited.layers[1].output[:, -1] += v
    with edited.generate(PROMPT, max_new_tokens=4) as gen:
        with gen.all():
            ours = edited.layers[1].output[:, -1].save()
    with model.generate(PROMPT, max_new_tokens=4) as ref:
        with ref.all():
            model.layers[1].output[:, -1] += v
            want = model.layers[1].output[:, -1].save()
    assert len(ours.value) == 4
    for a, b in zip(ours.value, want.value):
        torch.testing.assert_close(a, b)
    assert [t.tolist() for t in gen.generated_ids] == [t.tolist() for t in ref.generated_ids]


def test_an_edit_runs_in_every_pass_of_a_split_trace(model, monkeypatch):
    import dataclasses

    v = torch.linspace(-1, 1, model.d_model)
    with model.edit() as (_, edited):
        edited.layers[0].output[:, -1] += v
    prompts = ["One", "Two three", "Four five six"]
    monkeypatch.setattr(edited, "limits", dataclasses.replace(edited.limits, max_invokes=1))
    with edited.trace() as tr:
        split = []
        for p in prompts:
            with tr.invoke(p):
                split.append(edited.output.logits[:, -1].save())
    assert tr.result.meta["passes"] == 3
    for p, got in zip(prompts, split):
        with model.trace(p):
            model.layers[0].output[:, -1] += v
            want = model.output.logits[:, -1].save()
        torch.testing.assert_close(got.value, want.value, atol=1e-5, rtol=1e-5)


def test_an_edit_cannot_save_and_leaves_other_handles_alone(model):
    with pytest.raises(NotSupportedError, match="cannot save"):
        with model.edit() as (_, edited):
            edited.layers[0].output.save()
    with model.edit() as (_, edited):
        edited.layers[0].output[:] = 0
    other = model.handle()
    assert len(edited.edits.nodes) > 0 and not model.edits.nodes and not other.edits.nodes


def test_a_session_runs_its_traces_in_order_when_it_ends(model):
    with model.session():
        with model.trace("Hello") as first:
            h = model.layers[0].output[:, -1]
            kept = model.layers[0].output.save()
        assert first.result is None  # nothing ran yet
        with model.trace(PROMPT) as second:
            model.layers[0].output[:, -1] = h * 2
            patched = model.layers[0].output[:, -1].save()
    assert first.result is not None and second.result is not None
    torch.testing.assert_close(patched.value, kept.value[:, -1] * 2)


def test_values_cross_traces_only_inside_a_session(model):
    with model.trace("Hello"):
        h = model.layers[0].output[:, -1]
    with pytest.raises(TpmlabError, match="model.session"):
        with model.trace(PROMPT):
            model.layers[0].output[:, -1] = h
    with pytest.raises(NotSupportedError, match="do not nest"):
        with model.session():
            with model.session():
                pass
    with pytest.raises(NotSupportedError, match="one tensor"):
        with model.session():
            with model.generate("Hello", max_new_tokens=2) as gen:
                with gen.all():
                    steps = model.layers[0].output[:, -1]
            with model.trace(PROMPT):
                model.layers[0].output[:, -1] = steps


def test_a_split_generation_gives_each_row_its_tokens(model, monkeypatch):
    import dataclasses

    prompts = ["One two", "The Eiffel Tower is", "Hello"]

    def generate():
        with model.generate(max_new_tokens=3) as gen:
            for p in prompts:
                with gen.invoke(p):
                    pass
        return gen

    whole = generate()
    monkeypatch.setattr(model, "limits", dataclasses.replace(model.limits, max_invokes=2))
    split = generate()
    assert split.result.meta["passes"] == 2
    assert [t.tolist() for t in split.generated_ids] == [t.tolist() for t in whole.generated_ids]


def test_attaching_a_module_never_hides_the_model_s_own(model):
    with pytest.raises(TpmlabError, match="already has a submodule 'mlp'"):
        model.layers[0].mlp = torch.nn.Linear(2, 2)
    with pytest.raises(TpmlabError, match="your own modules"):
        model.layers[0].scale = 2.0


def test_a_generation_s_seed_also_seeds_its_random_values(model):
    def run():
        with model.generate(PROMPT, max_new_tokens=2, seed=5) as gen:
            noise = torch.randn_like(model.layers[0].output).save()
        return gen, noise.value

    (gen, a), (_, b) = run(), run()
    assert gen.result.meta["seed"] == 5
    torch.testing.assert_close(a, b)


def _count_layer_calls(local_lab, model):
    """Records which decoder layers of the deployed model run (index per call)."""
    host = local_lab.backend.host(MODEL)
    layers = host.model.get_submodule(model.adapter.layers)
    calls: list[int] = []
    handles = [layer.register_forward_hook(lambda *_, i=i: calls.append(i))
               for i, layer in enumerate(layers)]
    return calls, handles


def test_stop_ends_the_pass_after_the_last_value_the_trace_needs(local_lab, model):
    calls, handles = _count_layer_calls(local_lab, model)
    try:
        with model.trace(PROMPT) as tr:
            h = model.layers[1].output.save()
            tr.stop()
        assert calls == [0, 1]  # layers 2.. never ran
        calls.clear()
        with model.trace(PROMPT):
            whole = model.layers[1].output.save()
        assert calls == list(range(model.adapter.n_layers))
        calls.clear()
        with model.trace(PROMPT) as tr:  # nothing to read: nothing runs
            tr.stop()
        assert calls == [] and tr.result is not None
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(h.value, whole.value)


def test_stop_in_a_generation_ends_it(model):
    """As nnsight's: after the last value read, with no tokens (more cases in
    tests/core/test_generation_stop.py)."""
    with model.generate(PROMPT, max_new_tokens=2) as gen:
        h = model.layers[0].output.save()
        gen.stop()
    assert gen.generated_ids == [] and h.value.shape[-1] == model.d_model


def test_inputs_of_an_invoke_are_its_own_rows(model):
    """In a batch of prompts of different lengths, each invoke's ``.inputs`` are those of
    its prompt alone; a replacement of a whole call reaches only a module the invoke owns."""
    short = "Hello"
    with model.trace() as tr:
        with tr.invoke(PROMPT):
            pass
        with tr.invoke(short) as inv:
            batched = model.layers[2].inputs.save()
            ids = inv.inputs[1]["input_ids"].save()
    with model.trace(short):
        alone = model.layers[2].inputs.save()
    assert ids.value.tolist() == [model.tokenizer(short)["input_ids"]]
    torch.testing.assert_close(batched.value[0][0], alone.value[0][0])
    for key, value in alone.value[1].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(batched.value[1][key], value)


def test_inputs_replaced_with_another_structure(model):
    """``layer.inputs = (args, kwargs)`` with keyword inputs of its own: the call gets them."""
    with model.trace(PROMPT):
        args, kwargs = model.layers[1].inputs
        model.layers[1].inputs = ((args[0] * 0,), {"position_embeddings": kwargs["position_embeddings"],
                                                    "attention_mask": None})
        out = model.layers[1].output.save()
    assert out.value.abs().max() < 1e-6  # no residual and zero attention/MLP input (no bias)
    with pytest.raises(TpmlabError, match="inputs are \\(args, kwargs\\)"):
        with model.trace(PROMPT):
            model.layers[1].inputs = model.layers[1].input
