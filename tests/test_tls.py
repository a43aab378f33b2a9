"""TLS: init_tls mints a usable private PKI, load_tls refuses bad configuration early, and real gRPC servers
with those certificates accept exactly the clients the cluster CA vouches for."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mesh.transport.tls import ENV, TLS_SERVER_NAME, TlsConfig, init_tls, load_tls

TIMEOUT = 5


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_tls(directory, ["node-a"], hosts=["10.1.2.3", "mesh.example.org"])
    return directory


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated cluster: same names, different CA."""
    directory = tmp_path_factory.mktemp("other-pki")
    init_tls(directory, ["node-a"])
    return directory


def config(directory: Path, name: str, ca_directory: Path | None = None, server_name: str = TLS_SERVER_NAME
           ) -> TlsConfig:
    ca = (ca_directory or directory) / "ca.pem"
    return TlsConfig(cert=(directory / f"{name}.pem").read_bytes(), key=(directory / f"{name}-key.pem").read_bytes(),
                     ca=ca.read_bytes(), server_name=server_name)


@pytest.fixture
def server(pki: Path) -> Iterator[int]:
    """A real gRPC server on 127.0.0.1 with node-a's certificate, requiring client certificates from the CA."""
    srv = grpc.server(futures.ThreadPoolExecutor(4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_secure_port("127.0.0.1:0", config(pki, "node-a").server_credentials())
    assert port
    srv.start()
    try:
        yield port
    finally:
        srv.stop(None).wait(TIMEOUT)


def check(channel: grpc.Channel) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status


def check_fails(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        check(channel)
    return info.value.code()


def tls_channel(target: str, cfg: TlsConfig) -> grpc.Channel:
    return grpc.secure_channel(target, cfg.channel_credentials(), options=cfg.channel_options())


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


# ------------------------------------------------------------------------------------------------ init_tls


def test_init_tls_writes_ca_nodes_and_client(tmp_path: Path) -> None:
    written = init_tls(tmp_path / "certs", ["node-a", "node_b.2"])
    names = ["ca.pem", "ca-key.pem", "node-a.pem", "node-a-key.pem", "node_b.2.pem", "node_b.2-key.pem",
             "client.pem", "client-key.pem"]
    assert written == [tmp_path / "certs" / name for name in names]
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == sorted(names)  # no temporary files left
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.name.endswith("-key.pem") else 0o644), (path, oct(mode))
        assert path.read_bytes().startswith(b"-----BEGIN")


def test_init_tls_without_client(tmp_path: Path) -> None:
    written = init_tls(tmp_path, ["n1"], client=False)
    assert [p.name for p in written] == ["ca.pem", "ca-key.pem", "n1.pem", "n1-key.pem"]
    assert not (tmp_path / "client.pem").exists()


def test_init_tls_certificates(pki: Path) -> None:
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "comfy-mesh CA"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(True, 0)
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign and ca_usage.crl_sign and not ca_usage.digital_signature
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"

    for name, common_name in (("node-a", "node-a"), ("client", "comfy-mesh client")):
        cert = x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == common_name
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [TLS_SERVER_NAME, name, "localhost", "mesh.example.org"]
        assert sans.get_values_for_type(x509.IPAddress) == [
            ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), ipaddress.ip_address("10.1.2.3")]
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and not usage.key_cert_sign
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        key = serialization.load_pem_private_key((pki / f"{name}-key.pem").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        assert key.public_key() == cert.public_key()


def test_init_tls_refuses_to_overwrite(tmp_path: Path) -> None:
    init_tls(tmp_path, ["n1"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match=r"ca\.pem.*force"):
        init_tls(tmp_path, ["n1"])
    (tmp_path / "ca.pem").unlink()
    (tmp_path / "ca-key.pem").unlink()
    with pytest.raises(FileExistsError, match=r"client\.pem"):  # any one existing file is enough
        init_tls(tmp_path, ["n2"])
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == {k: v for k, v in before.items() if not k.startswith("ca")}  # nothing was written

    written = init_tls(tmp_path, ["n1"], force=True)
    assert (tmp_path / "ca.pem").exists()
    assert (tmp_path / "n1.pem").read_bytes() != before["n1.pem"]
    assert len(written) == 6


@pytest.mark.parametrize("nodes, message", [
    ([""], "bad node name"),
    (["a b"], "bad node name"),
    (["../evil"], "bad node name"),
    (["nöde"], "bad node name"),
    (["n1", "n1"], "twice"),
    (["Node", "node"], "twice"),
    (["ca"], "reserved"),
    (["client"], "reserved"),
])
def test_init_tls_rejects_bad_node_names(tmp_path: Path, nodes: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        init_tls(tmp_path, nodes)
    assert list(tmp_path.iterdir()) == []


def test_init_tls_rejects_bad_hosts_and_days(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad host"):
        init_tls(tmp_path, ["n1"], hosts=[""])
    with pytest.raises(ValueError, match="days"):
        init_tls(tmp_path, ["n1"], days=0)
    assert list(tmp_path.iterdir()) == []


def test_init_tls_node_named_client_allowed_without_client_cert(tmp_path: Path) -> None:
    written = init_tls(tmp_path, ["client"], client=False)
    cert = x509.load_pem_x509_certificate(written[2].read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "client"


# ------------------------------------------------------------------------------------------------ load_tls


def test_load_tls_nothing_configured() -> None:
    assert load_tls(env={}) is None
    assert load_tls(env={ENV["cert"]: "", ENV["key"]: ""}) is None  # empty variables count as unset
    assert load_tls(server_name="x", env={}) is None


def test_load_tls_from_arguments(pki: Path) -> None:
    cfg = load_tls(str(pki / "node-a.pem"), str(pki / "node-a-key.pem"), str(pki / "ca.pem"), env={})
    assert cfg == config(pki, "node-a")
    assert cfg.server_name == TLS_SERVER_NAME
    assert cfg.channel_options() == [("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
    no_ca = load_tls(str(pki / "node-a.pem"), str(pki / "node-a-key.pem"), server_name="", env={})
    assert no_ca is not None and no_ca.ca is None and no_ca.channel_options() == []


def test_load_tls_from_env(pki: Path) -> None:
    env = {ENV["cert"]: str(pki / "client.pem"), ENV["key"]: str(pki / "client-key.pem"),
           ENV["ca"]: str(pki / "ca.pem"), ENV["server_name"]: "mesh.internal"}
    cfg = load_tls(env=env)
    assert cfg == replace(config(pki, "client"), server_name="mesh.internal")
    # Arguments win over the environment.
    cfg = load_tls(cert=str(pki / "node-a.pem"), key=str(pki / "node-a-key.pem"), server_name="", env=env)
    assert cfg == replace(config(pki, "node-a"), server_name="")


def test_load_tls_reads_os_environ_by_default(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV["cert"], str(pki / "client.pem"))
    monkeypatch.setenv(ENV["key"], str(pki / "client-key.pem"))
    monkeypatch.delenv(ENV["ca"], raising=False)
    monkeypatch.delenv(ENV["server_name"], raising=False)
    cfg = load_tls()
    assert cfg is not None and cfg.cert == (pki / "client.pem").read_bytes() and cfg.ca is None


@pytest.mark.parametrize("given, message", [
    ({"cert": "client.pem"}, r"client\.pem \(--tls-cert\) given without a TLS private key: set --tls-key or MESH_TLS_KEY"),
    ({"key": "client-key.pem"}, r"client-key\.pem \(--tls-key\) given without a TLS certificate"),
    ({"ca": "ca.pem"}, r"ca\.pem \(--tls-ca\) given without a certificate and key"),
])
def test_load_tls_incomplete_arguments(pki: Path, given: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_tls(**{k: str(pki / v) for k, v in given.items()}, env={})


@pytest.mark.parametrize("given, message", [
    ({"cert": "client.pem"}, r"client\.pem \(MESH_TLS_CERT\) given without a TLS private key"),
    ({"key": "client-key.pem"}, r"client-key\.pem \(MESH_TLS_KEY\) given without a TLS certificate"),
    ({"ca": "ca.pem"}, r"ca\.pem \(MESH_TLS_CA\) given without a certificate and key"),
])
def test_load_tls_incomplete_env(pki: Path, given: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_tls(env={ENV[k]: str(pki / v) for k, v in given.items()})


@pytest.mark.parametrize("which", ["cert", "key", "ca"])
@pytest.mark.parametrize("problem, content, message", [
    ("missing", None, "does not exist"),
    ("directory", None, "cannot be read"),
    ("empty", " \n", "is empty"),
    ("not PEM", "hello, not a certificate\n", "not a PEM file"),
    ("garbled PEM", "-----BEGIN GARBAGE-----\nAAAA\n-----END GARBAGE-----\n", "no readable PEM"),
])
def test_load_tls_bad_files(pki: Path, tmp_path: Path, which: str, problem: str, content: str | None,
                            message: str) -> None:
    paths = {"cert": str(pki / "client.pem"), "key": str(pki / "client-key.pem"), "ca": str(pki / "ca.pem")}
    bad = tmp_path / f"bad-{which}.pem"
    if problem == "directory":
        bad.mkdir()
    elif content is not None:
        bad.write_text(content)
    paths[which] = str(bad)
    for env in (False, True):  # named by option when given as an argument, by variable when from the environment
        with pytest.raises(ValueError) as info:
            if env:
                load_tls(env={ENV[k]: v for k, v in paths.items()})
            else:
                load_tls(**paths, env={})
        text = str(info.value)
        assert message in text and str(bad) in text and "\n" not in text
        assert (ENV[which] if env else f"--tls-{which}") in text


def test_load_tls_mismatched_key(pki: Path, other_pki: Path) -> None:
    with pytest.raises(ValueError, match=r"node-a-key\.pem \(--tls-key\) does not match the certificate .*client\.pem"):
        load_tls(str(pki / "client.pem"), str(pki / "node-a-key.pem"), env={})
    # Same file names, different cluster: still caught.
    with pytest.raises(ValueError, match="does not match"):
        load_tls(env={ENV["cert"]: str(pki / "node-a.pem"), ENV["key"]: str(other_pki / "node-a-key.pem")})


def test_load_tls_encrypted_key(pki: Path, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key((pki / "client-key.pem").read_bytes(), password=None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(ValueError, match="encrypted"):
        load_tls(str(pki / "client.pem"), write(tmp_path / "enc.pem", encrypted), env={})


@pytest.mark.parametrize("days, message", [((-30, -1), "expired on"), ((1, 30), "is not valid before")])
def test_load_tls_refuses_a_certificate_outside_its_validity(tmp_path: Path, days: tuple[int, int],
                                                               message: str) -> None:
    """Every peer would refuse it with a handshake error of its own; the node says it once, at start."""
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "comfy-mesh")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now + datetime.timedelta(days=days[0]))
            .not_valid_after(now + datetime.timedelta(days=days[1])).sign(key, hashes.SHA256()))
    cert_path = write(tmp_path / "c.pem", cert.public_bytes(serialization.Encoding.PEM))
    key_path = write(tmp_path / "k.pem", key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    with pytest.raises(ValueError, match=rf"c\.pem \(--tls-cert\) {message}"):
        load_tls(cert_path, key_path, env={})


# ------------------------------------------------------------------------------------------------ real servers


def test_client_with_cluster_cert_is_served(pki: Path, server: int) -> None:
    cfg = load_tls(str(pki / "client.pem"), str(pki / "client-key.pem"), str(pki / "ca.pem"), env={})
    assert cfg is not None
    assert check(tls_channel(f"127.0.0.1:{server}", cfg)) == health_pb2.HealthCheckResponse.SERVING
    assert check(tls_channel(f"localhost:{server}", cfg)) == health_pb2.HealthCheckResponse.SERVING


def test_server_name_empty_verifies_dialled_host(pki: Path, server: int) -> None:
    cfg = config(pki, "client", server_name="")
    assert check(tls_channel(f"localhost:{server}", cfg)) == health_pb2.HealthCheckResponse.SERVING
    assert check(tls_channel(f"127.0.0.1:{server}", cfg)) == health_pb2.HealthCheckResponse.SERVING


def test_wrong_server_name_fails(pki: Path, server: int) -> None:
    cfg = config(pki, "client", server_name="not-in-the-cert")
    assert check_fails(tls_channel(f"127.0.0.1:{server}", cfg)) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_fails(server: int) -> None:
    assert check_fails(grpc.insecure_channel(f"127.0.0.1:{server}")) == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_fails(pki: Path, server: int) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{server}", credentials,
                                  options=[("grpc.ssl_target_name_override", TLS_SERVER_NAME)])
    assert check_fails(channel) == grpc.StatusCode.UNAVAILABLE


def test_client_cert_from_another_ca_fails(pki: Path, other_pki: Path, server: int) -> None:
    cfg = config(other_pki, "client", ca_directory=pki)  # trusts our CA, but its own cert is from the other one
    assert check_fails(tls_channel(f"127.0.0.1:{server}", cfg)) == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_fails(pki: Path, other_pki: Path, server: int) -> None:
    cfg = config(pki, "client", ca_directory=other_pki)  # a valid cert of ours, but it distrusts our server
    assert check_fails(tls_channel(f"127.0.0.1:{server}", cfg)) == grpc.StatusCode.UNAVAILABLE
