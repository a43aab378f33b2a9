from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChunkCodec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHUNK_RAW: _ClassVar[ChunkCodec]
    CHUNK_LZ4: _ClassVar[ChunkCodec]
    CHUNK_LZ4_PLANES4: _ClassVar[ChunkCodec]

class MemberState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALIVE: _ClassVar[MemberState]
    SUSPECT: _ClassVar[MemberState]
    DEAD: _ClassVar[MemberState]
    LEFT: _ClassVar[MemberState]

class LeaseOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_ACQUIRE: _ClassVar[LeaseOp]
    LEASE_RELEASE: _ClassVar[LeaseOp]

class LeaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_GRANTED: _ClassVar[LeaseState]
    LEASE_HELD: _ClassVar[LeaseState]
    LEASE_DONE: _ClassVar[LeaseState]
    LEASE_RELEASED: _ClassVar[LeaseState]
    LEASE_COMPUTE: _ClassVar[LeaseState]
CHUNK_RAW: ChunkCodec
CHUNK_LZ4: ChunkCodec
CHUNK_LZ4_PLANES4: ChunkCodec
ALIVE: MemberState
SUSPECT: MemberState
DEAD: MemberState
LEFT: MemberState
LEASE_ACQUIRE: LeaseOp
LEASE_RELEASE: LeaseOp
LEASE_GRANTED: LeaseState
LEASE_HELD: LeaseState
LEASE_DONE: LeaseState
LEASE_RELEASED: LeaseState
LEASE_COMPUTE: LeaseState

