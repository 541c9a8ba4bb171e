"""A model's dtype by name or as a torch dtype, in process and on a cluster; anything else
is refused with the choices named, before any weights load."""

from __future__ import annotations

import pytest
import torch

import tpmlab
from tpmlab.models.sources import MODEL_DTYPES, model_dtype


@pytest.mark.parametrize("value,expected", [
    ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), (" float32 ", torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64),
])
def test_names_and_dtypes(value, expected):
    assert model_dtype(value) is expected


@pytest.mark.parametrize("value", ["int8", "bf16x", torch.int8, torch.bool, "", "Float32"])
def test_anything_else_names_the_choices(value):
    with pytest.raises(TypeError, match="cannot be loaded in dtype") as e:
        model_dtype(value)
    assert all(name in str(e.value) for name in MODEL_DTYPES)


def test_in_process_by_name():
    lab = tpmlab.connect("local", device="cpu", dtype="bfloat16")
    try:
        model = lab.model("tiny-llama")
        assert model.info.dtype == "bfloat16"
        with model.trace("Hello"):
            out = model.output.logits.save()
        assert out.value.dtype == torch.bfloat16
        with pytest.raises(TypeError, match="int8"):
            lab.model("tiny-gpt2", dtype="int8")
        assert "tiny-gpt2" not in lab.backend.hosts  # nothing loaded
    finally:
        lab.close()
    with pytest.raises(TypeError, match="nope"):
        tpmlab.connect("local", device="cpu", dtype="nope")
