"""Fixtures for the models tests.

Every test runs with ``TPMLAB_HOME`` in a temporary folder shared by the
session (the default tokenizer is converted there once), except the default
model, which uses the real cache (``$TPMLAB_HOME`` as the test script sets it)
so its ~20 s conversion happens once per machine, not once per run.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest

SHARED_HOME = os.environ.get("TPMLAB_HOME")


@pytest.fixture(scope="session")
def session_home(tmp_path_factory):
    return tmp_path_factory.mktemp("tpmlab-home")


@pytest.fixture(autouse=True)
def _tmp_home(session_home, monkeypatch):
    monkeypatch.setenv("TPMLAB_HOME", str(session_home))


@pytest.fixture(scope="session")
def default_model():
    """The default model, fully loaded once per session from the shared cache."""
    from tpmlab.models import resolve

    env = {"TPMLAB_HOME": SHARED_HOME} if SHARED_HOME else {}
    with mock.patch.dict(os.environ, env):
        if not SHARED_HOME:
            os.environ.pop("TPMLAB_HOME", None)
        source = resolve("smollm2-135m")
        loaded = source.load()
        source.folder()  # the converted folder, for tests that read it
    return loaded
