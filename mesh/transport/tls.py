"""TLS for node-to-node and client-to-node gRPC: loading certificates, and minting a private cluster CA.

gRPC's SSL credentials encrypt every connection; when a CA bundle is configured they also authenticate both
ends (mutual TLS): a node only accepts clients whose certificate that CA signed, and a client only talks to
servers whose certificate it signed. Trust therefore comes from a private cluster CA (`mesh tls init` writes
one with `init_tls`), not from public CAs or DNS.

Nodes are reached by whatever address works: a LAN IP, an mDNS name, a NAT'd public address, a seed list
entry. Rather than putting every such address into every certificate, each certificate from `init_tls`
carries the fixed DNS name `comfy-mesh` (`TLS_SERVER_NAME`) and clients verify that name whatever they dialled
(gRPC's `ssl_target_name_override`). Only the cluster CA can issue a certificate with that name that verifies,
so a node reached by any address still proves it belongs to the cluster. An operator who brings their own PKI,
with certificates naming real hosts, sets `server_name` to "" so clients verify the host name they dialled.

Environment (used when the corresponding argument is not given): MESH_TLS_CERT, MESH_TLS_KEY, MESH_TLS_CA
(file paths) and MESH_TLS_SERVER_NAME.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.files import write_atomic

__all__ = ["ENV", "TLS_SERVER_NAME", "TlsConfig", "init_tls", "load_tls"]

TLS_SERVER_NAME = "comfy-mesh"  # the DNS SAN every certificate from init_tls carries
ENV = {"cert": "MESH_TLS_CERT", "key": "MESH_TLS_KEY", "ca": "MESH_TLS_CA", "server_name": "MESH_TLS_SERVER_NAME"}

# The command-line spelling of each setting, so an error can say where a bad value came from.
_OPTION = {"cert": "--tls-cert", "key": "--tls-key", "ca": "--tls-ca", "server_name": "--tls-server-name"}
_WHAT = {"cert": "TLS certificate", "key": "TLS private key", "ca": "TLS CA bundle"}
_NODE_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Backdate certificates a little so a node whose clock is slightly behind the CA's accepts them at once.
_CLOCK_SLACK = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class TlsConfig:
    """PEM material for one node or client; the same certificate serves both as server and as client."""

    cert: bytes  # PEM certificate chain of this node/client
    key: bytes  # PEM private key
    ca: bytes | None  # PEM CA bundle; when set, servers require and verify client certs (mTLS) and clients verify servers against it
    server_name: str = TLS_SERVER_NAME  # name clients verify in the server certificate; "" = the host dialled

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for `add_secure_port`. With a CA, clients without a certificate it signed are refused."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for `secure_channel`: present our certificate, verify the server against the CA.

        Without a CA gRPC falls back to its default (public) roots, which suits an operator's own PKI only.
        """
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def channel_options(self) -> list[tuple[str, str]]:
        """Channel options that make the client verify `server_name` instead of the address it dialled."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def caller_name(context: grpc.ServicerContext) -> str | None:
    """The authenticated name of a caller: the common name of its client certificate (mutual TLS), else None.

    Only a certificate the fleet's CA signed gets this far, so the name is as good as the CA: it is what
    provenance records and what revocation refuses. Without mutual TLS every member holds the same secret and
    no call can be told apart from another member's.
    """
    names = context.auth_context().get("x509_common_name") or ()
    return names[0].decode("utf-8", "replace") if names else None


def subject_name(pem: bytes) -> str | None:
    """The common name of the first certificate in a PEM chain (a member's name under mutual TLS)."""
    names = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def load_tls(cert: str | None = None, key: str | None = None, ca: str | None = None,
             server_name: str | None = None, env: Mapping[str, str] | None = None,
             given_by: Mapping[str, str] | None = None) -> TlsConfig | None:
    """Paths from arguments, else from MESH_TLS_* env vars (env defaults to os.environ). None when neither cert nor key given.

    Everything is checked here, at startup, so a typo or a stale key fails with a one-line ValueError naming the
    file and the option or environment variable it came from, rather than as an opaque handshake error on the
    first connection: only one of cert/key given, a CA without cert/key, a missing, unreadable, empty or non-PEM
    file, or a key that does not belong to the certificate.
    """
    environ = os.environ if env is None else env
    given = {"cert": cert, "key": key, "ca": ca}
    paths: dict[str, tuple[str, str]] = {}  # setting -> (path, where it came from)
    for name, value in given.items():
        if value:  # `given_by`: where an argument came from, when not its option ("tls_cert in FILE")
            paths[name] = (value, (given_by or {}).get(name, _OPTION[name]))
        elif environ.get(ENV[name]):
            paths[name] = (environ[ENV[name]], ENV[name])

    if "cert" not in paths and "key" not in paths:
        if "ca" in paths:
            path, source = paths["ca"]
            raise ValueError(f"{_WHAT['ca']} {path} ({source}) given without a certificate and key: "
                             f"set {_either('cert')} and {_either('key')} too")
        return None
    for have, missing in (("cert", "key"), ("key", "cert")):
        if have in paths and missing not in paths:
            path, source = paths[have]
            raise ValueError(f"{_WHAT[have]} {path} ({source}) given without a {_WHAT[missing]}: "
                             f"set {_either(missing)} too")

    data = {name: _read_pem(name, path, source) for name, (path, source) in paths.items()}
    _check_pair(data["cert"], data["key"], paths["cert"], paths["key"])
    if "ca" in data:
        _load_certificates(data["ca"], *paths["ca"], what=_WHAT["ca"])

    if server_name is None:
        server_name = environ.get(ENV["server_name"], TLS_SERVER_NAME)
    return TlsConfig(cert=data["cert"], key=data["key"], ca=data.get("ca"), server_name=server_name)


def _either(name: str) -> str:
    return f"{_OPTION[name]} or {ENV[name]}"


def _read_pem(name: str, path: str, source: str) -> bytes:
    """The file's bytes, refusing the mistakes that would otherwise surface only as a failed handshake."""
    where = f"{_WHAT[name]} {path} ({source})"
    try:
        data = Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where} does not exist") from None
    except OSError as e:
        raise ValueError(f"{where} cannot be read: {e.strerror or e}") from None
    if not data.strip():
        raise ValueError(f"{where} is empty")
    if b"-----BEGIN" not in data:
        raise ValueError(f"{where} is not a PEM file (no '-----BEGIN' line)")
    return data


