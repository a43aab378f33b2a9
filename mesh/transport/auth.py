"""Cluster-secret authentication: both sides prove the secret, and no proof can be replayed.

Why a handshake and not a bare token: a token that proves only "I know the secret at time t" can be harvested
by anyone it is sent to (a rogue host that answers pings) and replayed to any node, for any RPC, for as long
as the clock window lasts; and a node that only proves the secret to others never learns whether they know it.

The protocol (HMAC-SHA256 throughout; nothing secret ever crosses the wire):

1. Hello (open, like health). The caller sends a fresh random nonce. The node answers with a *session*, an
   opaque string only this node process can mint and check (its issue time, randomness and a tag under a
   per-process key), its node id, and `proof = HMAC(secret, "hello", caller nonce, session, node id)`. The
   caller checks the proof: a host without the secret cannot answer it, so it is never trusted or admitted.
2. Every other call carries `x-mesh-auth: <key id>.<session>.<n>.<HMAC(secret, "call", method, session, n)>`
   with a fresh counter n. The node checks the tag, that it minted the session less than `SESSION_TTL` ago,
   and that n was not used before in that session (a sliding window, as IPsec does). A proof is therefore
   bound to one node process (sessions of other nodes, or of this node before a restart, are unknown to it),
   to one method, and to one use; and no clock has to agree between hosts.

Key rotation: a `Keyring` holds several secrets; callers sign with the first, nodes accept any. See README.

What this does not give: secrecy or integrity of the bytes against someone *on the path*; that is TLS
(mesh/transport/tls.py), which stacks with this under the same secret.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import secrets as _random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from mesh.pb import mesh_pb2 as pb

log = logging.getLogger(__name__)

METADATA_KEY = "x-mesh-auth"
SECRET_ENV = "MESH_SECRET"
SECRET_FILE_ENV = "MESH_SECRET_FILE"
SESSION_TTL = 300.0          # seconds a node honours a session it minted
RENEW_AFTER = 240.0          # seconds a caller uses a session before it asks for a fresh one
REPLAY_WINDOW = 4096         # counters tracked per session: calls may arrive out of order, never twice
MAX_SESSIONS = 16384         # sessions with replay state one node keeps (only callers with the secret add any)
WRONG_SECRET = "we do not share a cluster secret"  # the start of a Hello's AuthError when the secrets differ
STALE = "stale session"      # status detail that tells a caller to say Hello again (node restarted, TTL passed)
HELLO_METHOD = "/comfymesh.v1.Mesh/Hello"
# A Hello's request in headers, "<key id>.<nonce hex>": a node answers it before reading any message, so callers
# that open Hellos and never send anything (a squat) hold nothing this Hello would wait for. Sent beside the
# message, which older nodes read (and which newer ones read from older callers).
HELLO_KEY = "x-mesh-hello"
# Open to anyone: health, the handshake itself, and reflection (it describes only the public proto/ contract).
_OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", HELLO_METHOD, "/grpc.reflection.")
_NONCE_BYTES = (16, 64)
_MAX_HEADER = 256


class AuthError(Exception):
    """The other side did not prove the cluster secret (or sent something malformed)."""


def key_id(secret: bytes) -> str:
    """A short public name for a secret, so a node with several knows which one a caller used."""
    return hashlib.sha256(b"comfy-mesh key id\0" + secret).hexdigest()[:12]


class Keyring:
    """The cluster secrets this process knows: the first signs, every one verifies (rotation without downtime).

    Mutable under a lock so that `mesh serve` can reload its secret file (SIGHUP) while serving.
    """

    def __init__(self, secrets: Iterable[bytes]) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, bytes] = {}
        self._current = ""
        self.replace(secrets)

    def replace(self, secrets: Iterable[bytes]) -> None:
        keys = [bytes(s) for s in secrets]
        if not keys or any(not k for k in keys):
            raise ValueError("a keyring needs at least one non-empty secret")
        with self._lock:
            self._keys = {key_id(k): k for k in keys}
            self._current = key_id(keys[0])

    @property
    def current(self) -> tuple[str, bytes]:
        with self._lock:
            return self._current, self._keys[self._current]

    def lookup(self, kid: str) -> bytes | None:
        with self._lock:
            return self._keys.get(kid)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._keys)


Secret = bytes | Sequence[bytes] | Keyring | None


def as_keyring(secret: Secret) -> Keyring | None:
    """Callers may hand one secret, several (first signs), a shared Keyring, or None (an open dev node)."""
    if secret is None or isinstance(secret, Keyring):
        return secret
    if isinstance(secret, (bytes, bytearray)):
        return Keyring([bytes(secret)])
    return Keyring(secret)


def parse_secrets(data: bytes, source: str) -> list[bytes]:
    """Secrets from a file's bytes: one per line, the first is current; blank and '#' lines are skipped."""
    keys = [line.strip() for line in data.splitlines()]
    keys = [k for k in keys if k and not k.startswith(b"#")]
    if not keys:
        raise ValueError(f"secret file {source} is empty")
    return keys


