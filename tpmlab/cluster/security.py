"""Who may reach a cluster: mutual TLS with credentials made for each cluster tpmlab starts.

Dask runs whatever its clients send (``client.run`` calls a function on every worker), so
whoever reaches a scheduler, a worker or a nanny runs code as the cluster's owner. On a
shared login node or a JupyterHub host every local user reaches ``127.0.0.1``: a loopback
port protects nothing. Every cluster tpmlab starts therefore speaks TLS with mutual
certificate checks (distributed's ``require_encryption``), under a certificate authority
made for that cluster alone (:func:`new_security`): a peer without its credentials, or with
a certificate of any other authority, fails the handshake before a message is read.

Where the credentials live:

* ``tpmlab.connect()`` and the server extension's deploy keep them in memory; the worker
  processes receive them from their nanny through the spawn pipe. Nothing is written.
* ``tpmlab lab`` also hands them to its JupyterLab (the sidebar's server extension) and to
  the kernels it starts: :func:`write_credentials` puts them in a private folder and
  :func:`kernel_environment` names it in ``$TPMLAB_CLUSTER_CREDENTIALS``, which
  :func:`client_security` (and so ``tpmlab.connect()``) reads. The folder is removed when
  the cluster stops (:func:`remove_credentials`).

The folder is ``tpmlab-cluster-*`` (mode 0700, files 0600) in Jupyter's runtime directory
(``jupyter_core.paths.jupyter_runtime_dir()``: ``$JUPYTER_RUNTIME_DIR`` if set). That is where
Jupyter keeps its kernels' connection files, whose keys grant the same power (running code
as this user) under the same protection and for the same lifetime; a site that moves them
to node-local or memory-backed storage moves these too. Not ``$TPMLAB_HOME``: it holds
weights and is often a project folder shared with a group. Not ``$XDG_RUNTIME_DIR`` alone:
batch jobs and containers often lack it, and logind removes it at logout under a
``tpmlab lab`` still running in tmux or nohup.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from distributed.security import Security

from .errors import ClusterSecurityError

CREDENTIALS_ENV = "TPMLAB_CLUSTER_CREDENTIALS"  # a credentials folder, set for kernels
SCHEDULER_ENV = "TPMLAB_SCHEDULER"  # the scheduler tpmlab.connect() attaches to
# distributed's documented hook for "no security given to Client(address)": plain
# ``distributed.Client(address)`` and dask-labextension in the lab find the credentials too
SECURITY_LOADER_ENV = "DASK_DISTRIBUTED__CLIENT__SECURITY_LOADER"
SECURITY_LOADER = "tpmlab.cluster.security.security_loader"
FOLDER_PREFIX = "tpmlab-cluster-"
FILES = {"ca": "ca.pem", "cert": "cert.pem", "key": "key.pem", "info": "cluster.json"}
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
DOCS = "docs/hpc.md (section \"Security\")"


class InsecureClusterWarning(UserWarning):
    """Connecting to a scheduler on another host without TLS."""


# -- making credentials ---------------------------------------------------------------------------
def new_security() -> Security:
    """Credentials for one new cluster, in memory: a self-signed certificate that is the
    cluster's only certificate authority and every role's certificate, with
    ``require_encryption`` (plain ``tcp://`` is refused) and TLS 1.3 (both ends are ours)."""
    return Security.temporary(tls_min_version=ssl.TLSVersion.TLSv1_3)


def _pem(security: Security) -> dict[str, str]:
    pems = {"ca": security.tls_ca_file, "cert": security.tls_client_cert,
            "key": security.tls_client_key}
    if not all(isinstance(v, str) and "-----BEGIN" in v for v in pems.values()):
        raise ClusterSecurityError("only in-memory credentials (new_security()) can be written")
    return pems


def _from_pem(ca: str, cert: str, key: str) -> Security:
    return Security(require_encryption=True, tls_min_version=ssl.TLSVersion.TLSv1_3,
                    tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key)


# -- the credentials folder -----------------------------------------------------------------------
def runtime_root() -> Path:
    """Jupyter's runtime directory (created 0700 if missing), where credentials folders go."""
    from jupyter_core.paths import jupyter_runtime_dir

    root = Path(jupyter_runtime_dir())
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def write_credentials(security: Security, scheduler_address: str, *,
                      root: Path | None = None) -> Path:
    """Write ``security``'s credentials for the cluster at ``scheduler_address`` into a new
    private folder under ``root`` (default :func:`runtime_root`); returns the folder.

    The folder is made by :func:`tempfile.mkdtemp` (mode 0700, a fresh name: nothing to
    race) and each file is created exclusively with mode 0600. Folders left by clusters
    whose process died without cleaning up are removed on the way.
    """
    root = Path(root) if root is not None else runtime_root()
    _remove_stale(root)
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=root))
    info = json.dumps({"scheduler": scheduler_address, "pid": os.getpid(),
                       "host": socket.gethostname()})
    for name, text in {**_pem(security), "info": info}.items():
        fd = os.open(folder / FILES[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return folder


def read_credentials(folder: str | os.PathLike[str]) -> tuple[str, Security]:
    """The scheduler address and the in-memory :class:`Security` kept in ``folder``
    (read once: the folder may go while the connection lives).

    Refuses (:class:`ClusterSecurityError`) a folder or file that another user owns or
    may read or write: such credentials are no longer secret, or not ours.
    """
    folder = Path(folder)
    try:
        _check_private(folder)
        texts = {}
        for name, file in FILES.items():
            _check_private(folder / file)
            texts[name] = (folder / file).read_text()
        address = json.loads(texts["info"])["scheduler"]
    except ClusterSecurityError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ClusterSecurityError(f"cannot read cluster credentials from {folder}: "
                                   f"{type(e).__name__}: {e}") from None
    return address, _from_pem(texts["ca"], texts["cert"], texts["key"])


def remove_credentials(folder: str | os.PathLike[str] | None) -> None:
    """Delete a credentials folder (once its cluster has stopped)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _check_private(path: Path) -> None:
    if os.name != "posix":
        return
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise ClusterSecurityError(f"{path} is a symbolic link; refusing cluster credentials")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ClusterSecurityError(
            f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; "
            "cluster credentials must be private to their owner (mode 0700/0600)")


def _remove_stale(root: Path) -> None:
    """Remove the folders of this host's clusters whose process is gone. Jupyter's runtime
    directory is often in a home directory shared by several login nodes: another host's
    process ids mean nothing here, so its folders are left alone."""
    for folder in root.glob(FOLDER_PREFIX + "*"):
        try:
            info = json.loads((folder / FILES["info"]).read_text())
            if (info.get("host") == socket.gethostname() and folder.stat().st_uid == os.getuid()
                    and not _alive(int(info["pid"]))):
                remove_credentials(folder)
        except (OSError, ValueError, KeyError, TypeError):
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def kernel_environment(folder: Path, scheduler_address: str) -> dict[str, str]:
    """Environment variables with which processes (JupyterLab, its kernels) attach to the
    cluster whose credentials are in ``folder``, with no step of the user's."""
    return {SCHEDULER_ENV: scheduler_address, CREDENTIALS_ENV: str(folder),
            SECURITY_LOADER_ENV: SECURITY_LOADER}


# -- finding credentials for an address -----------------------------------------------------------
def credentials_for(address: str) -> Security | None:
    """The credentials of the tpmlab cluster at ``address``, if this user holds them:
    the folder named by ``$TPMLAB_CLUSTER_CREDENTIALS`` first, then any credentials
    folder in :func:`runtime_root` written on this host for that address."""
    named = os.environ.get(CREDENTIALS_ENV)
    folders = [Path(named)] if named else []
    try:
        folders += [f for f in sorted(runtime_root().glob(FOLDER_PREFIX + "*"))
                    if _written_here(f)]
    except ImportError:  # no Jupyter here: only the named folder can exist
        pass
    want = _normalize(address)
    for folder in folders:
        try:
            found, security = read_credentials(folder)
        except ClusterSecurityError:
            # the lab's own cluster: say why its credentials are unusable; else look on
            if named and folder == Path(named) and want == _normalize(
                    os.environ.get(SCHEDULER_ENV, "")):
                raise
            continue
        if _normalize(found) == want:
            return security
    return None


def _written_here(folder: Path) -> bool:
    """Whether ``folder`` was written on this host (127.0.0.1 on another login node sharing
    this home directory is another machine)."""
    try:
        return json.loads((folder / FILES["info"]).read_text()).get("host") == socket.gethostname()
    except (OSError, ValueError, AttributeError):
        return False


def security_loader(info: dict[str, Any]) -> Security | None:
    """distributed's ``distributed.client.security-loader`` hook: a ``Client(address)``
    given no ``security=`` gets the tpmlab cluster's credentials for that address."""
    address = info.get("address")
    return credentials_for(address) if isinstance(address, str) else None


def client_security(address: str, security: Security | None = None) -> Security | None:
    """What a client should connect to ``address`` with.

    ``security`` if given. Otherwise, for a ``tls://`` address: the tpmlab cluster's own
    credentials (:func:`credentials_for`), else ``None`` when Dask's configuration provides
    TLS credentials, else :class:`ClusterSecurityError` saying what to pass. A ``tcp://``
    address on another host warns once (:class:`InsecureClusterWarning`): anyone who
    reaches it runs code as the cluster's owner.
    """
    scheme, host = _scheme_host(address)
    if scheme == GATEWAY_SCHEME:
        _register_gateway_comm()
    if security is not None:
        return security
    if scheme == GATEWAY_SCHEME:  # dask-gateway's proxy: TLS under the cluster's own CA
        raise ClusterSecurityError(
            f"{address} is a dask-gateway cluster, reached only with its credentials: pass "
            "the cluster itself (tpmlab.connect(cluster)) or security=cluster.security. "
            f"See {DOCS}.")
    if scheme == "tls":
        found = credentials_for(address)
        if found is not None or _configured_tls():
            return found
        raise ClusterSecurityError(
            f"{address} speaks TLS but no credentials for it were given: pass "
            "security=<distributed.security.Security> (dask-jobqueue and dask-gateway "
            "clusters have it as cluster.security); kernels started by `tpmlab lab` find "
            f"theirs in ${CREDENTIALS_ENV}. See {DOCS}.")
    if scheme == "tcp" and not is_loopback(host):
        _warn_once(address)
    return None


GATEWAY_SCHEME = "gateway"  # dask-gateway's proxied TLS, routed by the cluster's name (SNI)


def cluster_endpoint(cluster: Any, security: Security | None = None) -> tuple[str, Security | None]:
    """The scheduler address and credentials of a Dask cluster object: a dask-gateway
    ``GatewayCluster`` (``Gateway().new_cluster()``, its credentials made by the gateway for
    its owner), a dask-jobqueue or ``LocalCluster``: anything with ``scheduler_address``
    and ``security``. ``security`` overrides the cluster's own."""
    address = getattr(cluster, "scheduler_address", None)
    if not isinstance(address, str) or not address:
        raise ClusterSecurityError(
            f"connect() takes a scheduler address (a str) or a Dask cluster object with a "
            f"scheduler_address (dask_gateway.GatewayCluster, dask-jobqueue, LocalCluster); "
            f"got {type(cluster).__name__}")
    return address, security if security is not None else getattr(cluster, "security", None)


def _register_gateway_comm() -> None:
    """``gateway://`` addresses need dask-gateway's comm, registered when it is imported."""
    try:
        import dask_gateway  # noqa: F401
    except ImportError:
        raise ClusterSecurityError("a gateway:// address needs dask-gateway: "
                                   "pip install 'tpmlab[hpc]'") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (no name lookups)."""
    import ipaddress

    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(address: str) -> None:
    with _warned_lock:
        if address in _warned:
            return
        _warned.add(address)
    warnings.warn(
        f"connecting to {address} without TLS: anyone who can reach that address (any user "
        "of a shared node, anyone on its network) can run code on the cluster's workers as "
        f"their owner, and read what they hold. Start the cluster with TLS; see {DOCS}.",
        InsecureClusterWarning, stacklevel=4)


def _configured_tls() -> bool:
    import dask

    return bool(dask.config.get("distributed.comm.tls.ca-file", None)
                or dask.config.get("distributed.client.security-loader", None))


def _scheme_host(address: str) -> tuple[str, str]:
    if "://" not in address:  # Dask's default scheme
        address = "tcp://" + address
    parts = urlsplit(address)
    return parts.scheme.lower(), parts.hostname or ""


def _normalize(address: str) -> str:
    return address.strip().rstrip("/").lower()
