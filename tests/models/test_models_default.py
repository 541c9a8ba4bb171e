"""The embedded default model (SmolLM2-135M-Instruct), loaded once per session."""

import json
import threading
import time

import pytest
import torch

from tpmlab.models import resolve
from tpmlab.models.default import _convert_once
from tpmlab.models.digest import META_FILE

PROMPT = "The Eiffel Tower is located in the city of"
STAGE_LAYERS = range(10)


@pytest.mark.slow
def test_paris(default_model):
    tok, model = default_model.tokenizer, default_model.model
    batch = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        next_id = model(**batch).logits[0, -1].argmax()
    assert tok.decode(next_id) == " Paris"


@pytest.mark.slow
def test_shape_and_version(default_model):
    a = default_model.adapter
    assert (a.family, a.d_model, a.n_layers, a.n_heads, a.n_kv_heads) == ("llama", 576, 30, 9, 3)
    folder = default_model.source.folder()
    assert default_model.version == json.loads((folder / META_FILE).read_text())["version"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert default_model.model.lm_head.weight is default_model.model.model.embed_tokens.weight


@pytest.mark.slow
def test_hub_id_is_an_alias(default_model, monkeypatch):
    home = default_model.source.folder().parent.parent
    monkeypatch.setenv("TPMLAB_HOME", str(home))
    source = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert source.name == "smollm2-135m" and source.version == default_model.version


def stage_keys(name: str) -> bool:
    parts = name.split(".")
    return parts[:2] == ["model", "layers"] and int(parts[2]) in STAGE_LAYERS


@pytest.fixture(scope="module")
def stage(default_model, session_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TPMLAB_HOME", str(default_model.source.folder().parent.parent))
        return resolve("smollm2-135m").load(keys=stage_keys)


@pytest.mark.slow
def test_stage_allocates_only_its_layers(stage):
    model = stage.model
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p.is_meta != stage_keys(name), name
    assert model.model.embed_tokens.weight.is_meta
    assert model.lm_head.weight.is_meta and model.model.norm.weight.is_meta
    real_bytes = sum(p.nbytes for p in model.parameters() if not p.is_meta)
    per_layer = sum(p.nbytes for p in model.model.layers[0].parameters())
    assert real_bytes == len(STAGE_LAYERS) * per_layer


@pytest.mark.slow
def test_stage_layers_match_the_full_model(default_model, stage):
    full = default_model.model
    batch = default_model.tokenizer(PROMPT, return_tensors="pt")
    captured = {}

    def keep(name):
        def hook(module, args, kwargs, out):
            captured[name] = (args, kwargs, out)  # returns None: output unchanged

        return hook

    hooks = [
        full.model.layers[0].register_forward_hook(keep("first"), with_kwargs=True),
        full.model.layers[9].register_forward_hook(keep("last"), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            full(**batch)
    finally:
        for h in hooks:
            h.remove()
    (hidden,), kwargs, _ = captured["first"]
    expected = captured["last"][2]
    expected = expected[0] if isinstance(expected, tuple) else expected

    model = stage.model
    assert torch.equal(model.model.rotary_emb.inv_freq, full.model.rotary_emb.inv_freq)
    positions = torch.arange(hidden.shape[1])[None]
    with torch.no_grad():
        cos_sin = model.model.rotary_emb(hidden, positions)
        h = hidden
        for i in STAGE_LAYERS:
            h = model.model.layers[i](
                h, attention_mask=kwargs.get("attention_mask"), position_embeddings=cos_sin
            )
            h = h[0] if isinstance(h, tuple) else h
    torch.testing.assert_close(h, expected)


@pytest.mark.slow
def test_tied_unembed_alone(default_model):
    home = default_model.source.folder().parent.parent
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TPMLAB_HOME", str(home))
        head = resolve("smollm2-135m").load(keys=lambda n: n == "lm_head.weight").model
    assert head.model.embed_tokens.weight.is_meta
    assert torch.equal(head.lm_head.weight, default_model.model.model.embed_tokens.weight)


def test_conversion_runs_once_under_concurrency(tmp_path):
    final = tmp_path / "models" / "m"
    calls = []

    def write(out):
        calls.append(out)
        time.sleep(0.2)
        (out / "weights.bin").write_bytes(b"x" * 10)

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(_convert_once(final, write)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [final] * 4
    assert (final / "weights.bin").read_bytes() == b"x" * 10
    assert sorted(p.name for p in final.parent.iterdir()) == ["m", "m.lock"]


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    final = tmp_path / "models" / "m"

    def write(out):
        (out / "partial").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _convert_once(final, write)
    assert not final.exists()
    assert [p.name for p in final.parent.iterdir()] == ["m.lock"]