def load_secrets(secret_file: str | None = None, env: Mapping[str, str] | None = None) -> list[bytes] | None:
    """The secrets from a file (flag or MESH_SECRET_FILE) or MESH_SECRET; None means no secret: a node that
    serves its own host alone (mesh/node.py)."""
    env = os.environ if env is None else env
    path = secret_file or env.get(SECRET_FILE_ENV)
    if path:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read the secret file {path}: {e.strerror or e}") from None
        return parse_secrets(data, path)
    value = env.get(SECRET_ENV)
    if value and not value.strip():
        raise ValueError(f"{SECRET_ENV} is blank: set a real secret (`mesh secret FILE` makes one) or unset it")
    return [value.strip().encode()] if value else None


def load_keyring(secret_file: str | None = None, env: Mapping[str, str] | None = None) -> Keyring | None:
    keys = load_secrets(secret_file, env)
    return None if keys is None else Keyring(keys)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.digest(secret, b"\0".join(parts), "sha256")


def hello_proof(secret: bytes, client_nonce: bytes, session: str, node_id: str, address: str) -> bytes:
    return _mac(secret, b"comfy-mesh/2/hello", client_nonce, session.encode(), node_id.encode(), address.encode())


def reply_tag(secret: bytes, method: str, session: str, counter: int, payload: bytes) -> bytes:
    """Binds a reply to the call it answers (its session and counter): a relay can neither alter nor reuse it."""
    return _mac(secret, b"comfy-mesh/2/reply", method.encode(), session.encode(), b"%d" % counter, payload)


def parse_proof(value: str) -> tuple[str, str, int] | None:
    """(key id, session, counter) of a call proof as sent in METADATA_KEY, or None if it is not one."""
    parts = value.split(".")
    if len(value) > _MAX_HEADER or len(parts) != 4 or not parts[2].isdigit() or len(parts[2]) > 18:
        return None
    return parts[0], parts[1], int(parts[2])


def call_tag(secret: bytes, method: str, session: str, counter: int) -> str:
    return _mac(secret, b"comfy-mesh/2/call", method.encode(), session.encode(), b"%d" % counter).hex()


def hello_header(request: pb.HelloRequest) -> str:
    """The HELLO_KEY header that carries `request` (its key id and nonce)."""
    return f"{request.key_id}.{request.client_nonce.hex()}"


def parse_hello_header(value: str) -> pb.HelloRequest | None:
    """The Hello request a HELLO_KEY header carries, or None if it is not one."""
    kid, dot, nonce = value.partition(".")
    if not dot or len(value) > _MAX_HEADER:
        return None
    try:
        return pb.HelloRequest(key_id=kid, client_nonce=bytes.fromhex(nonce))
    except ValueError:
        return None


# -- the caller's side ---------------------------------------------------------------------------------------

@dataclass
class _Session:
    token: str
    kid: str
    secret: bytes
    node_id: str
    address: str
    renew_at: float
    counter: Iterable[int] = field(default_factory=lambda: itertools.count(1))


Metadata = tuple[tuple[str, str], ...]


class Hello(Protocol):
    """Sends a Hello to the node: the request, and headers to send beside it (the request again, in HELLO_KEY;
    on a renewal, a proof of the session being renewed, which admits it ahead of strangers)."""

    def __call__(self, request: pb.HelloRequest, metadata: Metadata = ()) -> pb.HelloReply: ...


