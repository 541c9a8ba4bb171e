"""Two researchers on a real JupyterHub, through a real browser (the system's Chromium):
each logs in, opens JupyterLab, finds the shared deployment in the tpmlab sidebar, runs a
cell that traces the default model through the gateway service with no token written
anywhere (the single-user server's own Hub token is used), gets " Paris" and sees their own
usage. Neither can see or fetch the other's requests; the one the administrator put in the
'query' tier reads an intermediate value and gets the tier's message in the notebook. The
sidebar's Dask dashboard link goes through the Hub's proxy: open for its owner, refused to
the other user. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from tests.ui.test_sidebar_browser import ARTIFACTS

from .conftest import MODEL, login, write_notebook

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"
TRACE_CELL = f"""import tpmlab

lab = tpmlab.connect()  # $TPMLAB_GATEWAY, as this server's Hub user
model = lab.model()
with model.trace({PROMPT!r}):
    logits = model.output.logits[:, -1].save()
print("next:", repr(model.tokenizer.decode(logits.value.argmax(-1))))
print("request:", lab.backend.last_charge["request_id"])
"""
READ_CELL = f"""with model.trace({PROMPT!r}):
    hidden = model.layers[3].output.save()
print("read:", tuple(hidden.value.shape))
"""


def _gateway(hub, token: str) -> httpx.Client:
    return httpx.Client(base_url=hub.gateway_url, timeout=60,
                        headers={"Authorization": f"Bearer {token}"})


def _open_sidebar(page):
    tab = page.locator('.jp-SideBar .lm-TabBar-tab[data-id="tpmlab-sidebar"]')
    tab.wait_for(timeout=90_000)
    sidebar = page.locator("#tpmlab-sidebar")
    for _ in range(5):  # JupyterLab may have restored it open: a click would close it
        if sidebar.is_visible():
            break
        tab.click()
        page.wait_for_timeout(1000)
    sidebar.locator(f'.jp-tpmlab-model[data-model="{MODEL}"]').wait_for(timeout=60_000)
    return sidebar


def _run_cells(page, hub, user: str, cells: list[str], expect: list[str]) -> str:
    """Open a notebook of these cells in ``user``'s JupyterLab, run them one by one with
    Shift+Enter, wait for each expected text in the outputs; the outputs' text."""
    write_notebook(hub.home(user) / "trace.ipynb", cells)
    page.goto(f"{hub.url}/user/{user}/lab/tree/trace.ipynb", timeout=60_000)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    # A cell run before the kernel is connected is not run: wait for the kernel's status.
    page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for(timeout=120_000)
    outputs = page.locator(".jp-Notebook .jp-OutputArea-output")
    for k, text in enumerate(expect):
        cell = page.locator(".jp-Notebook .jp-Cell").nth(k)
        for _ in range(3):  # a run the notebook drops (kernel not yet ready) is run again
            cell.locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
            try:
                page.wait_for_function(
                    "k => !/\\[ \\]/.test(document.querySelectorAll("
                    "'.jp-Notebook .jp-Cell .jp-InputPrompt')[k]?.textContent ?? '[ ]')",
                    arg=k, timeout=20_000)
                break
            except Exception:
                continue
        try:
            cell.locator(".jp-OutputArea-output", has_text=text).first.wait_for(timeout=180_000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / f"hub-{user}-failed.png"))
            pytest.fail(f"{user}'s notebook did not show {text!r}; its outputs:\n"
                        + "\n".join(outputs.all_inner_texts()) + "\nthe Hub's log:\n"
                        + hub.tail(6000))
    return "\n".join(outputs.all_inner_texts())


def _wait_for_usage(page) -> None:
    """Until the sidebar's usage shows some service units used."""
    page.wait_for_function(
        "() => /^\\s*[0-9.]*[1-9][0-9.]*(e[-+]?\\d+)?\\s*\\//.test("
        "document.querySelector('#tpmlab-sidebar .jp-tpmlab-usage .jp-tpmlab-kv')"
        "?.textContent ?? '')", timeout=60_000)


def _used(page) -> float:
    text = page.locator("#tpmlab-sidebar .jp-tpmlab-usage .jp-tpmlab-kv").inner_text()
    match = re.match(r"\s*([0-9.e+-]+)\s*/\s*([0-9.e+-]+)\s*SU", text)
    assert match, text
    return float(match.group(1))


