"""A tiny model on the in-process engine for the dashboard tests."""

from __future__ import annotations

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("anywidget", reason="plotly's FigureWidget needs anywidget (the lab extra)")

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="session")
def wlab():
    import tpmlab

    lab = tpmlab.connect("local")
    yield lab
    lab.close()


@pytest.fixture(scope="session")
def tiny(wlab):
    return wlab.model("tiny-llama")