class ClientAuth:
    """Signs a caller's RPCs to one node, after that node proved the secret (one Hello per session)."""

    def __init__(self, keyring: Keyring | None) -> None:
        self.keyring = keyring
        self._lock = threading.Lock()
        self._session: _Session | None = None

    @property
    def node_id(self) -> str | None:
        """The node id the node proved, once a Hello succeeded."""
        s = self._session
        return s.node_id if s else None

    @property
    def address(self) -> str | None:
        """The address the node proved it advertises, once a Hello succeeded."""
        s = self._session
        return s.address if s else None

    def check_reply(self, proof_value: str, method: str, payload: bytes, tag: bytes) -> bool:
        """Whether `tag` proves that the node of this session answered the call sent with `proof_value`."""
        s = self._session
        parsed = parse_proof(proof_value)
        if s is None or parsed is None or parsed[1] != s.token:
            return False
        return hmac.compare_digest(tag, reply_tag(s.secret, method, s.token, parsed[2], payload))

    def metadata(self, method: str, hello: Hello) -> tuple[tuple[str, str], ...]:
        if self.keyring is None:
            return ()
        s = self._session
        if s is None or time.monotonic() >= s.renew_at:
            s = self.handshake(hello)
        n = next(s.counter)  # type: ignore[call-overload]
        return ((METADATA_KEY, f"{s.kid}.{s.token}.{n}.{call_tag(s.secret, method, s.token, n)}"),)

    def handshake(self, hello: Hello, force: bool = False) -> _Session:
        """Ask the node for a session and check its proof; raises AuthError if it does not know the secret."""
        assert self.keyring is not None
        with self._lock:
            s = self._session
            if s is not None and not force and time.monotonic() < s.renew_at:
                return s  # another thread just did it
            kid, _ = self.keyring.current
            nonce = _random.token_bytes(_NONCE_BYTES[0])
            started = time.monotonic()
            request = pb.HelloRequest(client_nonce=nonce, key_id=kid)
            metadata: Metadata = ((HELLO_KEY, hello_header(request)),)
            if s is not None and not force:  # a renewal: the session still holds, and its proof says so
                n = next(s.counter)  # type: ignore[call-overload]
                metadata += ((METADATA_KEY, f"{s.kid}.{s.token}.{n}.{call_tag(s.secret, HELLO_METHOD, s.token, n)}"),)
            reply = hello(request, metadata)
            secret = self.keyring.lookup(reply.key_id)
            if secret is None:
                raise AuthError(f"{WRONG_SECRET} (the node proves key {reply.key_id or '(none)'}, "
                                f"we hold {', '.join(self.keyring.ids())})")
            expected = hello_proof(secret, nonce, reply.session, reply.node_id, reply.address)
            if not reply.session or not hmac.compare_digest(expected, reply.proof):
                raise AuthError("the node did not prove the cluster secret")
            ttl = min(RENEW_AFTER, max(1.0, reply.session_ttl - 10.0)) if reply.session_ttl else RENEW_AFTER
            self._session = _Session(reply.session, reply.key_id, secret, reply.node_id, reply.address,
                                     started + ttl)
            return self._session

    def reset(self) -> None:
        with self._lock:
            self._session = None


# -- the node's side -----------------------------------------------------------------------------------------

