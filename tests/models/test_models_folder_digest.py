"""Version digests: recorded versions keep their meaning; the v2 scheme is parallel and
depends only on the weights."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from tpmlab.lenses.artifact import ArtifactMismatchError, check_model
from tpmlab.models import digest as digest_mod
from tpmlab.models.digest import (
    META_FILE,
    UnknownVersionSchemeError,
    same_weights,
    scheme_of,
    weights_digest,
)
from tpmlab.models.sources import FolderSource, folder_weights_digest
from tpmlab.store import CHUNK_SIZE, Store

# the digest this fixture folder has had since versions were first recorded: any faster
# way of computing versions must give existing folders the same one
FIXTURE_DIGEST = "sha256:4c52e5c868e3cd36e4f3f87ef0a7f587bb24e957ff69a40b6fef266c73b5b9fd"
# its v2 digest, as first computed: the v2 scheme must not drift either
FIXTURE_V2 = "v2:cd15c9b4642897ed6eae3cb1b4ae93336ddc22a46b3e49f03c8815f920142c4a"


def _fixture(folder) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    first = {"model.embed.weight": torch.randn(37, 8, generator=g),
             "model.layers.0.w": torch.randn(5, 3, generator=g).bfloat16(),
             "model.layers.0.h": torch.randn(4, generator=g).half(),
             "model.scalar": torch.tensor(2.5),
             "model.empty": torch.zeros(0, 3)}
    second = {"model.layers.1.ids": torch.arange(11, dtype=torch.int64),
              "model.layers.1.mask": torch.tensor([True, False, True]),
              "model.layers.1.u8": torch.arange(9, dtype=torch.uint8),
              "model.a.first": torch.randn(3, 2, 2, generator=g, dtype=torch.float64)}
    save_file(first, str(folder / "model-00001-of-00002.safetensors"))
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    return {**first, **second}


def _big(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of several pieces each (a piece is 4 MiB), the last one partial."""
    g = torch.Generator().manual_seed(seed)
    return {"a.big": torch.randn(CHUNK_SIZE // 4 * 2 + 1001, generator=g),
            "b.mid": torch.randn(CHUNK_SIZE // 2 + 3, generator=g).bfloat16(),
            "c.exact": torch.randn(CHUNK_SIZE // 4, generator=g),
            "d.small": torch.randn(7, 5, generator=g)}


def _llama_folder(folder, tensors: dict[str, torch.Tensor], shards: int = 1) -> list:
    names = sorted(tensors)
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    return sorted(folder.glob("*.safetensors"))


def test_a_fixture_folder_keeps_its_recorded_digest(tmp_path):
    tensors = _fixture(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert folder_weights_digest(files, "sha256") == FIXTURE_DIGEST
    assert weights_digest(sorted(tensors.items()), "sha256") == FIXTURE_DIGEST


def test_the_fixture_folder_has_a_fixed_v2_digest(tmp_path):
    tensors = _fixture(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert folder_weights_digest(files) == FIXTURE_V2
    assert weights_digest(sorted(tensors.items())) == FIXTURE_V2


def test_v2_is_what_docs_versions_md_says():
    t = torch.arange(CHUNK_SIZE // 4 + 3, dtype=torch.float32)  # two pieces
    data = t.numpy().tobytes()
    pieces = [hashlib.sha256(data[i:i + CHUNK_SIZE]).hexdigest()
              for i in range(0, len(data), CHUNK_SIZE)]
    content = hashlib.sha256(f"tpmlab.tensor/1 {len(data)}\n{chr(10).join(pieces)}".encode())
    top = hashlib.sha256(b"tpmlab.version/2\n")
    top.update(f"w\0float32\0[{t.numel()}]\0{content.hexdigest()}\n".encode())
    assert weights_digest([("w", t)]) == "v2:" + top.hexdigest()


def test_v2_depends_on_the_weights_only(tmp_path):
    tensors = _big()
    one = tmp_path / "one"
    three = tmp_path / "three"
    one.mkdir(), three.mkdir()
    expected = weights_digest(sorted(tensors.items()), threads=1)
    assert expected.startswith("v2:") and scheme_of(expected) == "v2"
    # however many threads hash the pieces, and however the bytes were read: from
    # memory, or from one file or three shards (other offsets, other reads)
    for threads in (2, 3, 8):
        assert weights_digest(sorted(tensors.items()), threads=threads) == expected
    for folder, shards in ((one, 1), (three, 3)):
        files = _llama_folder(folder, tensors, shards)
        for threads in (1, 2, 5):
            assert folder_weights_digest(files, threads=threads) == expected
    # a tensor's content digest is the weight store's: a stored version gives the same
    # records without reading a byte
    store = Store(tmp_path / "store")
    ref = store.commit(tensors, config={"model_type": "llama"}, message="big")
    records = store.manifest(ref)["tensors"]
    assert digest_mod.tree_version((n, records[n]["dtype"], records[n]["shape"],
                                    records[n]["content"]) for n in sorted(records)) == expected


@pytest.mark.parametrize("where", [0, CHUNK_SIZE - 1, CHUNK_SIZE, 2 * CHUNK_SIZE + 5, -1])
def test_any_changed_byte_changes_v2(tmp_path, where):
    tensors = _big()
    base = weights_digest(sorted(tensors.items()))
    flat = tensors["a.big"].view(torch.uint8)
    flat[where] ^= 1
    assert weights_digest(sorted(tensors.items())) != base
    files = _llama_folder(tmp_path, tensors)
    assert folder_weights_digest(files, threads=2) != base


def test_unknown_schemes_are_refused():
    with pytest.raises(UnknownVersionSchemeError, match="upgrade tpmlab"):
        scheme_of("v9:abc")
    with pytest.raises(UnknownVersionSchemeError):
        weights_digest([("a", torch.ones(2))], "md5")


@pytest.fixture
def tiny_folder(tmp_path):
    """A random-init tiny llama saved as a folder, without tpmlab.json."""
    from tpmlab.models.materialize import tie_groups
    from tpmlab.models.random_init import random_init_source

    model = random_init_source("llama", seed=3, num_hidden_layers=1).load().model
    canonical = tie_groups(model)
    state = {n: t.contiguous() for n, t in model.state_dict().items() if canonical[n] == n}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(tmp_path))
    return tmp_path, state


def test_a_recorded_legacy_version_is_kept_and_new_folders_get_v2(tiny_folder):
    folder, state = tiny_folder
    legacy = weights_digest(sorted(state.items()), "sha256")
    v2 = weights_digest(sorted(state.items()))
    assert FolderSource(folder).version == v2  # a new deploy: the current scheme
    (folder / META_FILE).write_text(json.dumps({"version": legacy}))
    recorded = FolderSource(folder)
    assert recorded.version == legacy  # a recorded version keeps its value and scheme
    assert recorded.version_in("v2") == v2 and recorded.version_in("sha256") == legacy


def test_legacy_versions_are_verified_with_the_legacy_scheme(tiny_folder, monkeypatch):
    folder, state = tiny_folder
    legacy = weights_digest(sorted(state.items()), "sha256")
    source = FolderSource(folder)
    assert source.version.startswith("v2:")
    assert same_weights(source.version, source)
    assert same_weights(legacy, source)  # read once in the old scheme ...
    other = dict(state)
    other["model.norm.weight"] = other["model.norm.weight"] + 1
    assert not same_weights(weights_digest(sorted(other.items()), "sha256"), source)
    assert not same_weights("v2:" + "0" * 64, source)
    assert not same_weights("v9:whatever", source)

    def no_reads(*args, **kwargs):
        raise AssertionError("the weights were read again")

    monkeypatch.setattr("tpmlab.models.sources.folder_weights_digest", no_reads)
    again = FolderSource(folder)  # ... then cached under the key the old scheme used
    assert again.version.startswith("v2:") and same_weights(legacy, again)


def test_the_default_source_verifies_other_schemes_from_its_tensors(tiny_folder):
    from tpmlab.models.random_init import random_init_source

    source = random_init_source("llama", seed=3, num_hidden_layers=1)
    _, state = tiny_folder
    assert source.version == weights_digest(sorted(state.items()))
    assert same_weights(weights_digest(sorted(state.items()), "sha256"), source)
    assert source.version_in("sha256") == weights_digest(sorted(state.items()), "sha256")


def test_a_lens_artifact_of_a_legacy_version_fits_the_same_weights(tiny_folder):
    folder, state = tiny_folder
    source = FolderSource(folder)

    class Model:  # what a lens sees of a deployed model
        name, version, adapter = "tiny", source.version, source.adapter

    Model.source = source
    legacy = weights_digest(sorted(state.items()), "sha256")
    check_model({"model": "tiny", "model_version": legacy}, Model)
    check_model({"model": "tiny", "model_version": source.version}, Model)
    with pytest.raises(ArtifactMismatchError, match="trained on"):
        check_model({"model": "tiny", "model_version": "sha256:" + "0" * 64}, Model)


def test_a_store_version_gives_its_v2_digest_from_the_manifest(tmp_path, tiny_folder):
    from tpmlab.models.store_source import source_for

    _, state = tiny_folder
    source = FolderSource(tiny_folder[0])
    store = Store(tmp_path / "store")
    ref = store.commit(state, config=source.config.to_dict(), message="tiny")
    stored = source_for("tiny", ref, store=store)
    assert stored.version == f"sha256:{ref}"  # store versions keep their form
    store.stats.reset()
    assert stored.version_in("v2") == source.version  # the same weights ...
    assert store.stats.chunks_read == 0  # ... and no chunk read
    assert same_weights(source.version, stored)
