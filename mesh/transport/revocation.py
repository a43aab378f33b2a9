"""Revoking one member without rotating the fleet's secret.

A shared secret cannot tell members apart, so revocation rides on mutual TLS: every member presents a
certificate the fleet's CA signed, and its common name is the member's authenticated name (`caller_name`).
A node started with `--revoke NAME`:

- refuses every call whose client certificate names NAME (PERMISSION_DENIED, before the handler runs), Hello and
  Ping included, so the member can neither read, write, gossip nor join;
- keeps NAME out of its ring and never dials it for a value (mesh/membership/driver.py); and since a member's
  node id is only its claim, a node with revocations admits a member to its ring only once a TLS handshake
  with the member's address showed a certificate of that very name (`certificate_name`): a revoked member
  that answers a seed, a zeroconf advert or gossip under another id stays out, so no read is routed to it;
- refuses any value whose provenance names NAME, and drops such values it holds when it starts; `mesh purge
  --writer NAME` removes them from members that run without the flag.

The fleet's secret and CA stay as they are; the revoked member keeps a certificate that no node accepts.
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from mesh.address import split_hostport
from mesh.transport.tls import TlsConfig, caller_name


class RevocationInterceptor(grpc.ServerInterceptor):
    """Refuses every call from a client certificate whose name is revoked, whatever method it calls."""

    def __init__(self, revoked: Iterable[str]) -> None:
        self.revoked = frozenset(revoked)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not self.revoked:
            return handler
        return _checked(handler, self.revoked)


_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler), ("unary_stream", grpc.unary_stream_rpc_method_handler),
          ("stream_unary", grpc.stream_unary_rpc_method_handler),
          ("stream_stream", grpc.stream_stream_rpc_method_handler))


def _checked(handler: grpc.RpcMethodHandler, revoked: frozenset[str]) -> grpc.RpcMethodHandler:
    """The same handler, refusing a revoked caller before its behaviour runs."""
    for kind, factory in _KINDS:
        behaviour = getattr(handler, kind)
        if behaviour is None:
            continue

        def guarded(request: Any, context: grpc.ServicerContext, behaviour: Any = behaviour) -> Any:
            name = caller_name(context)
            if name is not None and name in revoked:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the certificate {name!r} is revoked in this mesh")
            return behaviour(request, context)

        return factory(guarded, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
    return handler


def certificate_name(address: str, tls: TlsConfig, timeout: float = 3.0) -> str | None:
    """The common name of the certificate the node at `address` presents, checked against our CA; None when
    it cannot be had (unreachable, no TLS, a certificate our CA did not sign).

    gRPC's Python client does not show a caller the server's certificate, so this is one TLS handshake of its
    own (our client certificate included, as the node requires it), made once per member a node admits.
    """
    host, port = split_hostport(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the name that matters is the certificate's own, compared by the caller
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.ca is None:
        return None
    context.load_verify_locations(cadata=tls.ca.decode())
    with tempfile.TemporaryDirectory(prefix="mesh-verify-") as d:  # ssl loads a key pair from files only
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in ((cert, tls.cert), (key, tls.key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(cert, key)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as conn:
            der = conn.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError, ValueError):
        return None
    if der is None:
        return None
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
