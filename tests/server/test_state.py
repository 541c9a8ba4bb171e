"""The adapter from Dask and tpmlab.cluster facts to the sidebar's JSON (no server)."""

from __future__ import annotations

import socket

from tpmlab.cluster.deployments import DeploymentRecord, StageProbe
from tpmlab.cluster.partition import StageSpan
from tpmlab.cluster.placement import Placement
from tpmlab.ir.model_info import ModelInfo
from tpmlab.server.state import GatewayUsage, dashboard_link, model_view, worker_view


def test_a_local_dashboard_is_linked_through_the_server_proxy():
    """The dashboard listens on 127.0.0.1 only; the browser reaches it through
    jupyter-server-proxy, behind Jupyter's login."""
    assert dashboard_link("tls://127.0.0.1:8786", 8787) == {
        "url": "/proxy/8787/status", "direct": "http://127.0.0.1:8787/status"}
    assert dashboard_link("tls://127.0.0.1:8786", None) is None


def test_dashboard_link_behind_jupyterhub_or_a_base_url():
    link = dashboard_link("tls://127.0.0.1:8786", 8787, hub_prefix="/user/ana/")
    assert link == {"url": "/user/ana/proxy/8787/status", "direct": "http://127.0.0.1:8787/status"}
    link = dashboard_link("inproc://192.0.2.2/1/1", 9000, base_url="/lab-base")
    assert link["url"] == "/lab-base/proxy/9000/status"


def test_dashboard_link_direct_where_no_proxy_can_reach_it():
    # a remote scheduler's dashboard is not on this server: link it directly
    assert dashboard_link("tls://10.9.9.9:8786", 8787, hub_prefix="/user/ana/")["url"] == \
        "http://10.9.9.9:8787/status"
    # jupyter-server-proxy not enabled in this server
    assert dashboard_link("tls://127.0.0.1:8786", 8787, proxy=False)["url"] == \
        "http://127.0.0.1:8787/status"


def test_worker_view_reads_memory_and_gpu_metrics():
    w = worker_view("tcp://h:1", {
        "name": "gpu-0", "host": "h", "nthreads": 1, "memory_limit": 100,
        "metrics": {"memory": 40, "cpu": 2.0, "gpu": {"utilization": 7, "memory-used": 5}},
        "gpu": {"name": "H100", "memory-total": 80}, "resources": {"GPU": 1}})
    assert (w["memory"], w["memory_limit"]) == (40, 100)
    assert w["gpu"] == {"name": "H100", "memory_used": 5, "memory_total": 80, "utilization": 7}
    assert worker_view("tcp://h:2", {"metrics": {"memory": 1}})["gpu"] is None


RECORD = DeploymentRecord(
    key="tpmlab:m@" + "v" * 16, futures=[],
    info=ModelInfo(name="m", version="v" * 16, family="llama", dtype="float32", events=[],
                   shapes={}, modules=[], stage_workers=["tcp://a", "tcp://b"],
                   extra={"stage_bytes": [10, 12]}),
    placements=[Placement("tcp://a", "cpu"), Placement("tcp://b", "cpu")],
    spans=[StageSpan(0, 2, 0, 3, 9), StageSpan(1, 2, 4, 7, 11)], specs=[{}, {}])


def test_model_view_maps_stages_to_workers_and_layers():
    m = model_view(RECORD, {"tcp://a", "tcp://b"})
    assert m["health"] == "ok" and m["n_layers"] == 8
    assert [(s["worker"], s["layers"], s["bytes"]) for s in m["stages"]] == [
        ("tcp://a", [0, 3], 10), ("tcp://b", [4, 7], 12)]


def test_model_view_marks_lost_and_silent_stages():
    m = model_view(RECORD, {"tcp://a"})
    assert [s["health"] for s in m["stages"]] == ["ok", "lost"] and m["health"] == "lost"
    m = model_view(RECORD, {"tcp://a", "tcp://b"}, probes=[StageProbe("answered", requests=2),
                                                      StageProbe("failed")])
    assert [s["health"] for s in m["stages"]] == ["ok", "unresponsive"]
    assert m["health"] == "degraded" and m["stages"][0]["requests"] == 2


def test_a_slow_stage_probe_is_not_a_health_problem():
    m = model_view(RECORD, {"tcp://a", "tcp://b"}, probes=[StageProbe("slow"),
                                                      StageProbe("answered", requests=0)])
    assert [s["health"] for s in m["stages"]] == ["ok", "ok"]
    assert [s["answered"] for s in m["stages"]] == [False, True]


def test_gateway_usage_is_configured_by_the_environment():
    assert GatewayUsage.from_env({}) is None
    g = GatewayUsage.from_env({"TPMLAB_GATEWAY": "http://gw:8000/", "JUPYTERHUB_API_TOKEN": "h"})
    assert (g.url, g.token) == ("http://gw:8000", "h")
    g = GatewayUsage.from_env({"TPMLAB_GATEWAY": "http://gw", "TPMLAB_TOKEN": "k",
                               "JUPYTERHUB_API_TOKEN": "h"})
    assert g.token == "k"


def test_gateway_usage_names_an_unreachable_gateway():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    usage = GatewayUsage(f"http://127.0.0.1:{port}", "k", timeout=2)()
    assert usage.keys() == {"error"}
    assert f"cannot reach the gateway http://127.0.0.1:{port}" in usage["error"]
