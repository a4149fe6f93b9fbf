"""TLS and mutual TLS, with certificates made here, through real channels and grpcurl."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relman.v1 import auth_pb2, auth_pb2_grpc
from shared.persistence.models import Role
from tests.harness import RelmanProcess, bearer, env_for, grpcurl


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer_key, issuer_name, *, ca: bool, usage=None, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(directory: Path, name: str, key, cert) -> tuple[Path, Path]:
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _issue("relman test CA", None, None, ca=True)
    _, ca_path = _write(directory, "ca", ca_key, ca_cert)
    server_key, server_cert = _issue(
        "localhost", ca_key, ca_cert.subject, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    server_key_path, server_cert_path = _write(directory, "server", server_key, server_cert)
    client_key, client_cert = _issue(
        "ci-bot", ca_key, ca_cert.subject, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    client_key_path, client_cert_path = _write(directory, "client", client_key, client_cert)
    return {
        "ca": ca_path,
        "server_cert": server_cert_path,
        "server_key": server_key_path,
        "client_cert": client_cert_path,
        "client_key": client_key_path,
    }


async def _start(db_url, pki, *, mutual: bool) -> tuple[RelmanProcess, str]:
    settings = {
        "DEPLOY_SVC_ADDR": "127.0.0.1:0",
        "TLS_CERT": str(pki["server_cert"]),
        "TLS_KEY": str(pki["server_key"]),
    }
    if mutual:
        settings["TLS_CLIENT_CA"] = str(pki["ca"])
    process = await RelmanProcess.start(["-m", "deploy_svc"], env_for(db_url, **settings))
    address = (await process.wait_listening("deploy_svc"))["deploy_svc"]
    mode = "mutual TLS" if mutual else "TLS"
    assert f"({mode})" in await process.wait_for_line("listening on")
    return process, "localhost:" + address.rpartition(":")[2]


def _credentials(pki, *, client_cert: bool) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client_key"].read_bytes() if client_cert else None,
        certificate_chain=pki["client_cert"].read_bytes() if client_cert else None,
    )


async def _who_am_i(address: str, credentials, token: str):
    async with grpc.aio.secure_channel(address, credentials) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="relman.v1.AuthService"), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        return await auth_pb2_grpc.AuthServiceStub(channel).WhoAmI(
            auth_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=10
        )


async def _grpcurl(db_url, *args: str) -> tuple[int, str]:
    code, out, err = await grpcurl(*args, env=env_for(db_url))
    return code, out + err


async def test_tls_through_a_channel_and_grpcurl(db_url, pki, tokens):
    process, address = await _start(db_url, pki, mutual=False)
    try:
        me = await _who_am_i(address, _credentials(pki, client_cert=False), tokens[Role.LEAD])
        assert me.username == "lena"
        code, out = await _grpcurl(db_url, "-cacert", str(pki["ca"]), address, "list")
        assert code == 0, out
        assert "relman.v1.DeployService" in out
        code, out = await _grpcurl(db_url, "-plaintext", "-max-time", "3", address, "list")
        assert code != 0  # plaintext is not spoken any more
    finally:
        assert await process.stop() == 0


async def test_mutual_tls_requires_a_client_certificate(db_url, pki, tokens):
    process, address = await _start(db_url, pki, mutual=True)
    try:
        me = await _who_am_i(address, _credentials(pki, client_cert=True), tokens[Role.LEAD])
        assert me.username == "lena"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _who_am_i(address, _credentials(pki, client_cert=False), tokens[Role.LEAD])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        with_cert = [
            "-cacert",
            str(pki["ca"]),
            "-cert",
            str(pki["client_cert"]),
            "-key",
            str(pki["client_key"]),
        ]
        code, out = await _grpcurl(
            db_url,
            *with_cert,
            "-H",
            f"authorization: Bearer {tokens[Role.LEAD]}",
            address,
            "relman.v1.AuthService/WhoAmI",
        )
        assert code == 0, out
        assert '"username": "lena"' in out
        code, out = await _grpcurl(db_url, "-cacert", str(pki["ca"]), address, "list")
        assert code != 0, out
    finally:
        assert await process.stop() == 0
