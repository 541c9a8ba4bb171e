"""Only the owner reaches the clusters tpmlab starts: the embedded cluster speaks mutual TLS
under credentials made for it, refuses every peer without them (on the scheduler, the
workers and the nannies alike), keeps its workers out of the way of Ctrl-C, and its
credentials folder is private and found by address."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from tpmlab.cluster.errors import ClusterSecurityError
from tpmlab.cluster.security import (
    CREDENTIALS_ENV,
    InsecureClusterWarning,
    client_security,
    credentials_for,
    is_loopback,
    kernel_environment,
    new_security,
    read_credentials,
    remove_credentials,
    write_credentials,
)

from .conftest import notebook_links, set_link_env

# What another local user would try, run in a process with a clean environment: plain TCP
# to the TLS port, TLS without a certificate, TLS with a self-made certificate of another CA,
# a Dask client with no credentials and one with its own temporary CA; each succeeding
# attempt would go on to run code on the cluster (`client.run`) and leave a marker file.
INTRUDER = textwrap.dedent('''
    import asyncio, json, os, ssl, sys
    from distributed import Client
    from distributed.comm import connect
    from distributed.security import Security

    targets, marker = json.loads(sys.argv[1]), sys.argv[2]

    def pwn():
        open(marker, "w").write("ran code on the cluster")
        return os.getpid()

    def no_certificate():
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # trust any server
        return ctx

    def other_ca():
        ctx = Security.temporary().get_connection_args("client")["ssl_context"]
        ctx.verify_mode = ssl.CERT_NONE  # only the cluster's check of *us* is under test
        return ctx

    async def handshake(address, **args):
        comm = await connect(address, timeout=5, **args)
        try:  # any answer at all would mean the cluster talks to us
            await comm.write({"op": "identity"})
            return str(await asyncio.wait_for(comm.read(), 5))[:80]
        finally:
            comm.abort()

    results = {}
    for address in targets:
        for how, args in [("tcp", {}), ("tls without certificate", {"ssl_context": no_certificate()}),
                          ("tls with another CA", {"ssl_context": other_ca()})]:
            target = address.replace("tls://", "tcp://") if how == "tcp" else address
            try:
                results[f"{how} {address}"] = "ANSWERED " + asyncio.run(handshake(target, **args))
            except Exception as e:
                results[f"{how} {address}"] = f"refused: {type(e).__name__}"
    for how, security in [("dask client", None), ("dask client, own CA", Security.temporary())]:
        try:
            with Client(targets[0], security=security, timeout=5) as c:
                c.run(pwn)
                results[how] = "CONNECTED and ran code"
        except Exception as e:
            results[how] = f"refused: {type(e).__name__}"
    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def secure_cluster():
    """The embedded cluster as tpmlab.connect() starts it, and its owner's client."""
    from distributed import Client

    from tpmlab.cluster.embedded import start_local_cluster

    cluster = start_local_cluster(n_workers=2)
    client = Client(cluster)
    yield cluster, client
    client.close()
    cluster.close()


def _clean_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
            "TPMLAB_HOME": os.environ["TPMLAB_HOME"], **extra}


@pytest.mark.slow
def test_the_embedded_cluster_speaks_tls_on_loopback_only(secure_cluster):
    cluster, client = secure_cluster
    info = client.scheduler_info()
    addresses = [cluster.scheduler_address, *info["workers"],
                 *(w["nanny"] for w in info["workers"].values())]
    assert len(addresses) == 5
    assert all(a.startswith("tls://127.0.0.1:") for a in addresses), addresses
    assert cluster.security.require_encryption
    assert client.run(os.getpid)  # the owner runs code, of course