def _load_certificates(data: bytes, path: str, source: str, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{what} {path} ({source}) holds no readable PEM certificate") from None


def _check_pair(cert: bytes, key: bytes, cert_from: tuple[str, str], key_from: tuple[str, str]) -> None:
    """The key must be the private half of the first (leaf) certificate, or no peer could ever verify us."""
    leaf = _load_certificates(cert, *cert_from, what=_WHAT["cert"])[0]
    where = f"{_WHAT['key']} {key_from[0]} ({key_from[1]})"
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:
        raise ValueError(f"{where} is encrypted; gRPC needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):  # malformed, not a key, or a key type cryptography can't load
        raise ValueError(f"{where} holds no readable PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ValueError(f"{where} does not match the certificate {cert_from[0]} ({cert_from[1]})")
    # Every peer would refuse it, each with a handshake error of its own: say it once, at start.
    now = datetime.datetime.now(datetime.timezone.utc)
    cert_where = f"{_WHAT['cert']} {cert_from[0]} ({cert_from[1]})"
    if leaf.not_valid_after_utc < now:
        raise ValueError(f"{cert_where} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: make new "
                         "certificates (mesh tls init)")
    if leaf.not_valid_before_utc > now:
        raise ValueError(f"{cert_where} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: "
                         "is this host's clock right?")


def init_tls(directory: Path, nodes: Sequence[str], hosts: Sequence[str] = (), days: int = 825, client: bool = True,
             force: bool = False) -> list[Path]:
    """Writes a new CA (ca.pem, ca-key.pem) and per-node certificate+key (<node>.pem, <node>-key.pem), plus
    client.pem/client-key.pem for CLIs and ComfyUI providers when client=True. Returns the paths written.

    This is the whole PKI a private cluster needs: every leaf certificate is good both as a server and as a
    client (serverAuth + clientAuth) and names `comfy-mesh`, the node name, localhost, 127.0.0.1, ::1 and each
    of `hosts` (an IP when it parses as one, else a DNS name). Keys are EC P-256. Every file is written whole to
    a temporary file and renamed, key files with mode 0600, so a crash never leaves a half-written key and a
    key is never readable by others, not even briefly. Existing files are not overwritten unless `force`:
    replacing a CA silently would cut the running cluster off from every node still holding the old one.
    """
    directory = Path(directory)
    leaves = [(name, name) for name in _check_names(nodes, client)]  # (file stem, subject CN)
    if client:
        leaves.append(("client", "comfy-mesh client"))
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    extra = [_general_name(host) for host in hosts]

    files = [directory / "ca.pem", directory / "ca-key.pem"]
    for name, _ in leaves:
        files += [directory / f"{name}.pem", directory / f"{name}-key.pem"]
    existing = [str(path) for path in files if path.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use force to replace them)")

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - _CLOCK_SLACK, now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "comfy-mesh CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    contents: list[bytes] = [_cert_pem(ca_cert), _key_pem(ca_key)]
    for name, common_name in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        sans = _unique([x509.DNSName(TLS_SERVER_NAME), x509.DNSName(name), x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
                        *extra])
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            _builder(subject, ca_name, key.public_key(), not_before, not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        contents += [_cert_pem(cert), _key_pem(key)]

    directory.mkdir(parents=True, exist_ok=True)
    for path, data in zip(files, contents):
        write_atomic(path, data, 0o600 if path.name.endswith("-key.pem") else 0o644)
    return files


def _check_names(nodes: Sequence[str], client: bool) -> list[str]:
    """Node names become file names and DNS names, so only a safe alphabet, and no two may share a file."""
    if isinstance(nodes, str):
        raise TypeError("nodes must be a sequence of node names, not one string")
    reserved = {"ca", "client"} if client else {"ca"}
    seen: set[str] = set()
    for name in nodes:
        if not _NODE_NAME.fullmatch(name):
            raise ValueError(f"bad node name {name!r}: use letters, digits, '.', '_' and '-'")
        if name.lower() in reserved:
            raise ValueError(f"node name {name!r} is reserved: its files would clash with {name.lower()}.pem")
        if name.lower() in seen:  # case-insensitive file systems would put both in one file
            raise ValueError(f"node name {name!r} is given twice")
        seen.add(name.lower())
    return list(nodes)


def _general_name(host: str) -> x509.GeneralName:
    text = host.strip().strip("[]")
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"bad host {host!r}: give an IP address or a DNS name")
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        return x509.DNSName(text)
    except ValueError:  # non-ASCII: DNS names must be given in their xn-- form
        raise ValueError(f"bad host {host!r}: give an IP address or an ASCII DNS name") from None


def _unique(names: list[x509.GeneralName]) -> list[x509.GeneralName]:
    return list(dict.fromkeys(names))


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             not_before: datetime.datetime, not_after: datetime.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