class BlobHeader(_message.Message):
    __slots__ = ("key", "raw_size", "stored_size", "codec", "chunk_size", "chunk_count", "checksum", "meta", "created_unix", "write_id", "writers", "compute_seconds")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    WRITERS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    key: str
    raw_size: int
    stored_size: int
    codec: str
    chunk_size: int
    chunk_count: int
    checksum: int
    meta: _containers.ScalarMap[str, str]
    created_unix: float
    write_id: int
    writers: _containers.RepeatedScalarFieldContainer[str]
    compute_seconds: float
    def __init__(self, key: _Optional[str] = ..., raw_size: _Optional[int] = ..., stored_size: _Optional[int] = ..., codec: _Optional[str] = ..., chunk_size: _Optional[int] = ..., chunk_count: _Optional[int] = ..., checksum: _Optional[int] = ..., meta: _Optional[_Mapping[str, str]] = ..., created_unix: _Optional[float] = ..., write_id: _Optional[int] = ..., writers: _Optional[_Iterable[str]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "codec", "raw_size", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    codec: ChunkCodec
    raw_size: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., codec: _Optional[_Union[ChunkCodec, str]] = ..., raw_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("client_nonce", "key_id")
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    client_nonce: bytes
    key_id: str
    def __init__(self, client_nonce: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("session", "node_id", "key_id", "proof", "session_ttl", "address")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    session: str
    node_id: str
    key_id: str
    proof: bytes
    session_ttl: float
    address: str
    def __init__(self, session: _Optional[str] = ..., node_id: _Optional[str] = ..., key_id: _Optional[str] = ..., proof: _Optional[bytes] = ..., session_ttl: _Optional[float] = ..., address: _Optional[str] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "local_only", "compress", "planes4")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    PLANES4_FIELD_NUMBER: _ClassVar[int]
    key: str
    local_only: bool
    compress: bool
    planes4: bool
    def __init__(self, key: _Optional[str] = ..., local_only: bool = ..., compress: bool = ..., planes4: bool = ...) -> None: ...

class GetReply(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: BlobHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[BlobHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "chunk", "local_only")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    header: BlobHeader
    chunk: Chunk
    local_only: bool
    def __init__(self, header: _Optional[_Union[BlobHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., local_only: bool = ...) -> None: ...

class PutSmallRequest(_message.Message):
    __slots__ = ("header", "chunks", "local_only")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    header: BlobHeader
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    local_only: bool
    def __init__(self, header: _Optional[_Union[BlobHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., local_only: bool = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("stored", "existed", "replicas", "hinted", "owners", "acked")
    STORED_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    HINTED_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    existed: bool
    replicas: int
    hinted: bool
    owners: _containers.RepeatedScalarFieldContainer[str]
    acked: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stored: bool = ..., existed: bool = ..., replicas: _Optional[int] = ..., hinted: bool = ..., owners: _Optional[_Iterable[str]] = ..., acked: _Optional[_Iterable[str]] = ...) -> None: ...

class HasRequest(_message.Message):
    __slots__ = ("keys", "local_only", "versions", "write_ids")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    WRITE_IDS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    local_only: bool
    versions: bool
    write_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., local_only: bool = ..., versions: bool = ..., write_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class HasReply(_message.Message):
    __slots__ = ("present", "checksums", "created_unix", "deleted_unix", "write_ids", "deleted")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    DELETED_UNIX_FIELD_NUMBER: _ClassVar[int]
    WRITE_IDS_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    created_unix: _containers.RepeatedScalarFieldContainer[float]
    deleted_unix: _containers.RepeatedScalarFieldContainer[float]
    write_ids: _containers.RepeatedScalarFieldContainer[int]
    deleted: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ..., checksums: _Optional[_Iterable[int]] = ..., created_unix: _Optional[_Iterable[float]] = ..., deleted_unix: _Optional[_Iterable[float]] = ..., write_ids: _Optional[_Iterable[int]] = ..., deleted: _Optional[_Iterable[bool]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("keys", "local_only", "writer")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    local_only: bool
    writer: str
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., local_only: bool = ..., writer: _Optional[str] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("deleted", "existed")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    existed: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, deleted: _Optional[int] = ..., existed: _Optional[_Iterable[bool]] = ...) -> None: ...

class DigestRequest(_message.Message):
    __slots__ = ("requester", "buckets")
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    requester: str
    buckets: int
    def __init__(self, requester: _Optional[str] = ..., buckets: _Optional[int] = ...) -> None: ...

class DigestReply(_message.Message):
    __slots__ = ("digests", "counts")
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, digests: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("reporter", "report")
    class ReportEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    reporter: str
    report: _containers.ScalarMap[str, float]
    def __init__(self, reporter: _Optional[str] = ..., report: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("node_id", "address", "version", "uptime_seconds", "counters", "members", "replicas", "cluster", "warnings", "max_blob_size")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOB_SIZE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    version: str
    uptime_seconds: float
    counters: _containers.ScalarMap[str, float]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    replicas: int
    cluster: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    max_blob_size: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., counters: _Optional[_Mapping[str, float]] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., replicas: _Optional[int] = ..., cluster: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., max_blob_size: _Optional[int] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("limit", "prefix")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    limit: int
    prefix: str
    def __init__(self, limit: _Optional[int] = ..., prefix: _Optional[str] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("key", "raw_size", "stored_size", "age_seconds", "meta", "writers", "compute_seconds")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZE_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    WRITERS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    key: str
    raw_size: int
    stored_size: int
    age_seconds: float
    meta: _containers.ScalarMap[str, str]
    writers: _containers.RepeatedScalarFieldContainer[str]
    compute_seconds: float
    def __init__(self, key: _Optional[str] = ..., raw_size: _Optional[int] = ..., stored_size: _Optional[int] = ..., age_seconds: _Optional[float] = ..., meta: _Optional[_Mapping[str, str]] = ..., writers: _Optional[_Iterable[str]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("node_id", "address", "state", "incarnation", "capacity", "last_heard_age", "keys", "bytes", "suspecter")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARD_AGE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SUSPECTER_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: MemberState
    incarnation: int
    capacity: int
    last_heard_age: float
    keys: int
    bytes: int
    suspecter: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[MemberState, str]] = ..., incarnation: _Optional[int] = ..., capacity: _Optional[int] = ..., last_heard_age: _Optional[float] = ..., keys: _Optional[int] = ..., bytes: _Optional[int] = ..., suspecter: _Optional[str] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("cluster", "protocol", "sender", "members", "updates", "probe", "sync")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    protocol: int
    sender: Member
    members: _containers.RepeatedCompositeFieldContainer[Member]
    updates: _containers.RepeatedCompositeFieldContainer[Member]
    probe: Member
    sync: bool
    def __init__(self, cluster: _Optional[str] = ..., protocol: _Optional[int] = ..., sender: _Optional[_Union[Member, _Mapping]] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., updates: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., probe: _Optional[_Union[Member, _Mapping]] = ..., sync: bool = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("responder", "members", "proof", "updates", "nack")
    RESPONDER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    responder: Member
    members: _containers.RepeatedCompositeFieldContainer[Member]
    proof: bytes
    updates: _containers.RepeatedCompositeFieldContainer[Member]
    nack: bool
    def __init__(self, responder: _Optional[_Union[Member, _Mapping]] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., proof: _Optional[bytes] = ..., updates: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., nack: bool = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("handed_off", "failed")
    HANDED_OFF_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    handed_off: int
    failed: int
    def __init__(self, handed_off: _Optional[int] = ..., failed: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("key", "holder", "op", "ttl", "done", "local_only", "expected_seconds", "uncached")
    KEY_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNCACHED_FIELD_NUMBER: _ClassVar[int]
    key: str
    holder: str
    op: LeaseOp
    ttl: float
    done: bool
    local_only: bool
    expected_seconds: float
    uncached: bool
    def __init__(self, key: _Optional[str] = ..., holder: _Optional[str] = ..., op: _Optional[_Union[LeaseOp, str]] = ..., ttl: _Optional[float] = ..., done: bool = ..., local_only: bool = ..., expected_seconds: _Optional[float] = ..., uncached: bool = ...) -> None: ...

class LeaseReply(_message.Message):
    __slots__ = ("state", "holder", "held_seconds", "ttl_left", "expected_seconds", "owner")
    STATE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    HELD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTL_LEFT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    state: LeaseState
    holder: str
    held_seconds: float
    ttl_left: float
    expected_seconds: float
    owner: str
    def __init__(self, state: _Optional[_Union[LeaseState, str]] = ..., holder: _Optional[str] = ..., held_seconds: _Optional[float] = ..., ttl_left: _Optional[float] = ..., expected_seconds: _Optional[float] = ..., owner: _Optional[str] = ...) -> None: ...
