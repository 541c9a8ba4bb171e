"""The Dask side: a tls:// scheduler that lets in only holders of a certificate signed
by the deployment's CA (the gateway and the workers), never a researcher's client."""

from __future__ import annotations

import datetime as dt

import pytest

pytest.importorskip("cryptography")


def _cert(path, name, ca=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (ca[0].subject, ca[1]) if ca else (subject, key)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), True)
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                              x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                              False))
    cert = builder.sign(issuer_key, hashes.SHA256())
    (path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert, key


def _security(path, name, ca_name):
    from distributed.security import Security

    return Security(tls_ca_file=str(path / f"{ca_name}.pem"),
                    tls_client_cert=str(path / f"{name}.pem"),
                    tls_client_key=str(path / f"{name}.key"),
                    tls_scheduler_cert=str(path / f"{name}.pem"),
                    tls_scheduler_key=str(path / f"{name}.key"),
                    tls_worker_cert=str(path / f"{name}.pem"),
                    tls_worker_key=str(path / f"{name}.key"),
                    require_encryption=True)


def test_only_certificate_holders_reach_the_scheduler(tmp_path):
    from distributed import Client, LocalCluster

    ca = _cert(tmp_path, "ca")
    _cert(tmp_path, "cluster", ca)  # scheduler and workers
    _cert(tmp_path, "gateway", ca)  # the gateway's client
    rogue_ca = _cert(tmp_path, "rogue-ca")
    _cert(tmp_path, "rogue", rogue_ca)  # a researcher's self-made certificate

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
                      host="127.0.0.1", dashboard_address=None,
                      security=_security(tmp_path, "cluster", "ca")) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        with Client(address, security=_security(tmp_path, "gateway", "ca"), timeout=10) as c:
            assert c.submit(sum, [1, 2]).result(timeout=10) == 3
        with pytest.raises(Exception):  # noqa: B017 - no TLS at all
            Client(address.replace("tls://", "tcp://"), timeout=2)
        with pytest.raises(Exception):  # noqa: B017 - TLS without a certificate of the CA
            Client(address, security=_security(tmp_path, "rogue", "rogue-ca"), timeout=2)
