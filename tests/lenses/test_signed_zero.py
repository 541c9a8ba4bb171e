"""Values that are zero up to rounding are shown the same on every run: no "-0.0" from a
clamp at zero (KL, entropy), a table, or a formatted number, whatever the thread count."""

from __future__ import annotations

import math

import pytest
import torch

import tpmlab.lenses
from tpmlab.lenses.common import nonnegative
from tpmlab.lenses.result import plain, shown

PROMPT = "The Eiffel Tower is located in the city of"


def _negative_zero_free(t: torch.Tensor) -> bool:
    return not bool((torch.signbit(t) & (t == 0)).any())


def test_nonnegative_clamps_noise_and_drops_the_sign_of_zero():
    x = torch.tensor([-0.0, -3e-8, 0.0, 2.5, -1.0])
    assert torch.signbit(x.clamp(min=0.0))[0]  # why the "+ 0.0": clamp keeps -0.0
    y = nonnegative(x)
    assert y.tolist() == [0.0, 0.0, 0.0, 2.5, 0.0]
    assert not torch.signbit(y).any()


def test_nonnegative_inside_a_trace(lab):
    """The clamp is recorded in the plan and runs where the values are."""
    model = lab.model("tiny-llama")
    with model.trace(PROMPT):
        minus_zero = (-(model.layers[0].output.abs() * 0.0)).save()
        clean = nonnegative(-(model.layers[0].output.abs() * 0.0)).save()
    assert torch.signbit(minus_zero.value).all()  # the path under test: every value is -0.0
    assert (clean.value == 0).all() and not torch.signbit(clean.value).any()


@pytest.mark.parametrize("value,spec,text", [
    (-0.0, ".4f", "0.0000"), (-1e-5, ".4f", "0.0000"), (-0.0, ".2f", "0.00"),
    (-1e-5, "+.4f", "+0.0000"), (-0.004, ".0%", "0%"), (-0.0, ".3e", "0.000e+00"),
    (-1e-5, ".1e", "-1.0e-05"), (-0.5, ".4f", "-0.5000"), (2.0, ".3f", "2.000"),
    (float("-inf"), ".4f", "-inf"), (float("nan"), ".4f", "nan"),
])
def test_shown_never_prints_a_negative_zero(value, spec, text):
    assert shown(value, spec) == text
    assert shown(torch.tensor(value), spec) == text


def test_plain_table_values_have_no_negative_zero():
    v = plain(torch.tensor(-0.0))
    assert v == 0.0 and math.copysign(1.0, v) == 1.0
    assert plain(torch.tensor(3)) == 3 and isinstance(plain(torch.tensor(3)), int)
    assert plain(torch.tensor([1.0, 2.0])) == [1.0, 2.0]


def test_logit_lens_kl_and_entropy_are_nonnegative_without_negative_zero(lab):
    model = lab.model("tiny-llama")
    res = tpmlab.lenses.get("logit").run(model, PROMPT, top_k=3)
    for key in ("kl", "entropy"):
        assert (res.data[key] >= 0).all() and _negative_zero_free(res.data[key])
    last = res.table()[-1]
    assert repr(round(last["kl"], 2)) == "0.0"  # the final layer against itself
