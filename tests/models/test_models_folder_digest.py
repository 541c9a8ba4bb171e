"""A folder's version digest stays what it was when versions were first recorded."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from tpmlab.models.digest import weights_digest
from tpmlab.models.sources import folder_weights_digest

# the digest this fixture folder has had since versions were first recorded: any faster
# way of computing versions must give existing folders the same one
FIXTURE_DIGEST = "sha256:4c52e5c868e3cd36e4f3f87ef0a7f587bb24e957ff69a40b6fef266c73b5b9fd"


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


def test_a_fixture_folder_keeps_its_recorded_digest(tmp_path):
    tensors = _fixture(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert folder_weights_digest(files) == FIXTURE_DIGEST
    assert weights_digest(sorted(tensors.items())) == FIXTURE_DIGEST
