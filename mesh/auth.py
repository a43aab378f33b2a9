"""Cluster-secret authentication for every RPC except health.

Peers and the CLI prove they know the cluster secret without sending it: the token in the `x-mesh-token`
metadata is `<unix seconds>.<hex HMAC-SHA256(secret, "comfy-mesh/1/<unix seconds>")>`. The node accepts a
token whose timestamp is within `MAX_SKEW` of its clock, so a token sniffed off the wire stops working after
a few minutes. That is not a substitute for TLS (which slots in as channel credentials on both sides); it
keeps strangers and misconfigured fleets out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

METADATA_KEY = "x-mesh-token"
SECRET_ENV = "MESH_SECRET"
SECRET_FILE_ENV = "MESH_SECRET_FILE"
MAX_SKEW = 300.0
_REFRESH = 60.0
_OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def load_secret(secret_file: str | None = None) -> bytes | None:
    """The secret from a file (flag or MESH_SECRET_FILE) or MESH_SECRET; None means an open, dev-only node."""
    path = secret_file or os.environ.get(SECRET_FILE_ENV)
    if path:
        data = Path(path).read_bytes().strip()
        if not data:
            raise ValueError(f"secret file {path} is empty")
        return data
    env = os.environ.get(SECRET_ENV)
    return env.encode() if env else None


def _digest(secret: bytes, stamp: int) -> str:
    return hmac.new(secret, f"comfy-mesh/1/{stamp}".encode(), hashlib.sha256).hexdigest()


def make_token(secret: bytes, now: float | None = None) -> str:
    stamp = int(time.time() if now is None else now)
    return f"{stamp}.{_digest(secret, stamp)}"


def check_token(secret: bytes, token: str, now: float | None = None) -> bool:
    stamp_text, _, digest = token.partition(".")
    try:
        stamp = int(stamp_text)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - stamp) > MAX_SKEW:
        return False
    return hmac.compare_digest(digest, _digest(secret, stamp))


class TokenSource:
    """Caches the current token so a hot client path does not compute an HMAC per call."""

    def __init__(self, secret: bytes | None) -> None:
        self._secret = secret
        self._lock = threading.Lock()
        self._token = ""
        self._made = 0.0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self._secret is None:
            return ()
        now = time.time()
        with self._lock:
            if now - self._made > _REFRESH:
                self._token, self._made = make_token(self._secret, now), now
            return ((METADATA_KEY, self._token),)


def _deny_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that refuses the call."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster secret")

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC but health with UNAUTHENTICATED unless the token proves the cluster secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHOD_PREFIXES):
            return handler
        for key, value in details.invocation_metadata or ():
            if key == METADATA_KEY and check_token(self._secret, value):
                return handler
        return _deny_like(handler)
