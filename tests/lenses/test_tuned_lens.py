"""Tuned lens: training lowers KL(final || lens) below the logit lens's; artifacts round-trip
and refuse other model versions; the shipped default-model lens beats the logit lens."""

from __future__ import annotations

import pytest
import torch

import tpmlab.lenses
from tpmlab.lenses.artifact import ArtifactMismatchError

HELD_OUT = ["The Eiffel Tower is located in the city of", "Water boils at a temperature of",
            "The first president of the United States was", "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def tuned():
    return tpmlab.lenses.get("tuned")


@pytest.fixture(scope="module")
def tiny_lens(lab, tuned):
    model = lab.model("tiny-llama")
    data = tuned.collect(model, prompts=tuned.SEED_PROMPTS[:8], new_tokens=24, progress=False)
    return model, tuned.train(model, data=data, rank=8, steps=60, batch_tokens=64, lr=1e-2,
                              progress=False)


def test_training_lowers_kl(tiny_lens, tuned):
    model, lens = tiny_lens
    t = lens.meta["training"]
    before, after = torch.tensor(t["held_out_kl_before"]), torch.tensor(t["held_out_kl_after"])
    assert lens.rows == ["input", "0", "1", "2"] and (after < before).all()
    cmp = tuned.compare(model, HELD_OUT, lens)
    assert cmp["rows"][-1] == "3"
    torch.testing.assert_close(cmp["tuned_kl"][-1], cmp["logit_kl"][-1])  # last row: identity
    assert (cmp["tuned_kl"][1:3] < cmp["logit_kl"][1:3]).all()


def test_engine_matches_client_translation(tiny_lens, tuned):
    model, lens = tiny_lens
    res = tuned.run(model, HELD_OUT[0], tuned_lens=lens, keep_logits=True, top_k=3)
    head = tuned.Head(model)
    with model.trace(HELD_OUT[0]):
        h = model.layers[1].output[0].save()
    ref = head.logits(head.norm(lens.translate(h.value, lens.rows.index("1"))))
    torch.testing.assert_close(res.data["logits"][2], ref, rtol=1e-4, atol=1e-4)
    assert res.lens == "tuned" and res.plot().data[0].type == "heatmap"


def test_artifact_round_trip_and_version_check(tiny_lens, tuned, lab, tmp_path):
    model, lens = tiny_lens
    path = lens.save(tmp_path / "lens.safetensors")
    loaded = tuned.load(model, path)
    assert loaded.rows == lens.rows and torch.equal(loaded.up, lens.up)
    assert loaded.meta["training"]["steps"] == lens.meta["training"]["steps"]
    other = lab.model("tiny-gpt2")
    with pytest.raises(ArtifactMismatchError, match="only fits the weights it was trained on"):
        tuned.load(other, path)
    with pytest.raises(ArtifactMismatchError):
        tuned.run(other, "hello", tuned_lens=lens)


def test_cache_in_tpmlab_home(tiny_lens, tuned, monkeypatch, tmp_path):
    model, lens = tiny_lens
    monkeypatch.setenv("TPMLAB_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train_if_missing"):
        tuned.load(model)
    lens.save(tuned.cache_path(model))
    assert str(tuned.cache_path(model)).startswith(str(tmp_path))
    assert tuned.load(model).rows == lens.rows


def test_shipped_default_lens_beats_logit_lens(lab, tuned):
    model = lab.model("smollm2-135m")
    if not tuned.shipped_path(model).is_file():
        pytest.skip(f"no shipped tuned lens at {tuned.shipped_path(model)}")
    lens = tuned.TunedLens.load(tuned.shipped_path(model), model)
    cmp = tuned.compare(model, HELD_OUT, lens)
    middle = slice(8, 24)
    assert (cmp["tuned_kl"][middle] < cmp["logit_kl"][middle]).all()
    assert cmp["tuned_kl"][middle].mean() < 0.7 * cmp["logit_kl"][middle].mean()
