"""The sidebar's deploy with no scheduler configured starts the embedded cluster in the
Jupyter server: it speaks TLS under credentials held only in the server's memory, on
loopback, dashboard included."""

from __future__ import annotations

import threading

import pytest

from tpmlab.server.state import ClusterState

pytestmark = pytest.mark.slow


def test_the_sidebars_embedded_cluster_is_secure():
    state = ClusterState(None, embedded_options={"n_workers": 2})
    try:
        # as the handler does: the deploy runs on the server's deploy thread
        deploy = threading.Thread(target=state.deploy, args=("tiny-llama", 2))
        deploy.start()
        deploy.join(600)
        status = state.status()
        assert status["errors"] == [], status["errors"]
        assert [(m["name"], m["state"]) for m in status["models"]] == [("tiny-llama", "deployed")]
        cluster = status["cluster"]
        assert cluster["embedded"] and cluster["address"].startswith("tls://127.0.0.1:")
        assert all(w["address"].startswith("tls://127.0.0.1:") for w in cluster["workers"])
        assert cluster["dashboard"]["direct"].startswith("http://127.0.0.1:")
        embedded = state.lab.backend.cluster
        assert embedded.security.require_encryption
        assert "\n" in embedded.security.tls_client_key  # in memory, never written
        assert embedded.scheduler.http_server.address == "127.0.0.1"
    finally:
        state.close()