class _Window:
    """Counters seen in one session: the highest, and a bitmap of the REPLAY_WINDOW below it."""

    __slots__ = ("top", "bits")

    def __init__(self) -> None:
        self.top = 0
        self.bits = 0

    def accept(self, n: int) -> bool:
        if n > self.top:
            shift = n - self.top
            # A jump past the whole window forgets it at once (never a shift by billions of bits).
            self.bits = 1 if shift >= REPLAY_WINDOW else ((self.bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.top = n
            return True
        offset = self.top - n
        if offset >= REPLAY_WINDOW or (self.bits >> offset) & 1:
            return False
        self.bits |= 1 << offset
        return True


class ServerAuth:
    """Mints sessions, answers Hello, and checks every call's proof, at most once each."""

    def __init__(self, keyring: Keyring, node_id: str = "", ttl: float = SESSION_TTL,
                 max_sessions: int = MAX_SESSIONS, clock: Callable[[], float] = time.monotonic) -> None:
        self.keyring = keyring
        self.node_id = node_id  # set by the node once it knows its port
        self.address = ""       # the address it advertises, likewise
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._clock = clock
        self._local_key = _random.token_bytes(32)  # sessions die with the process: replay state does too
        self._epoch = clock()
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, tuple[int, _Window]] = OrderedDict()  # session -> (issued ms, window)
        self._floor_ms = -1  # sessions issued at or before this were evicted: refused as stale

    def _mint(self) -> str:
        issued_ms = int((self._clock() - self._epoch) * 1000)
        body = f"{issued_ms:x}-{_random.token_hex(12)}"
        return f"{body}-{_mac(self._local_key, body.encode())[:12].hex()}"

    def _issued_ms(self, session: str) -> int | None:
        """When this process minted `session`, or None if it did not (forged, another node's, before a restart)."""
        body, _, tag = session.rpartition("-")
        issued, _, _ = body.partition("-")
        if len(session) > 80 or not tag or not issued:
            return None
        if not hmac.compare_digest(tag, _mac(self._local_key, body.encode())[:12].hex()):
            return None
        return int(issued, 16)

    def hello(self, request: pb.HelloRequest, metadata: Metadata = ()) -> pb.HelloReply:
        """The answer to a Hello. `metadata` (what a caller sends beside it) is the servicer's to admit by
        (mesh/server.py); accepted here so that this method can stand in for a node's Hello (a ClientAuth's
        `hello`) in process."""
        if not _NONCE_BYTES[0] <= len(request.client_nonce) <= _NONCE_BYTES[1]:
            raise AuthError(f"a Hello nonce has {_NONCE_BYTES[0]} to {_NONCE_BYTES[1]} bytes")
        secret = self.keyring.lookup(request.key_id) if len(request.key_id) <= 64 else None
        kid, current = self.keyring.current
        if secret is None:
            secret = current
        else:
            kid = request.key_id
        session = self._mint()
        return pb.HelloReply(session=session, node_id=self.node_id, key_id=kid, session_ttl=self.ttl,
                             address=self.address,
                             proof=hello_proof(secret, request.client_nonce, session, self.node_id, self.address))

    def reply_tag(self, proof_value: str, method: str, payload: bytes) -> bytes:
        """The tag of a reply to a call that came with `proof_value` (already checked by the interceptor)."""
        parsed = parse_proof(proof_value)
        secret = self.keyring.lookup(parsed[0]) if parsed else None
        if parsed is None or secret is None:
            return b""
        return reply_tag(secret, method, parsed[1], parsed[2], payload)

    def check(self, method: str, value: str) -> str | None:
        """None if `value` is a fresh, valid proof for `method`; else why not (never echoing the value)."""
        parsed = parse_proof(value)
        if parsed is None:
            return "malformed proof"
        kid, session, counter = parsed
        tag = value.rsplit(".", 1)[1]
        secret = self.keyring.lookup(kid)
        if secret is None:
            return "unknown cluster secret"
        if counter < 1 or not hmac.compare_digest(tag, call_tag(secret, method, session, counter)):
            return "wrong cluster secret"
        try:
            issued = self._issued_ms(session)
        except ValueError:
            issued = None
        if issued is None:
            return STALE  # signed with the secret, but not a session of this process: it restarted
        now_ms = int((self._clock() - self._epoch) * 1000)
        if now_ms - issued > self.ttl * 1000 or issued <= self._floor_ms:
            return STALE
        with self._lock:
            item = self._windows.get(session)
            if item is None:
                while len(self._windows) >= self.max_sessions:
                    _, (old_issued, _) = self._windows.popitem(last=False)
                    self._floor_ms = max(self._floor_ms, old_issued)
                if issued <= self._floor_ms:
                    return STALE
                item = self._windows[session] = (issued, _Window())
                self._expire(now_ms)
            if not item[1].accept(counter):
                return "replayed proof"
        return None

    def _expire(self, now_ms: int) -> None:
        """Drop replay state of sessions past their TTL (they are refused by age from now on)."""
        limit = now_ms - self.ttl * 1000
        for session, (issued, _) in list(self._windows.items())[:64]:
            if issued < limit:
                del self._windows[session]


class RateLimitedLog:
    """One warning per `every` seconds, saying how many were held back: refused callers cannot flood the log."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self._log = logger
        self._every = every
        self._lock = threading.Lock()
        self._last = -1e9
        self._held = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._every:
                self._held += 1
                return
            held, self._held, self._last = self._held, 0, now
        self._log.warning(message + (f" ({held} more refused since the last warning)" if held else ""), *args)


def _deny_like(handler: grpc.RpcMethodHandler, reason: str, on_deny: Callable[[str, str], None]
               ) -> grpc.RpcMethodHandler:
    """A handler that refuses the call at once, before its request is read.

    Always request-streaming, whatever the method's shape: for a unary request, gRPC's synchronous server reads
    the message on a pool thread before the handler runs, so a refused caller that never sends it would hold
    that thread. A stream handler starts at once, and never reads.
    """

    def deny(_requests: Any, context: grpc.ServicerContext) -> Any:
        on_deny(context.peer(), reason)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kwargs = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    return grpc.stream_unary_rpc_method_handler(deny, **kwargs)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC but health and Hello with UNAUTHENTICATED unless it carries a fresh, valid proof."""

    def __init__(self, auth: ServerAuth) -> None:
        self.auth = auth
        self._warn = RateLimitedLog(log)

    def _on_deny(self, peer: str, reason: str) -> None:
        if reason != STALE:  # a caller of a restarted node: it says Hello again, nothing to report
            self._warn.warning("refused a call from %s: %s", peer, reason)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHOD_PREFIXES):
            return handler
        reason = "missing proof of the cluster secret"
        for key, value in details.invocation_metadata or ():
            if key == METADATA_KEY:
                reason = self.auth.check(details.method, value) or ""
                break
        return handler if not reason else _deny_like(handler, reason, self._on_deny)
