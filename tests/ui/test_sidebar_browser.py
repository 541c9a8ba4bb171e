"""The sidebar in a real browser: JupyterLab on 127.0.0.1 (token auth, free port) pointed
at a real Dask cluster with a tiny model deployed as two stages; Chromium (the system's,
never a downloaded one) opens the sidebar, sees the workers and the stages, finds every
registered lens in the lens menu (served by the server extension, not written in the
frontend), opens a lens notebook, opens the Dask dashboard (through jupyter-server-proxy)
and undeploys the model. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = pytest.mark.slow


def _labextension_installed() -> bool:
    from jupyter_core.paths import jupyter_path

    return any((Path(p) / "tpmlab" / "package.json").is_file()
               for p in jupyter_path("labextensions"))


def _installed_bundle() -> str:
    """The installed labextension's code (the first tpmlab labextension JupyterLab finds)."""
    from jupyter_core.paths import jupyter_path

    for p in jupyter_path("labextensions"):
        static = Path(p) / "tpmlab" / "static"
        if static.is_dir():
            return "".join(f.read_text() for f in static.glob("lib_index_js*.js"))
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_with_model():
    from distributed import Client, LocalCluster

    from tpmlab.cluster import DaskBackend
    from tpmlab.lab import Lab

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                           host="127.0.0.1", dashboard_address="127.0.0.1:0",
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    lab = Lab(DaskBackend(client=client, timeout=120))
    lab.model("tiny-llama", stages=2)
    yield cluster, lab
    lab.close()
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def jupyterlab(cluster_with_model, tmp_path_factory):
    cluster, _ = cluster_with_model
    port, token = _free_port(), secrets.token_hex(16)
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "TPMLAB_SCHEDULER": cluster.scheduler_address, "HOME": str(home),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_WORKSPACES_DIR": str(home)}
    env.pop("JUPYTERHUB_SERVICE_PREFIX", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={home}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.news_url=None", "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(home / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            req = urllib.request.Request(f"{url}/tpmlab/api/status",
                                         headers={"Authorization": f"token {token}"})
            status = json.loads(urllib.request.urlopen(req, timeout=10).read())
            if status["models"]:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("JupyterLab did not serve /tpmlab/api/status:\n"
                        + (home / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    yield url, token
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_sidebar_shows_cluster_and_stages_and_acts(jupyterlab, cluster_with_model):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    if not _labextension_installed():
        pytest.fail("the tpmlab labextension is not installed: run scripts/setup.sh")
    if "requestAPI('lenses')" not in _installed_bundle():
        pytest.fail("the installed tpmlab labextension predates extension/src (it has no lens "
                    "menu): rebuild it with `cd extension && jlpm build`, then reinstall it "
                    "with `pip install -e .`")
    sync_api = pytest.importorskip("playwright.sync_api")
    import tpmlab.lenses

    lenses, _ = tpmlab.lenses.catalog()
    cluster, lab = cluster_with_model
    url, token = jupyterlab
    ARTIFACTS.mkdir(exist_ok=True)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.goto(f"{url}/lab?token={token}", timeout=60_000)
            try:  # JupyterLab asks once whether to fetch news; answer no
                page.get_by_role("button", name="No", exact=True).click(timeout=10_000)
            except sync_api.TimeoutError:
                pass
            tab = page.locator('.jp-SideBar .lm-TabBar-tab[data-id="tpmlab-sidebar"]')
            tab.wait_for(timeout=60_000)
            tab.click()
            sidebar = page.locator("#tpmlab-sidebar")
            model = sidebar.locator('.jp-tpmlab-model[data-model="tiny-llama"]')
            model.wait_for(timeout=30_000)

            # The live cluster: its address and both workers with their memory.
            address = cluster.scheduler_address
            sidebar.locator(".jp-tpmlab-address", has_text=address.split("://")[1]).wait_for()
            workers = sidebar.locator(".jp-tpmlab-workers tbody tr")
            assert workers.count() == 2
            assert "MiB" in workers.first.inner_text() or "GiB" in workers.first.inner_text()
            # The model's two stages, the layers each holds, all healthy.
            stages = model.locator(".jp-tpmlab-stages tbody tr")
            assert stages.count() == 2
            layers = [stages.nth(k).locator("td").nth(1).inner_text() for k in range(2)]
            assert layers[0].startswith("0") and layers[1] != layers[0], layers
            model.locator(".jp-tpmlab-badge", has_text="ok").wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "sidebar.png"))
            sidebar.screenshot(path=str(ARTIFACTS / "sidebar-panel.png"))

            # The lens menu: every lens of the registry, by title, the logit lens chosen first.
            menu = sidebar.locator(".jp-tpmlab-lens-select")
            page.wait_for_function(
                "n => document.querySelectorAll('.jp-tpmlab-lens-select option').length === n",
                arg=len(lenses), timeout=30_000)
            offered = menu.locator("option")
            assert [offered.nth(k).get_attribute("value") for k in range(offered.count())] == \
                [info.name for info in lenses]
            assert offered.all_inner_texts() == [info.title for info in lenses]
            assert menu.input_value() == "logit"
            # Choosing one and asking for a lens notebook writes a cell opening that lens.
            menu.select_option("residual")
            model.locator(".jp-tpmlab-lens-notebook").click()
            cell = page.locator(".jp-Notebook .jp-Cell .cm-content").first
            cell.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.jp-Notebook .cm-content')]"
                ".some(e => e.textContent.includes('dashboard(model, \"residual\")'))",
                timeout=30_000)
            assert 'lab.model("tiny-llama")' in cell.inner_text()
            page.locator("#tpmlab-sidebar").wait_for()

            # Action 1: the Dask dashboard opens in a new tab, through jupyter-server-proxy
            # (behind JupyterLab's login), not on its loopback port.
            with context.expect_page(timeout=30_000) as popup:
                sidebar.locator(".jp-tpmlab-dashboard-link").click()
            dash = popup.value
            dash.wait_for_load_state("domcontentloaded", timeout=30_000)
            port = cluster.scheduler.services["dashboard"].port
            assert dash.url.startswith(f"{url}/proxy/{port}/status"), dash.url
            assert "Dask" in dash.title(), dash.title()
            dash.close()

            # Action 2: undeploy; the sidebar and the cluster's registry both forget it.
            model.locator(".jp-tpmlab-undeploy").click()
            model.wait_for(state="detached", timeout=30_000)
            sidebar.locator(".jp-tpmlab-empty", has_text="No model deployed").wait_for()
            page.screenshot(path=str(ARTIFACTS / "sidebar-after-undeploy.png"))
        finally:
            browser.close()
    from tpmlab.cluster import deployments

    assert deployments.list_deployments(lab.backend.client) == []
    shutil.rmtree(ARTIFACTS / "unused", ignore_errors=True)
