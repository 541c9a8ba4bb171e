"""GET /tpmlab/api/lenses: the sidebar's lens menu comes from the lens registry, so every
lens keeping the contract is offered (the zoo's, and one dropped on TPMLAB_LENS_PATH), and
a broken plugin is reported beside the others instead of hiding them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tpmlab.lenses
from tpmlab.lenses import discovery

ZOO = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "lenses").glob("*.py")
             if not p.stem.startswith("_"))

PLUGIN = '''
from tpmlab.lenses import Axis, LensView, Metric

NAME = "third_party"
TITLE = "a third-party lens"
DESCRIPTION = "Installed by dropping one file on TPMLAB_LENS_PATH."
VIEW = LensView(inputs="pair", rows=Axis("layer"), cols=Axis("position"),
                metrics=(Metric("x", "x"),))


def run(model, clean, corrupted, *, progress=None):
    raise NotImplementedError
'''


class TestLensList:
    @pytest.fixture
    def jp_server_config(self):
        return {"ServerApp": {"jpserver_extensions": {"tpmlab.server": True}},
                "TpmlabServer": {"scheduler_address": ""}}

    @pytest.fixture
    def plugin_folder(self, tmp_path, monkeypatch):
        (tmp_path / "third_party.py").write_text(PLUGIN)
        (tmp_path / "half_done.py").write_text("NAME = 'half_done'\n")
        monkeypatch.setenv(discovery.PATH_ENV, str(tmp_path))
        discovery._clear_cache()
        yield tmp_path
        discovery._clear_cache()

    async def test_every_registered_lens_is_listed(self, jp_fetch, tpmlab_state, plugin_folder):
        r = await jp_fetch("tpmlab", "api", "lenses")
        assert r.code == 200
        body = json.loads(r.body)
        listed = {entry["name"]: entry for entry in body["lenses"]}
        assert set(ZOO) | {"third_party"} == set(listed)
        for name in ZOO:
            info = tpmlab.lenses.info(name)
            assert listed[name] == {"name": name, "title": info.title,
                                    "description": info.description, "inputs": info.view.inputs}
        assert listed["third_party"]["inputs"] == "pair"
        assert listed["third_party"]["title"] == "a third-party lens"
        assert "no TITLE" in body["errors"]["half_done"]