@pytest.mark.slow
def test_a_process_without_the_credentials_is_refused_everywhere(secure_cluster, tmp_path):
    cluster, client = secure_cluster
    info = client.scheduler_info()
    targets = [cluster.scheduler_address, *info["workers"],
               *(w["nanny"] for w in info["workers"].values())]
    marker = tmp_path / "pwned"
    proc = subprocess.run([sys.executable, "-c", INTRUDER, json.dumps(targets), str(marker)],
                          env=_clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 3 * len(targets) + 2
    assert all(r.startswith("refused") for r in results.values()), results
    assert not marker.exists()


@pytest.mark.slow
def test_a_process_given_the_credentials_folder_attaches(secure_cluster, tmp_path):
    """The control for the refusals above: the same clean subprocess, given only
    $TPMLAB_CLUSTER_CREDENTIALS, connects by address and runs a function."""
    cluster, _ = secure_cluster
    folder = write_credentials(cluster.security, cluster.scheduler_address, root=tmp_path)
    code = ("import os, sys, tpmlab.cluster.security as s\n"
            "from distributed import Client\n"
            "with Client(sys.argv[1], security=s.client_security(sys.argv[1]), timeout=30) as c:\n"
            "    print(len(c.run(os.getpid)))\n")
    proc = subprocess.run([sys.executable, "-c", code, cluster.scheduler_address],
                          env=_clean_env(**{CREDENTIALS_ENV: str(folder)}), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "2"


@pytest.mark.slow
def test_workers_ignore_sigint(secure_cluster):
    """Ctrl-C in a terminal and Jupyter's "interrupt kernel" signal the whole process group:
    the stages' worker processes must not die of it."""
    _, client = secure_cluster
    before = client.run(os.getpid)
    for pid in before.values():
        os.kill(pid, signal.SIGINT)
    time.sleep(2)
    assert client.run(os.getpid) == before  # same workers, same processes, still answering


def _worker_start_state() -> tuple[bool, dict[str, str]]:
    from tpmlab.cluster.warm_start import LOAD_TIME_PREFIXES

    return "transformers.modeling_utils" in sys.modules, \
        {k: v for k, v in os.environ.items() if k.startswith(LOAD_TIME_PREFIXES)
         and k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


@pytest.mark.slow
def test_workers_start_with_the_stage_modules_already_imported(secure_cluster):
    """Workers are forked from a server that imported torch and transformers once (the
    embedded cluster's start-up): none imports them again, and each keeps the OpenMP wait
    settings the stages need (read when torch loaded, so they must be the server's)."""
    from tpmlab.cluster.warm_start import WORKER_ENV

    _, client = secure_cluster
    states = list(client.run(_worker_start_state).values())
    assert states == [(True, WORKER_ENV)] * 2


@pytest.mark.slow
def test_a_two_stage_trace_over_tls_equals_the_local_executor(secure_cluster, ref_lab):
    import torch

    from tpmlab.cluster import DaskBackend
    from tpmlab.lab import Lab

    _, client = secure_cluster
    lab = Lab(DaskBackend(client=client, timeout=120))
    try:
        sharded = lab.model("tiny-llama", stages=2)
        local = ref_lab.model("tiny-llama")
        values = []
        for m in (sharded, local):
            with m.trace("The Eiffel Tower is in"):
                values.append([m.layers[0].output.save(), m.output.logits.save()])
        for a, b in zip(*values):
            torch.testing.assert_close(a.value, b.value, atol=1e-5, rtol=1e-5)
    finally:
        lab.close()


@pytest.mark.slow
def test_stages_on_other_hosts_link_over_tls_with_the_clusters_certificates(
        secure_cluster, ref_lab, monkeypatch):
    """Stages (and the notebook) that reach each other over the network use the cluster's
    TLS credentials on a channel of their own, on the workers' (loopback) interface, and
    give the local executor's numbers."""
    import torch

    from tpmlab.cluster import DaskBackend, stage_link
    from tpmlab.cluster.backend import actor_call
    from tpmlab.lab import Lab

    _, client = secure_cluster
    monkeypatch.setenv(stage_link.ENV, "network")  # as if each were on a host of its own
    client.run(set_link_env, "network")
    backend = DaskBackend(client=client, timeout=120)
    lab = Lab(backend)
    try:
        sharded = lab.model("tiny-llama", stages=2)
        local = ref_lab.model("tiny-llama")
        assert [m["link"] for m in backend.memory("tiny-llama")] == ["tls", None]

        def trace(m):
            with m.trace("The Eiffel Tower is in"):
                saved = [m.layers[0].output.save(), m.output.logits.save()]
            return [s.value for s in saved]

        trace(sharded)  # the notebook links to each stage after its first call
        dep = backend.deployment("tiny-llama")
        keys = [a.key for a in dep.actors]
        assert [link.kind for link in notebook_links(backend, "tiny-llama")] == ["tls", "tls"]
        for a, b in zip(trace(sharded), trace(local)):
            torch.testing.assert_close(a[0] if isinstance(a, tuple) else a,
                                       b[0] if isinstance(b, tuple) else b, atol=1e-5, rtol=1e-5)
        address = asyncio.run_coroutine_threadsafe(
            actor_call(client, dep.placements[1].worker, keys[1], "stage_link", None, True),
            client.loop.asyncio_loop).result(30)
        assert address["network"]["host"] == "127.0.0.1" and address["network"]["tls"]
    finally:
        client.run(set_link_env, None)
        lab.close()


# -- the credentials folder ---------------------------------------------------------------------------
def test_credentials_folder_is_private_and_round_trips(tmp_path):
    security = new_security()
    folder = write_credentials(security, "tls://127.0.0.1:4321", root=tmp_path)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        "ca.pem": 0o600, "cert.pem": 0o600, "key.pem": 0o600, "cluster.json": 0o600}
    address, loaded = read_credentials(folder)
    assert address == "tls://127.0.0.1:4321"
    assert loaded.require_encryption
    assert loaded.tls_ca_file == security.tls_ca_file
    assert loaded.tls_client_key == security.tls_client_key
    remove_credentials(folder)
    assert not folder.exists()


def test_credentials_readable_by_others_are_refused(tmp_path):
    folder = write_credentials(new_security(), "tls://127.0.0.1:4321", root=tmp_path)
    (folder / "key.pem").chmod(0o644)
    with pytest.raises(ClusterSecurityError, match="key.pem.*private"):
        read_credentials(folder)
    (folder / "key.pem").chmod(0o600)
    folder.chmod(0o755)
    with pytest.raises(ClusterSecurityError, match="private"):
        read_credentials(folder)


def test_folders_of_dead_clusters_are_removed_on_their_host_only(tmp_path):
    """A home directory shared by login nodes holds other hosts' folders: their process
    ids mean nothing here."""
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    stale = write_credentials(new_security(), "tls://127.0.0.1:1", root=tmp_path)
    elsewhere = write_credentials(new_security(), "tls://127.0.0.1:2", root=tmp_path)
    for folder, host in ((stale, None), (elsewhere, "login2.example")):
        info = json.loads((folder / "cluster.json").read_text())
        (folder / "cluster.json").write_text(json.dumps(
            {**info, "pid": dead, "host": host or info["host"]}))
    live = write_credentials(new_security(), "tls://127.0.0.1:3", root=tmp_path)
    assert not stale.exists() and elsewhere.exists() and live.exists()


def test_credentials_are_found_by_address(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)
    security = new_security()
    folder = write_credentials(security, "tls://127.0.0.1:4321")
    assert folder.parent == tmp_path
    assert credentials_for("tls://127.0.0.1:4321").tls_ca_file == security.tls_ca_file
    assert credentials_for("tls://127.0.0.1:9999") is None
    info = json.loads((folder / "cluster.json").read_text())  # as if another login node's
    (folder / "cluster.json").write_text(json.dumps({**info, "host": "login2.example"}))
    assert credentials_for("tls://127.0.0.1:4321") is None
    (folder / "cluster.json").write_text(json.dumps(info))
    env = kernel_environment(folder, "tls://127.0.0.1:4321")
    assert env["TPMLAB_SCHEDULER"] == "tls://127.0.0.1:4321"
    assert env[CREDENTIALS_ENV] == str(folder)
    # distributed's own hook, named for kernels: a plain Client(address) finds them too
    from distributed.utils import import_term

    loader = import_term(env["DASK_DISTRIBUTED__CLIENT__SECURITY_LOADER"])
    assert loader({"address": "tls://127.0.0.1:4321"}).tls_ca_file == security.tls_ca_file
    assert loader({"address": "tls://10.0.0.1:8786"}) is None


# -- connecting to other clusters -----------------------------------------------------------------
def test_a_tls_address_without_credentials_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)
    with pytest.raises(ClusterSecurityError, match=r"security=.*cluster\.security.*docs/hpc\.md"):
        client_security("tls://10.1.2.3:8786")
    given = new_security()
    assert client_security("tls://10.1.2.3:8786", given) is given


def test_plain_tcp_to_another_host_warns_once(recwarn):
    with pytest.warns(InsecureClusterWarning, match=r"tcp://10\.9\.8\.7:8786 without TLS.*docs/hpc\.md"):
        assert client_security("tcp://10.9.8.7:8786") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client_security("tcp://10.9.8.7:8786")  # once per address
        client_security("tcp://127.0.0.1:8786")  # loopback: the owner's own machine
        client_security("tcp://localhost:8786")
        client_security("tcp://[::1]:8786")
    with pytest.warns(InsecureClusterWarning):
        client_security("node042:8786")  # Dask's default scheme is tcp


def test_loopback_names():
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("[::1]")
    assert is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("node042") and not is_loopback("")


def test_connect_passes_security_to_the_cluster_client(monkeypatch):
    """connect(address, security=...) hands the Security to the Dask client it makes."""
    import tpmlab
    from tpmlab.cluster import backend

    seen = {}

    class FakeClient:
        def __init__(self, address, **kwargs):
            seen.update(kwargs, address=address)

    monkeypatch.setattr(backend, "Client", FakeClient)
    security = new_security()
    tpmlab.connect("tls://10.1.2.3:8786", security=security)
    assert seen["address"] == "tls://10.1.2.3:8786" and seen["security"] is security


def test_embedded_cluster_options_stay_secure():
    from tpmlab.cluster.embedded import loopback_address, start_local_cluster

    assert loopback_address(None) is None
    assert loopback_address(":8787") == "127.0.0.1:8787"
    assert loopback_address(8787) == "127.0.0.1:8787"
    assert loopback_address(":0") == "127.0.0.1:0"
    assert loopback_address("10.0.0.1:8787") == "10.0.0.1:8787"  # an explicit host is a choice
    with pytest.raises(ValueError, match="TLS only"):
        start_local_cluster(1, protocol="tcp://")



def test_a_dask_gateway_address_needs_its_clusters_credentials():
    pytest.importorskip("dask_gateway", reason="dask-gateway (the hpc extra) is not installed")
    with pytest.raises(ClusterSecurityError, match=r"tpmlab\.connect\(cluster\).*cluster\.security"):
        client_security("gateway://127.0.0.1:8786/clusters.abc123")
    given = new_security()
    assert client_security("gateway://127.0.0.1:8786/clusters.abc123", given) is given


def test_connect_takes_a_cluster_object_with_its_credentials(monkeypatch):
    from types import SimpleNamespace

    import tpmlab.cluster
    from tpmlab.cluster.security import cluster_endpoint

    given, other = new_security(), new_security()
    cluster = SimpleNamespace(scheduler_address="tls://10.1.2.3:8786", security=given)
    assert cluster_endpoint(cluster) == ("tls://10.1.2.3:8786", given)
    assert cluster_endpoint(cluster, other) == ("tls://10.1.2.3:8786", other)
    with pytest.raises(ClusterSecurityError, match="scheduler_address"):
        cluster_endpoint(object())
    seen = {}

    class Backend:
        def __init__(self, address, security=None, **options):
            seen.update(address=address, security=security)

    monkeypatch.setattr(tpmlab.cluster, "DaskBackend", Backend)
    tpmlab.connect(cluster)
    assert seen == {"address": "tls://10.1.2.3:8786", "security": given}
