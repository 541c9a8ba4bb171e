"""Residual-stream geometry: norms, relative updates and cosines against plain Hugging Face
forward hooks on the same weights, on the in-process engine and on Dask stages; and the
lens reaches the registry, the dashboard and the API reference as one file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import tpmlab.lenses
from tpmlab.lenses import discovery
from tpmlab.lenses.contract import LensInputError

from .conftest import hf_model

REPO = Path(__file__).resolve().parents[2]
IDS = torch.tensor([1, 523, 8821, 77, 3051, 919, 42])


@pytest.fixture(scope="module")
def residual():
    return tpmlab.lenses.get("residual")


def _hf_inputs_outputs(hf, adapter, ids):
    """Each decoder layer's input and output residual ``[P, d]`` from hooks."""
    ins, outs, hooks = {}, {}, []
    for i in range(adapter.n_layers):
        layer = hf.get_submodule(f"{adapter.layers}.{i}")
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: ins.__setitem__(
                i, (args[0] if args else kwargs["hidden_states"])[0].detach().clone()),
            with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            lambda m, args, out, i=i: outs.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out)[0].detach().clone())))
    try:
        with torch.no_grad():
            hf(input_ids=ids[None])
    finally:
        for h in hooks:
            h.remove()
    return ins, outs


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_matches_plain_hf(engine, lab, residual, name):
    model = engine.model(name)
    a = model.adapter
    res = residual.run(model, IDS)
    ins, outs = _hf_inputs_outputs(hf_model(lab, name), a, IDS)
    x = torch.stack([ins[i] for i in range(a.n_layers)])    # [L, P, d]
    y = torch.stack([outs[i] for i in range(a.n_layers)])   # [L, P, d]
    final = y[-1]
    d = res.data
    assert res.rows == ["input"] + [str(i) for i in range(a.n_layers)]
    assert d["norm"].shape == (a.n_layers + 1, len(IDS))
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d["norm"][1:], y.norm(dim=-1), **close)
    torch.testing.assert_close(d["norm"][0], x[0].norm(dim=-1), **close)
    torch.testing.assert_close(d["update"][1:], (y - x).norm(dim=-1) / x.norm(dim=-1), **close)
    torch.testing.assert_close(d["cos_prev"][1:], F.cosine_similarity(y, x, dim=-1), **close)
    torch.testing.assert_close(d["cos_final"][1:], F.cosine_similarity(y, final, dim=-1), **close)
    torch.testing.assert_close(d["cos_final"][0], F.cosine_similarity(x[0], final, dim=-1), **close)
    # the residual stream is one stream: what enters layer l+1 is what layer l wrote
    torch.testing.assert_close(x[1:], y[:-1])
    assert d["update"][0].isnan().all() and d["cos_prev"][0].isnan().all()  # nothing before
    torch.testing.assert_close(d["cos_final"][-1], torch.ones(len(IDS)), rtol=0, atol=1e-5)
    assert all(v.numel() <= (a.n_layers + 1) * len(IDS) for v in d.values())  # only [R, P] came back


def test_grid_table_and_plot(lab, residual):
    model = lab.model("tiny-llama")
    res = residual.run(model, "The Eiffel Tower is located in the city of", layers=[1, 3],
                       include_input=False)
    assert res.rows == ["1", "3"] and res.shape == (2, 10)
    torch.testing.assert_close(res.metric("update"), res.data["update"])
    fig = res.plot("cos_final", selected=(0, 2))
    assert fig.data[0].type == "heatmap" and fig.data[0].zmin == -1 and fig.data[0].zmax == 1
    assert fig.layout.title.text.startswith("residual stream geometry")
    cell = res.cell(1, 2)
    assert cell.title == "layer 3, position 2" and cell.facts["relative update"] == \
        f"{res.data['update'][1, 2]:.4f}"
    assert [row[0] for row in cell.tables[0].rows] == ["1", "3"] or \
        [row[0] for row in cell.tables[0].rows] == ["3", "1"]
    rows = res.table()
    assert len(rows) == 20 and {"layer", "position", "norm", "update", "cos_prev", "cos_final"} <= set(rows[0])
    with pytest.raises(LensInputError, match="unknown metric 'nope'"):
        res.plot("nope")


def _build_api():
    spec = importlib.util.spec_from_file_location("build_api", REPO / "docs" / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_lens_is_one_file(tmp_path, monkeypatch, lab):
    """A copy of this lens under a new name, dropped into a folder on TPMLAB_LENS_PATH with
    nothing else, is in the registry, gets its API page and opens in the dashboard."""
    folder = tmp_path / "zoo"
    folder.mkdir()
    source = (REPO / "lenses" / "residual.py").read_text()
    (folder / "geometry.py").write_text(source.replace('NAME = "residual"', 'NAME = "geometry"'))
    monkeypatch.setenv(discovery.PATH_ENV, str(folder))
    discovery._clear_cache()
    try:
        assert "geometry" in tpmlab.lenses.available()
        assert tpmlab.lenses.info("geometry").title == "residual stream geometry"
        pages = _build_api().build(zoo=folder)
        assert "lens-geometry.md" in pages and "`geometry`" in pages["index.md"]
        assert "cos(y_F" in pages["lens-geometry.md"] or "cos_final" in pages["lens-geometry.md"]
        pytest.importorskip("ipywidgets")
        pytest.importorskip("anywidget")
        from tpmlab.widgets import dashboard

        model = lab.model("tiny-llama")
        dash = dashboard(model, "geometry", prompt="one two three")
        torch.testing.assert_close(torch.tensor(dash.figure_widget.data[0].z[1:], dtype=torch.float64),
                                   dash.result.data["update"][1:].double())
        assert dash.result.lens == "geometry" and dash.title == "residual stream geometry"
    finally:
        discovery._clear_cache()


def test_the_zoo_lens_is_everywhere():
    """lenses/residual.py and its test are all that was added for this lens: the registry,
    the sidebar's list and the API reference have it from the module alone."""
    from tpmlab.server.handlers import lens_list

    assert "residual" in tpmlab.lenses.available()
    assert "residual" in [entry["name"] for entry in lens_list()["lenses"]]
    pages = _build_api().build()
    assert "lens-residual.md" in pages and "(lens-residual.md)" in pages["index.md"]
