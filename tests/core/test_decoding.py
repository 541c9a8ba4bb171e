"""The in-process engine decodes as Hugging Face's ``generate`` does: greedy, sampling with
temperature/top-k/top-p and a seed, repetition penalty, end-of-sequence and stop strings
(the Dask engine runs the same cases: tests/cluster/test_cluster_decoding.py)."""

from __future__ import annotations

import pytest

from tpmlab.errors import SchemaError

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
