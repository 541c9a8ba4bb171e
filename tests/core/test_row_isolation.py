"""An invoke owns its rows, a user owns their requests (DESIGN.md contract 9): what one
invoke (or one user of a merged batch) writes never reaches another's rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import TINY_MODELS
from tests.plan_strategies import check_merged_runs, property_settings, users
from tpmlab.errors import ExecutionError
from tpmlab.ir.codec import encode_plan
from tpmlab.ir.model_info import ModelInfo
from tpmlab.ir.plan import EllipsisArg, Invoke, Node, Plan, Ref
from tpmlab.ir.rows import BatchSharedWriteError
from tpmlab.ir.validate import validate

ROTARY = {"tiny-llama": "model.rotary_emb", "tiny-gpt-neox": "gpt_neox.rotary_emb",
          "smollm2-135m": "model.rotary_emb"}
PROMPT = "The Eiffel Tower is in Paris"


@pytest.fixture(scope="module", params=TINY_MODELS + ["smollm2-135m"])
def model(request, local_lab):
    return local_lab.model(request.param)


def _envoy(model, path):
    env = model
    for part in path.split("."):
        env = getattr(env, part)
    return env


def _positional(model):
    """The module whose output carries each row's positions: rotary (cos of (cos, sin)) or a
    learned position embedding."""
    if model.name in ROTARY:
        return ROTARY[model.name], 0
    return "transformer.wpe", None


def _two_invokes(model, write):
    """Logits of two invokes of the same prompt (an unpadded batch); the first writes its
    positional values when ``write``."""
    path, item = _positional(model)
    with model.trace() as tr:
        with tr.invoke(PROMPT):
            value = _envoy(model, path).output
            target = value[item] if item is not None else value
            if write:
                target[:] = 7.0
            seen = target.save()
            first = model.output.logits.save()
        with tr.invoke(PROMPT):
            second = model.output.logits.save()
    return seen.value, first.value, second.value


def test_writing_positional_values_in_one_invoke_leaves_the_other_alone(model):
    """The rotary ``cos``/``sin`` (or learned position embedding) of an unpadded batch was one
    ``[1, T, d]`` tensor that all rows read: writing it in one invoke moved the other
    invoke's logits. Each row now has its own, and an invoke writes only its rows."""
    seen, attacked, victim = _two_invokes(model, write=True)
    _, clean, clean_other = _two_invokes(model, write=False)
    with model.trace(PROMPT):
        alone = model.output.logits.save()
    assert seen.shape[0] == 1 and (seen == 7.0).all(), "the invoke's view is its own row"
    assert not torch.allclose(attacked, clean), "the write must take effect"
    torch.testing.assert_close(victim, clean_other, rtol=0, atol=0)  # not a bit moved
    torch.testing.assert_close(victim, alone.value, rtol=1e-4, atol=1e-4)


def test_positional_values_have_the_shape_of_the_invokes_rows(model):
    """A padded and an unpadded batch give an invoke the same view of them: its rows and its
    positions, as alone (the shape a user sees never depends on who shares the batch)."""
    path, item = _positional(model)
    with model.trace(PROMPT):
        value = _envoy(model, path).output
        alone = (value[item] if item is not None else value).save()
    with model.trace() as tr:
        with tr.invoke("a much longer prompt than the other one, to pad it well"):
            pass
        with tr.invoke(PROMPT):
            value = _envoy(model, path).output
            padded = (value[item] if item is not None else value).save()
    assert alone.value.shape[:2] == (1, len(model.tokenizer(PROMPT)["input_ids"]))
    torch.testing.assert_close(padded.value, alone.value, rtol=1e-6, atol=1e-6)


def test_an_invokes_write_reaches_neither_its_padding_nor_other_rows(local_lab):
    """Invoke 0 (3 tokens, so 4 columns of left padding) writes its whole view of a layer
    output; a point over the whole batch, read after the write, shows that only invoke 0's
    real positions changed: not its padding, not invoke 1's row."""
    info = local_lab.model("tiny-llama").info
    path = "model.layers.1"

    def whole_batch(write: bool) -> torch.Tensor:
        nodes = [Node(0, "point", path=path, io="output", invoke=0)]
        if write:
            nodes.append(Node(1, "setitem", [Ref(0), EllipsisArg(), 9.0]))
        nodes += [Node(2, "point", path=path, io="output", invoke=None), Node(3, "save", [Ref(2)])]
        plan = Plan(model=info.name, model_version=info.version,
                    invokes=[Invoke("tokens", ["a"]), Invoke("tokens", ["b"])],
                    tensors={"a": torch.tensor([5, 6, 7]),
                             "b": torch.tensor([1, 2, 3, 4, 5, 6, 7])},
                    nodes=nodes)
        return local_lab.backend.run_values(info.name, encode_plan(plan))[0][3]

    written, clean = whole_batch(True), whole_batch(False)
    assert written.shape == (2, 7, 64)
    assert (written[0, 4:] == 9.0).all()
    torch.testing.assert_close(written[0, :4], clean[0, :4], rtol=0, atol=0)  # its padding
    torch.testing.assert_close(written[1], clean[1], rtol=0, atol=0)  # the other invoke


