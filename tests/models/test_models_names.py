import sys
import types
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from tpmlab.models import (
    FolderSource,
    ModelNotFoundError,
    available_models,
    random_init_source,
    resolve,
    tpmlab_home,
)
from tpmlab.models.digest import weights_digest


def test_available_models():
    names = available_models()
    for name in ["smollm2-135m", "tiny-llama", "tiny-gpt2", "tiny-gpt-neox", "llama-3-8b-shape"]:
        assert name in names


def test_unknown_name_lists_available_models():
    with pytest.raises(ModelNotFoundError) as err:
        resolve("no-such-model")
    assert isinstance(err.value, LookupError) and isinstance(err.value, KeyError)
    assert "'no-such-model'" in str(err.value) and "tiny-llama" in str(err.value)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve(str(tmp_path))


def test_tpmlab_home_follows_the_environment(tmp_path, monkeypatch):
    target = tmp_path / "a" / "home"
    monkeypatch.setenv("TPMLAB_HOME", str(target))
    assert tpmlab_home() == target and target.is_dir()


@pytest.fixture
def saved_folder(tmp_path):
    """A tiny random model saved by Hugging Face, with the default tokenizer."""
    source = random_init_source("llama", seed=5)
    loaded = source.load()
    folder = tmp_path / "hf-model"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder, loaded


def test_local_folder_round_trip(saved_folder):
    folder, original = saved_folder
    source = resolve(str(folder))
    assert isinstance(source, FolderSource) and source.adapter.family == "llama"
    loaded = source.load()
    batch = loaded.tokenizer(["a b c", "hello there"], return_tensors="pt", padding=True)
    assert loaded.tokenizer.padding_side == "left"
    with torch.no_grad():
        ours = loaded.model(**batch).logits
        theirs = AutoModelForCausalLM.from_pretrained(folder).eval()(**batch).logits
        before = original.model(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours, before, rtol=0, atol=0)
    # same bytes, same version, whether drawn at random or read from a folder
    assert source.version == original.version
    assert resolve(str(folder)).version == source.version


def test_local_folder_partial_load_reads_only_its_keys(saved_folder):
    folder, _ = saved_folder
    model = resolve(str(folder)).load(keys=lambda n: n.startswith("model.layers.0.")).model
    assert not model.model.layers[0].self_attn.q_proj.weight.is_meta
    assert model.model.layers[1].self_attn.q_proj.weight.is_meta
    assert model.lm_head.weight.is_meta


def test_folder_without_tokenizer_uses_the_default_one(saved_folder):
    folder, _ = saved_folder
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / f).unlink(missing_ok=True)
    with pytest.warns(UserWarning, match="no tokenizer files"):
        tok = resolve(str(folder)).tokenizer()
    assert tok.pad_token is not None and tok.padding_side == "left"


def test_store_reference_is_delegated(monkeypatch):
    calls = []
    fake = types.ModuleType("tpmlab.models.store_source")
    fake.source_for = lambda name, ref: calls.append((name, ref)) or "SOURCE"
    monkeypatch.setitem(sys.modules, "tpmlab.models.store_source", fake)
    assert resolve("my-model@v2") == "SOURCE"
    assert calls == [("my-model", "v2")]


def test_store_reference_without_store(monkeypatch):
    monkeypatch.setitem(sys.modules, "tpmlab.store", None)  # import fails
    monkeypatch.delitem(sys.modules, "tpmlab.models.store_source", raising=False)
    with pytest.raises(ModelNotFoundError, match="tpmlab.store is unavailable"):
        resolve("my-model@v2")


@pytest.mark.parametrize("scheme", ["v2", "sha256"])
def test_weights_digest_covers_name_dtype_shape_and_bytes(scheme):
    t = torch.arange(6, dtype=torch.float32)
    base = weights_digest([("a", t)], scheme)
    assert weights_digest([("a", t.clone())], scheme) == base
    assert weights_digest([("b", t)], scheme) != base
    assert weights_digest([("a", t.double())], scheme) != base
    assert weights_digest([("a", t.reshape(2, 3))], scheme) != base
    assert weights_digest([("a", t + 1)], scheme) != base
    assert weights_digest([("a", t.bfloat16())], scheme).startswith(f"{scheme}:")
    with pytest.raises(ValueError, match="sorted"):
        weights_digest([("b", t), ("a", t)], scheme)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights_digest([("s", torch.tensor(1.0))], scheme)  # 0-d tensors too
