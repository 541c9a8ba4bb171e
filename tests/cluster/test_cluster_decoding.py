"""On 1, 2 and 3 Dask stages, generation decodes as Hugging Face's ``generate`` does, case by
case (the in-process engine runs the same cases: tests/core/test_decoding.py). A decode
step's message carries only that step's increment (each stage extends its own attention
mask and position ids, the last stage its own copy of the sequences for a repetition
penalty): 3 stages check it on a middle stage too."""

from __future__ import annotations

import pytest

from ..decoding_cases import CASES, check_decoding
from .conftest import deploy

MODEL = "tiny-llama"


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}stages")
def staged(request, lab, ref_lab):
    model = deploy(lab, MODEL, request.param)
    assert model.info.n_stages == request.param
    ref_lab.model(MODEL)
    yield model, ref_lab.backend.host(MODEL).model
    lab.undeploy(MODEL)


@pytest.mark.parametrize("case", list(CASES))
def test_decoding_matches_hf_generate(staged, case):
    model, hf = staged
    check_decoding(model, hf, case)
