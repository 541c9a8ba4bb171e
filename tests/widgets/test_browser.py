"""A dashboard in a real JupyterLab, driven from Chromium.

JupyterLab listens on 127.0.0.1 (a free port, a token); the notebook builds a logit-lens
dashboard on a tiny model. Through the page: Run All (the heatmap replaces the "press Run"
placeholder, which leaves nothing behind), change the metric menu (the heatmap's colour bar
title and values change), click a cell (the detail panel fills). Then the
notebook is saved, the kernel shut down and the page reloaded: the static copy of the
figure is what shows, and the file on disk is small and holds no widget state. A
screenshot is kept in ``test-artifacts/``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.timeout(240),
]

CELLS = [
    "import tpmlab, tpmlab.widgets as tw\nmodel = tpmlab.connect('local').model('tiny-llama')",
    "dash = tw.dashboard(model, 'logit', prompt='The Eiffel Tower is located in the city of')\ndash",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    root = tmp_path / "nb"
    root.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "dash.ipynb")
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), "tpmlab-test-" + os.urandom(8).hex()
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.setdefault("TPMLAB_HOME", str(Path(__file__).resolve().parents[2] / ".tpmlab-home"))
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--ServerApp.allow_root=True"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base, token, root / "dash.ipynb"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _plot_texts(plot) -> list[str]:
    return [t for t in plot.locator("svg text").all_text_contents() if t.strip()]


def test_dashboard_in_jupyterlab(jupyterlab):
    sync_api = pytest.importorskip("playwright.sync_api")
    base, token, path = jupyterlab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        try:
            page.goto(f"{base}/lab/tree/{path.name}?token={token}")
            page.locator(".jp-Notebook").wait_for(timeout=60_000)
            page.locator(".jp-mod-idle, #jp-main-statusbar :text('Idle')").first.wait_for(timeout=60_000)
            page.locator(".lm-MenuBar-itemLabel:text-is('Run')").click()
            page.locator(".lm-Menu-itemLabel:text-is('Run All Cells')").click()

            live = page.locator(".tpmlab-dash .js-plotly-plot")
            live.locator(".hm, image, .heatmaplayer").first.wait_for(state="attached", timeout=90_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.tpmlab-dash .js-plotly-plot svg text')]"
                ".some(t => t.textContent.includes('P(final top-1)'))", timeout=30_000)
            # only the live figure shows: the static copy below it is hidden while the widget lives
            visible = [e for e in page.locator(".js-plotly-plot").all() if e.is_visible()]
            assert len(visible) == 1
            before = _plot_texts(live)
            assert "P(final top-1)" in before and any("layer" in t for t in before)
            # the "press Run" placeholder is gone (its annotation and its hidden axes), not
            # left behind the heatmap by the browser's merging relayout
            assert not [t for t in before if "press Run" in t], before
            assert live.locator("g.annotation").count() == 0
            assert live.locator(".xtick text").count() == 10  # one label per token position

            page.locator(".tpmlab-dash .widget-dropdown select").first.select_option(label="KL")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.tpmlab-dash .js-plotly-plot svg text')]"
                ".some(t => t.textContent.includes('KL (nats)'))", timeout=30_000)
            after = _plot_texts(live)
            assert "KL (nats)" in after and "P(final top-1)" not in after
            assert not [t for t in after if "press Run" in t]

            box = live.locator(".nsewdrag").first.bounding_box()
            rows, cols, row, col = 5, 10, 1, 2  # input + 4 layers; 10 tokens
            page.mouse.click(box["x"] + (col + 0.5) / cols * box["width"],
                             box["y"] + box["height"] - (row + 0.5) / rows * box["height"])
            detail = page.locator(".tpmlab-dash .tpmlab-detail")
            page.wait_for_function(
                "() => document.querySelector('.tpmlab-dash .tpmlab-detail')"
                ".textContent.includes('layer 0, position 2')", timeout=30_000)
            assert "probability" in detail.inner_text()
            page.mouse.move(box["x"] + (col + 0.5) / cols * box["width"],
                            box["y"] + box["height"] - (row + 0.5) / rows * box["height"])
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "widgets-logit-dashboard.png"))

            # save, stop the kernel, reopen: the static copy of the last state shows
            page.keyboard.press("Control+s")
            page.wait_for_timeout(1500)
            with urllib.request.urlopen(f"{base}/api/sessions?token={token}") as r:
                sessions = json.load(r)
            for s in sessions:
                req = urllib.request.Request(f"{base}/api/sessions/{s['id']}?token={token}", method="DELETE")
                urllib.request.urlopen(req).close()
            saved = nbformat.read(path, as_version=4)
            size = path.stat().st_size
            shutil.copy(path, ARTIFACTS / "widgets-logit-dashboard.ipynb")
            assert size < 150_000, size
            assert "application/vnd.jupyter.widget-state+json" not in saved.metadata.get("widgets", {})
            mimes = [m for o in saved.cells[1].outputs for m in o.get("data", {})]
            assert "application/vnd.plotly.v1+json" in mimes
            page.reload()
            page.locator(".jp-Notebook").wait_for(timeout=60_000)
            page.wait_for_function(  # the static copy, drawn by plotly's labextension
                "() => [...document.querySelectorAll('.js-plotly-plot svg text')]"
                ".some(t => t.textContent.includes('KL (nats)') && t.getClientRects().length)",
                timeout=60_000)
            assert page.locator(".tpmlab-dash").count() == 0
            static = [e for e in page.locator(".js-plotly-plot").all() if e.is_visible()]
            assert len(static) == 1 and "layer 0, position 2" in page.locator(".jp-Notebook").inner_text()
            page.screenshot(path=str(ARTIFACTS / "widgets-logit-static.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "widgets-failure.png"))
            raise
        finally:
            browser.close()