def _shared_info(base: ModelInfo) -> ModelInfo:
    """``base`` with its first layer's output described as shared by all rows (``[1, T, d]``),
    as a family whose module returns one value for the whole batch would be."""
    shapes = dict(base.shapes)
    key = next(e for e in base.events if e.endswith(".0:output"))
    shapes[key] = {"shape": [1, "T", shapes[key]["shape"][-1]], "dtype": "float32"}
    return ModelInfo(**{**base.to_dict(), "shapes": shapes}), key


def test_writing_a_batch_shared_value_is_refused_at_validation(local_lab):
    info, key = _shared_info(local_lab.model("tiny-llama").info)
    path = key.rsplit(":", 1)[0]
    plan = Plan(model=info.name, model_version=info.version,
                invokes=[Invoke("tokens", ["a"])], tensors={"a": torch.tensor([1, 2, 3])},
                nodes=[Node(0, "point", path=path, io="output", invoke=0),
                       Node(1, "getitem", [Ref(0), 0]),
                       Node(2, "iadd", [Ref(1), 1.0], line="lab.py:7: h[0] += 1"),
                       Node(3, "save", [Ref(0)])])
    with pytest.raises(BatchSharedWriteError, match=r"all rows of the batch share") as err:
        validate(plan, info)
    assert err.value.node == 2 and err.value.line == "lab.py:7: h[0] += 1"
    assert "[1, T, 64]" in str(err.value) and path in str(err.value)
    reading = plan.replace(nodes=[plan.nodes[0], plan.nodes[3]])
    validate(reading, info)  # reading it is fine
    whole = plan.replace(nodes=[Node(0, "point", path=path, io="output", invoke=None),
                                *plan.nodes[1:]])
    validate(whole, info)  # a point over the whole batch owns it: its plan's own batch


def test_writing_a_value_shared_at_run_time_is_refused(local_lab):
    """What the event's template cannot tell (an expanded tensor: one memory for all rows)
    the runner checks on the live value, before the write."""
    from tpmlab.ir.schedule import build_schedule
    from tpmlab.runtime.batching import build_batch
    from tpmlab.runtime.runner import PlanRunner

    info = local_lab.model("tiny-llama").info
    plan = Plan(model=info.name, model_version=info.version,
                invokes=[Invoke("tokens", ["a"]), Invoke("tokens", ["b"])],
                tensors={"a": torch.tensor([1, 2]), "b": torch.tensor([3, 4])},
                nodes=[Node(0, "point", path="model.norm", io="output", invoke=1),
                       Node(1, "setitem", [Ref(0), 0, 1.0], line="x.py:3")])
    _, layout = build_batch(plan, pad_id=0, device=torch.device("cpu"))
    shared = torch.zeros(1, 2, 64).expand(2, 2, 64)

    class Norm(torch.nn.Module):  # stands in for model.norm, its output the shared value
        def forward(self, x):
            return shared

    norm = Norm()
    runner = PlanRunner(plan, info, build_schedule(plan, info), layout,
                        module_lookup={"model.norm": norm}.__getitem__, device=torch.device("cpu"))
    with pytest.raises(ExecutionError, match=r"all rows of the batch share") as err:
        with runner.hooks():
            norm(torch.zeros(2, 2, 64))
    assert err.value.node == 1 and err.value.line == "x.py:3"
    assert (shared == 0).all()


def test_generation_writes_stay_in_the_invokes_rows(local_lab):
    """At every generation step one invoke writes its rows (prompts of different lengths, so
    the prompt pass is padded; the KV cache keeps each row's own keys): the other invoke's
    tokens and per-step values are bit for bit those of the same batch unwritten."""
    model = local_lab.model("tiny-llama")

    def run(write):
        with model.generate(max_new_tokens=4) as gen:
            with gen.invoke("Hello there, how"):
                with gen.all():
                    if write:
                        model.layers[1].output[:] = 3.0
                    mine = model.layers[1].output.save()
            with gen.invoke("The Eiffel Tower is in the city of"):
                with gen.all():
                    theirs = model.layers[2].output.save()
        return gen.generated_ids, mine.value, theirs.value

    ids, written, victim = run(True)
    clean_ids, _, clean = run(False)
    assert len(written) == 4 and all((w == 3.0).all() for w in written)
    assert torch.equal(ids[1], clean_ids[1])
    assert len(victim) == len(clean) == 4
    for a, b in zip(victim, clean):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _info_and_runner(local_lab, name):
    backend = local_lab.backend
    info = local_lab.model(name).info
    return info, lambda blob: backend.run_values(name, blob)


@pytest.mark.parametrize("name", TINY_MODELS)
@property_settings(12)
@given(data=st.data())
def test_merged_users_get_their_own_results_tiny(local_lab, name, data):
    info, run = _info_and_runner(local_lab, name)
    check_merged_runs(run, data.draw(users(info)))


@pytest.mark.slow
@property_settings(3)
@given(data=st.data())
def test_merged_users_get_their_own_results_default_model(local_lab, data):
    info, run = _info_and_runner(local_lab, "smollm2-135m")
    check_merged_runs(run, data.draw(users(info, max_actions=3)))
