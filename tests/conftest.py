"""Shared fixtures: the in-process engine and its models, loaded once per test session."""

from __future__ import annotations

import os
import warnings

import pytest

from tpmlab.openmp_wait import prefer_short_spin

# as in a notebook: OpenMP's short spin, read when torch loads (a test module may import torch
# before tpmlab); on a busy machine it keeps the in-process engine's forwards from crawling
prefer_short_spin()
os.environ.setdefault("TPMLAB_HOME", os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                                  ".tpmlab-home"))
warnings.filterwarnings("ignore", module="nnsight")

TINY_MODELS = ["tiny-llama", "tiny-gpt2", "tiny-gpt-neox"]


@pytest.fixture(scope="session")
def local_lab():
    # TPMLAB_TEST_DEVICE=cuda runs the same parity tests on a GPU (float32, to compare exactly).
    import torch

    import tpmlab
    from tpmlab.runtime.backend import LocalBackend

    lab = tpmlab.Lab(LocalBackend(device=os.environ.get("TPMLAB_TEST_DEVICE", "cpu"),
                                  dtype=torch.float32))
    yield lab
    lab.close()


@pytest.fixture(scope="session")
def default_model(local_lab):
    return local_lab.model("smollm2-135m")
