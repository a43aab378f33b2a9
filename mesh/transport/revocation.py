"""Revoking one member without rotating the fleet's secret.

A shared secret cannot tell members apart, so revocation rides on mutual TLS: every member presents a
certificate the fleet's CA signed, and its common name is the member's authenticated name (`caller_name`).
A node started with `--revoke NAME`:

- refuses every call whose client certificate names NAME (PERMISSION_DENIED, before the handler runs), Hello and
  Ping included, so the member can neither read, write, gossip nor join;
- keeps NAME out of its ring and never dials it (mesh/membership/driver.py), so no read is routed to it;
- refuses any value whose provenance names NAME, and drops such values it holds when it starts; `mesh purge
  --writer NAME` removes them from members that run without the flag.

The fleet's secret and CA stay as they are; the revoked member keeps a certificate that no node accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc

from mesh.transport.tls import caller_name


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
