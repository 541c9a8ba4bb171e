"""Loads hold their own bytes: tensors arrive one at a time, in the load dtype, and a
partial load reads only its own tensors (measured from this process)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tpmlab.models import FolderSource, random_init_source
from tpmlab.models import random_init as random_init_module
from tpmlab.models.digest import weights_digest
from tpmlab.models.materialize import tie_groups
from tpmlab.models.sources import folder_weights_digest
from tpmlab.runtime.load_meter import LoadMeter

MiB = 2**20
#: what an in-process load may hold beyond its weights here (rotary buffers, Python objects)
SLACK = 32 * MiB
SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=2048)  # ~67M parameters, 134 MB in bfloat16


def real_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_meta:
            seen[id(t)] = t
    return sum(t.numel() * t.element_size() for t in seen.values())


def peak_growth(meter: LoadMeter) -> int:
    return meter.figures["load_host_peak"] - meter.figures["rss_before"]


def test_large_random_init_draws_each_tensor_in_the_load_dtype(monkeypatch):
    # the path llama-3-8b-shape takes on a GPU, on a model small enough for this CPU
    monkeypatch.setattr(random_init_module, "DIGEST_BY_WEIGHTS_MAX", 0)
    source = random_init_source("llama", seed=3, **SHAPE)
    assert not source.digest_by_weights
    source.tokenizer()
    with LoadMeter("cpu") as meter:
        loaded = source.load(dtype=torch.bfloat16)
    weights = real_bytes(loaded.model)
    assert weights > 120 * MiB
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    print(f"weights {weights / MiB:.0f} MiB, peak growth {peak_growth(meter) / MiB:.0f} MiB")
    # drawing everything in float32 first and casting after would peak at 3x the weights
    assert peak_growth(meter) <= 1.1 * weights + SLACK


def test_small_random_init_holds_one_float32_tensor_in_flight():
    source = random_init_source("llama", seed=3, **SHAPE)
    assert source.digest_by_weights  # drawn in float32 (the draws its version digests)
    source.tokenizer()
    assert source.version  # digested one tensor at a time; here only the load is measured
    with LoadMeter("cpu") as meter:
        loaded = source.load(dtype=torch.bfloat16)
    weights = real_bytes(loaded.model)
    largest = max(p.numel() for p in loaded.model.parameters()) * 4
    assert peak_growth(meter) <= weights + largest + SLACK


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    """A random-init llama written as two safetensors shards with an index, no tpmlab.json."""
    source = random_init_source("llama", seed=5, **SHAPE)
    model = source.load().model
    canonical = tie_groups(model)
    state = {n: t.contiguous() for n, t in model.state_dict().items() if canonical[n] == n}
    folder = tmp_path_factory.mktemp("sharded")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({n: state[n] for n in part}, str(folder / file), metadata={"format": "pt"})
    weight_map = {n: file for file, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model.config.save_pretrained(str(folder))
    return folder, weights_digest(sorted(state.items())), state


def test_streamed_folder_digest_equals_the_tensor_digest(sharded_folder):
    folder, expected, _ = sharded_folder
    files = sorted(folder.glob("*.safetensors"))
    with LoadMeter("cpu") as meter:
        assert folder_weights_digest(files) == expected
    total = sum(f.stat().st_size for f in files)
    assert meter.figures["read_bytes"] >= total * 0.99  # it read every byte ...
    assert peak_growth(meter) <= 80 * MiB  # ... through one staging buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_folder_load_reads_only_its_own_tensors(sharded_folder, dtype):
    folder, version, state = sharded_folder
    source = FolderSource(folder)
    source.assume_version(version)  # as a stage does: the deploying client digested it
    with pytest.warns(UserWarning, match="no tokenizer"):
        source.tokenizer()

    def keys(name: str) -> bool:
        return name.startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head"))

    with LoadMeter("cpu") as meter:
        loaded = source.load(dtype=dtype, keys=keys)
    own_stored = sum(t.numel() * t.element_size() for n, t in state.items() if keys(n))
    held = real_bytes(loaded.model)
    whole = sum(t.numel() * t.element_size() for t in state.values())
    assert own_stored < 0.6 * whole
    read = meter.figures["read_bytes"]
    print(f"{dtype}: stored {own_stored / MiB:.0f} MiB of {whole / MiB:.0f}, read "
          f"{read / MiB:.0f} MiB, held {held / MiB:.0f} MiB, peak growth "
          f"{peak_growth(meter) / MiB:.0f} MiB")
    assert 0.99 * own_stored <= read <= 1.2 * own_stored
    assert peak_growth(meter) <= held + SLACK + 64 * MiB  # + the conversion's staging buffer
    reference = state["model.layers.3.mlp.up_proj.weight"].to(dtype)
    assert torch.equal(loaded.model.model.layers[3].mlp.up_proj.weight, reference)
    assert loaded.model.model.layers[0].mlp.up_proj.weight.is_meta
