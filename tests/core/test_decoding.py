"""The in-process engine decodes as Hugging Face's ``generate`` does: greedy, sampling with
temperature/top-k/top-p and a seed, repetition penalty, end-of-sequence and stop strings
(the Dask engine runs the same cases: tests/cluster/test_cluster_decoding.py)."""

from __future__ import annotations

import pytest
import torch

from tpmlab.errors import SchemaError
from tpmlab.ir.plan import GenerateOptions
from tpmlab.runtime.decoding import Decoding, next_step_inputs, next_tokens

from ..decoding_cases import CASES, check_decoding
from .helpers import hf_model


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt-neox"])
def test_decoding_matches_hf_generate(local_lab, name, case):
    model = local_lab.model(name)
    check_decoding(model, hf_model(model), case)


def test_a_seed_repeats_a_sample(local_lab):
    model = local_lab.model("tiny-llama")
    runs = []
    for seed in (5, 5, 6):
        with model.generate("Hello", max_new_tokens=6, do_sample=True, seed=seed) as gen:
            pass
        runs.append(gen.output_ids[0].tolist())
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("options, message", [
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 9}, "at most 8 non-empty strings"),
    ({"stop": ["x" * 33]}, "at most 32 characters"),
    ({"eos_token_id": [10**9]}, "eos_token_id"),
])
def test_bad_decoding_options_are_refused(local_lab, options, message):
    model = local_lab.model("tiny-llama")
    with pytest.raises(SchemaError, match=message):
        with model.generate("Hello", max_new_tokens=2, **options):
            pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_tokens_skip_the_float32_copy_with_the_same_result(dtype):
    """Greedy decoding without a repetition penalty takes the argmax of the logits as they
    are: float32 holds these dtypes exactly, so it is the float32 copy's argmax, ties (the
    first index) and all."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g).to(dtype)
    logits[1, 7] = logits[1, 200] = logits[1].max() + 1  # a tie: the first index wins
    logits[2] = 0.0  # all equal
    got = next_tokens(GenerateOptions(max_new_tokens=1), None, logits, 3)
    want = logits.to(torch.float32, copy=True).argmax(-1)
    assert torch.equal(got, want) and got[1] == 7 and got[2] == 0


def test_float64_logits_still_become_float32_scores():
    """float64 logits are rounded to float32 scores as before (two values may round to one,
    and the first index of the float32 maximum is the token)."""
    logits = torch.tensor([[1.0, 1.0 + 1e-12, 0.5]], dtype=torch.float64)
    assert next_tokens(GenerateOptions(max_new_tokens=1), None, logits, 0).tolist() == [0]


def test_next_step_inputs_extend_mask_and_positions_by_one():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    positions = torch.tensor([[0, 0, 1], [0, 1, 2]])
    m, p = next_step_inputs(mask, positions)
    assert m.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and m.dtype == mask.dtype
    assert p.tolist() == [[2], [3]]
    decoding = Decoding(GenerateOptions(max_new_tokens=3), torch.ones(2, 3, dtype=torch.long),
                        mask, positions, eos=[], pad_id=0)
    decoding.advance(torch.tensor([5, 6]))
    feed = next(iter(decoding))
    assert torch.equal(feed.attention_mask, m) and torch.equal(feed.position_ids, p)
