"""The pieces lenses share, each kept once: the translator formula (on tensors and inside a
trace) and the answer token."""

from __future__ import annotations

import pytest
import torch

from tpmlab.lenses.common import answer_token, translate
from tpmlab.lenses.contract import LensInputError


def _translators(rows: tuple[int, ...], d: int = 8, rank: int = 3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(*rows, d, rank, generator=g), torch.randn(*rows, d, rank, generator=g),
            torch.randn(*rows, d, generator=g))


def test_translate_is_the_formula_per_row():
    """T_r(h) = h + U_r (D_r^T h) + b_r, row by row, for stacked rows of any rank."""
    down, up, bias = _translators((2, 3))
    h = torch.randn(2, 3, 5, 8)  # [L, H, pos, d]: the attention lens's per-head layout
    out = translate(h, down, up, bias)
    for i in range(2):
        for j in range(3):
            for p in range(5):
                v = h[i, j, p]
                expected = v + up[i, j] @ (down[i, j].T @ v) + bias[i, j]
                torch.testing.assert_close(out[i, j, p], expected, rtol=1e-5, atol=1e-5)
    one = translate(h[0, 0, 0], down[0, 0], up[0, 0], bias[0, 0])  # one translator, one vector
    torch.testing.assert_close(one, out[0, 0, 0])
    identity = translate(h, down, torch.zeros_like(up), torch.zeros_like(bias))
    assert torch.equal(identity, h)


def test_translate_inside_a_trace_runs_on_the_engine(lab):
    model = lab.model("tiny-llama")
    d = model.adapter.d_model
    down, up, bias = _translators((2,), d=d)
    with model.trace(torch.tensor([1, 5, 9])):
        h = torch.cat([model.layers[0].output, model.layers[1].output], 0)  # [2, P, d]
        traced = translate(h, down, up, bias).save()
        plain = h.save()
    torch.testing.assert_close(traced.value, translate(plain.value, down, up, bias),
                               rtol=1e-5, atol=1e-5)


def test_answer_token(lab):
    model = lab.model("tiny-llama")
    ids = model.tokenizer(" Paris France", add_special_tokens=False)["input_ids"]
    assert answer_token(model, 123) == 123
    assert answer_token(model, " Paris France") == ids[0]  # an answer is its first token
    if len(ids) > 1:
        with pytest.raises(LensInputError, match=rf"' Paris France' is {len(ids)} tokens"):
            answer_token(model, " Paris France", single=True)
    with pytest.raises(LensInputError, match="has no tokens"):
        answer_token(model, "")