def test_two_users_trace_through_the_hub_gateway(hub, chromium, alice_cluster):
    ARTIFACTS.mkdir(exist_ok=True)
    tokens = {u: hub.token(u) for u in ("alice", "bob")}  # the test's own look at the gateway
    # The administrator puts bob in the 'query' tier (his account exists from first sight).
    assert _gateway(hub, tokens["bob"]).get("/v1/me").json()["tier"] == "inspect"
    subprocess.run([sys.executable, "-m", "tpmlab.cli", "gateway-admin", "--db", hub.ledger_url,
                    "set-tier", "hub:bob", "query"], check=True, capture_output=True)

    alice_ctx, alice = login(chromium, hub, "alice")
    bob_ctx, bob = login(chromium, hub, "bob")
    try:
        # alice: the sidebar shows the gateway's deployment and her usage.
        sidebar = _open_sidebar(alice)
        usage = sidebar.locator(".jp-tpmlab-usage")
        usage.filter(has_text="SU").wait_for(timeout=30_000)
        out = _run_cells(alice, hub, "alice", [TRACE_CELL], ["next:"])
        assert "next: ' Paris'" in out, out
        alice_request = re.search(r"request: (\S+)", out).group(1)
        _wait_for_usage(alice)
        me = _gateway(hub, tokens["alice"]).get("/v1/me").json()
        assert me["name"] == "hub:alice" and me["used"] > 0
        assert _used(alice) == pytest.approx(me["used"], rel=1e-3, abs=1e-3)
        alice.screenshot(path=str(ARTIFACTS / "hub-alice.png"))

        # bob: the same deployment, his own usage; the query tier answers the logits ...
        _open_sidebar(bob)
        out = _run_cells(bob, hub, "bob", [TRACE_CELL, READ_CELL], ["next:", "TierError"])
        assert "next: ' Paris'" in out, out
        # ... and refuses the intermediate read, saying which tier it needs.
        assert "needs the 'inspect' tier, and your tier is 'query'" in out, out
        assert "read: (" not in out
        _wait_for_usage(bob)
        bob_me = _gateway(hub, tokens["bob"]).get("/v1/me").json()
        assert bob_me["name"] == "hub:bob"
        assert _used(bob) == pytest.approx(bob_me["used"], rel=1e-3, abs=1e-3)
        assert bob_me["used"] != pytest.approx(me["used"])  # his own, not alice's
        bob.screenshot(path=str(ARTIFACTS / "hub-bob.png"))
        bob_request = re.search(r"request: (\S+)", out).group(1)

        # No token was written anywhere: the notebooks hold none.
        for user in ("alice", "bob"):
            text = (hub.home(user) / "trace.ipynb").read_text()
            written = (re.search(r"token\b|token=|_TOKEN", text, re.I) is not None
                       or any(t in text for t in tokens.values()))
            assert not written, f"{user}'s notebook names a token"

        # Each sees only their own requests.
        with _gateway(hub, tokens["alice"]) as a, _gateway(hub, tokens["bob"]) as b:
            assert a.get(f"/v1/requests/{alice_request}").status_code == 200
            assert a.get(f"/v1/requests/{alice_request}/result").status_code in (200, 410)
            for path in (f"/v1/requests/{alice_request}", f"/v1/requests/{alice_request}/result"):
                assert b.get(path).status_code == 404, path
            assert a.get(f"/v1/requests/{bob_request}").status_code == 404
            charged = {c.get("request_id") for c in b.get("/v1/me/usage").json()["charges"]}
            assert bob_request in charged and alice_request not in charged
            assert b.get("/v1/me").json()["tier"] == "query"

        # The sidebar's Dask dashboard link (alice's own cluster) goes through the Hub's proxy:
        # it opens for alice, and the Hub refuses it to bob.
        cluster, _ = alice_cluster
        port = cluster.scheduler.services["dashboard"].port
        alice.goto(f"{hub.url}/user/alice/lab", timeout=60_000)
        sidebar = _open_sidebar(alice)
        link = sidebar.locator(".jp-tpmlab-dashboard-link")
        alice.wait_for_function("() => !document.querySelector('.jp-tpmlab-dashboard-link')"
                                "?.disabled", timeout=60_000)
        with alice_ctx.expect_page(timeout=30_000) as popup:
            link.click()
        dash = popup.value
        dash.wait_for_load_state("domcontentloaded", timeout=30_000)
        url = f"{hub.url}/user/alice/proxy/{port}/status"
        assert dash.url.startswith(url), dash.url
        assert "Dask" in dash.title(), dash.title()
        assert alice_ctx.request.get(url).status == 200
        refused = bob_ctx.request.get(url)
        assert refused.status == 403, (refused.status, refused.url)
        assert "Dask" not in refused.text()
    finally:
        alice_ctx.close()
        bob_ctx.close()


def test_only_tokens_with_the_service_scope_reach_the_gateway(hub):
    """The Hub's role for the gateway service: a user's token without
    access:services!service=tpmlab is refused, as is anything not a Hub token."""
    narrow = hub.token("alice", scopes=["read:users:name!user"])
    with _gateway(hub, narrow) as c:
        r = c.get("/v1/me")
        assert r.status_code == 401 and "access:services!service=tpmlab" in r.json()["message"]
    with _gateway(hub, "not-a-token") as c:
        assert c.get("/v1/me").status_code == 401
    with _gateway(hub, hub.token("alice")) as c:
        assert c.get("/v1/models").json()[0]["name"] == MODEL
