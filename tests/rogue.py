"""A rogue host for attack tests: plays a mesh node without knowing the cluster secret.

Used in process by tests/test_trust.py, and as a process of its own inside a network namespace
(`python -m tests.rogue --listen HOST:PORT --status FILE`) where it also advertises itself over zeroconf with a
huge capacity, as an attacker on the LAN would.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

import mesh
from mesh.transport.auth import METADATA_KEY
from mesh.pb import mesh_pb2 as pb
from mesh.transport.wire import SERVICE, MiB, encode_chunk_message, make_header


def forged_value(key: str, data: bytes) -> Iterator[bytes]:
    """A Get reply stream for `key` that any verifier accepts (a valid checksum): bytes its sender made up."""
    yield pb.GetReply(header=make_header(key, data, 1 * MiB).to_pb()).SerializeToString()
    yield encode_chunk_message(0, pb.CHUNK_RAW, len(data), data)


@dataclass
class Rogue:
    """A gRPC server that plays a mesh node without the secret: it advertises a huge capacity, accepts every
    put, serves its own bytes (with a valid checksum) for any key, and records every proof it is sent."""

    address: str = ""
    server: grpc.Server | None = None
    hellos: int = 0
    puts: int = 0
    gets: int = 0
    proofs: list[str] = field(default_factory=list)

    def start(self, listen: str = "127.0.0.1:0") -> Rogue:
        def record(context: grpc.ServicerContext) -> None:
            self.proofs += [v for k, v in context.invocation_metadata() if k == METADATA_KEY]

        def hello(request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
            self.hellos += 1
            return pb.HelloReply(session="s-1-x", node_id="rogue", key_id=request.key_id, proof=os.urandom(32),
                                 session_ttl=300)

        def me() -> pb.Member:
            return pb.Member(node_id="rogue", address=self.address, capacity=1 << 50, incarnation=1)

        def ping(request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
            record(context)
            return pb.PingReply(responder=me(), members=[me()])

        def put(requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PutReply:
            record(context)
            self.puts += 1
            for _ in requests:
                pass
            return pb.PutReply(stored=True, replicas=1)

        def get(request: pb.GetRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
            record(context)
            self.gets += 1
            yield from forged_value(request.key, b"rogue bytes for " + request.key.encode())

        def has(request: pb.HasRequest, context: grpc.ServicerContext) -> pb.HasReply:
            record(context)
            return pb.HasReply(present=[True] * len(request.keys))

        u = grpc.unary_unary_rpc_method_handler
        handlers = {
            "Hello": u(hello, pb.HelloRequest.FromString, pb.HelloReply.SerializeToString),
            "Ping": u(ping, pb.PingRequest.FromString, pb.PingReply.SerializeToString),
            "Has": u(has, pb.HasRequest.FromString, pb.HasReply.SerializeToString),
            "Put": grpc.stream_unary_rpc_method_handler(put, None, pb.PutReply.SerializeToString),
            "Get": grpc.unary_stream_rpc_method_handler(get, pb.GetRequest.FromString, None),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        host = listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.server.add_insecure_port(listen)}"
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()


    def status(self) -> dict[str, int]:
        return {"hellos": self.hellos, "puts": self.puts, "gets": self.gets, "proofs": len(self.proofs)}




@dataclass
class Relay:
    """A host without the secret that relays every call to a real node `target` (so its Hello proofs are real),
    rewrites the target's address to its own in heartbeat replies, and answers gets with its own bytes: the
    attack that once had a node admit it as the target and cache its forged values."""

    target: str
    address: str = ""
    server: grpc.Server | None = None
    hellos: int = 0
    gets: int = 0
    puts: int = 0

    def start(self) -> Relay:
        up = grpc.insecure_channel(self.target)

        def forward(name: str) -> grpc.RpcMethodHandler:
            call = up.unary_unary(f"/{SERVICE}/{name}", request_serializer=None, response_deserializer=None)

            def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
                if name == "Hello":
                    self.hellos += 1
                md = [(k, v) for k, v in context.invocation_metadata() if k == METADATA_KEY]
                try:
                    reply = call(request, metadata=md, timeout=5)
                except grpc.RpcError as e:
                    context.abort(e.code(), e.details())
                if name == "Ping":
                    p = pb.PingReply.FromString(reply)
                    for m in [p.responder, *p.members]:
                        if m.address == self.target:
                            m.address = self.address
                    reply = p.SerializeToString()
                return reply

            return grpc.unary_unary_rpc_method_handler(handler)

        def get(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            self.gets += 1
            key = pb.GetRequest.FromString(request).key
            yield from forged_value(key, b"FORGED BY A HOST WITHOUT THE SECRET")

        def put(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            self.puts += 1
            for _ in requests:
                pass
            return pb.PutReply(stored=True, replicas=1).SerializeToString()

        handlers = {n: forward(n) for n in ("Hello", "Ping", "Has", "Stats", "Digest", "Delete")}
        handlers["Get"] = grpc.unary_stream_rpc_method_handler(get)
        handlers["Put"] = grpc.stream_unary_rpc_method_handler(put)
        self.server = grpc.server(futures.ThreadPoolExecutor(16))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()


def main() -> None:
    from mesh.membership.discovery import ZeroconfDiscovery

    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--status", required=True, help="JSON counters, rewritten every 0.1 s")
    args = p.parse_args()
    rogue = Rogue().start(args.listen)
    host, port = rogue.address.rsplit(":", 1)
    ZeroconfDiscovery(node_id="rogue", cluster="default", host=host, port=int(port), capacity=1 << 50,
                      protocol=mesh.PROTOCOL_VERSION, on_found=lambda advert: None, interfaces=[host]).start()
    status = Path(args.status)
    while not threading.Event().wait(0.1):
        partial = status.with_name(status.name + ".partial")
        partial.write_text(json.dumps(rogue.status()))
        os.replace(partial, status)


if __name__ == "__main__":
    main()
