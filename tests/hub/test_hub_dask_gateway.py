"""Bring your own allocation: a Hub user creates a Dask cluster through dask-gateway-server
(a Hub-managed service; its local backend; JupyterHub authentication), scales it to two
workers, deploys the default model on it as two pipeline stages with
``tpmlab.connect(cluster)`` and traces it. Another Hub user can neither find nor reach that
cluster."""

from __future__ import annotations

import pytest

from .conftest import MODEL

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"


def _gateway(hub, token: str):
    from dask_gateway import Gateway
    from dask_gateway.auth import JupyterHubAuth

    return Gateway(address=hub.dask_gateway_url, proxy_address=hub.dask_gateway_proxy,
                   auth=JupyterHubAuth(api_token=token))


def _closed(gateway) -> None:
    """After ``close()``: dask-gateway's ``__del__`` would close the client again, on its
    stopped loop, and raise inside the garbage collector."""
    gateway.__dict__.pop("_loop_runner", None)


def test_a_hub_users_own_cluster_holds_the_stages(hub):
    import tpmlab
    from tpmlab.cluster.errors import ClusterSecurityError

    alice = _gateway(hub, hub.token("alice"))
    bob = _gateway(hub, hub.token("bob"))
    cluster = alice.new_cluster()
    try:
        cluster.scale(2)
        client = cluster.get_client(set_as_default=False)
        client.wait_for_workers(2, timeout=180)
        client.close()
        assert cluster.scheduler_address.startswith("gateway://")

        lab = tpmlab.connect(cluster)  # its address and the credentials made for alice
        try:
            model = lab.model(MODEL, stages=2)
            workers = set(model.info.stage_workers)
            assert len(workers) == 2, model.info.stage_workers
            with model.trace(PROMPT):
                logits = model.output.logits[:, -1].save()
            assert model.tokenizer.decode(logits.value.argmax(-1)) == " Paris"
        finally:
            lab.close()

        # bob: the cluster is not among his, and the gateway will not hand it to him ...
        assert cluster.name not in {c.name for c in bob.list_clusters()}
        with pytest.raises(Exception) as refused:  # 403: not his to connect to
            bob.connect(cluster.name)
        assert getattr(refused.value, "status", None) == 403, refused.value
        # ... nor does its address alone get anyone in: the credentials are alice's.
        with pytest.raises(ClusterSecurityError, match="cluster.security"):
            tpmlab.connect(cluster.scheduler_address)
        bobs = bob.new_cluster()  # bob's own credentials are of another authority
        try:
            with pytest.raises(OSError):
                from distributed import Client

                Client(cluster.scheduler_address, security=bobs.security, timeout=10)
        finally:
            bobs.shutdown()
            _closed(bobs.gateway)
    finally:
        cluster.shutdown()
        _closed(cluster.gateway)
        for gateway in (alice, bob):
            gateway.close()
            _closed(gateway)
