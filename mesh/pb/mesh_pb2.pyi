from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChunkCodec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHUNK_RAW: _ClassVar[ChunkCodec]
    CHUNK_LZ4: _ClassVar[ChunkCodec]

class MemberState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALIVE: _ClassVar[MemberState]
    SUSPECT: _ClassVar[MemberState]
    DEAD: _ClassVar[MemberState]
    LEFT: _ClassVar[MemberState]
CHUNK_RAW: ChunkCodec
CHUNK_LZ4: ChunkCodec
ALIVE: MemberState
SUSPECT: MemberState
DEAD: MemberState
LEFT: MemberState

class BlobHeader(_message.Message):
    __slots__ = ("key", "raw_size", "stored_size", "codec", "chunk_size", "chunk_count", "checksum", "meta", "created_unix")
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
    key: str
    raw_size: int
    stored_size: int
    codec: str
    chunk_size: int
    chunk_count: int
    checksum: int
    meta: _containers.ScalarMap[str, str]
    created_unix: float
    def __init__(self, key: _Optional[str] = ..., raw_size: _Optional[int] = ..., stored_size: _Optional[int] = ..., codec: _Optional[str] = ..., chunk_size: _Optional[int] = ..., chunk_count: _Optional[int] = ..., checksum: _Optional[int] = ..., meta: _Optional[_Mapping[str, str]] = ..., created_unix: _Optional[float] = ...) -> None: ...

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

class GetRequest(_message.Message):
    __slots__ = ("key", "local_only")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    key: str
    local_only: bool
    def __init__(self, key: _Optional[str] = ..., local_only: _Optional[bool] = ...) -> None: ...

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
    def __init__(self, header: _Optional[_Union[BlobHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., local_only: _Optional[bool] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("stored", "existed", "replicas")
    STORED_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    existed: bool
    replicas: int
    def __init__(self, stored: _Optional[bool] = ..., existed: _Optional[bool] = ..., replicas: _Optional[int] = ...) -> None: ...

class HasRequest(_message.Message):
    __slots__ = ("keys", "local_only")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    local_only: bool
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., local_only: _Optional[bool] = ...) -> None: ...

class HasReply(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("keys", "local_only")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    local_only: bool
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., local_only: _Optional[bool] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("node_id", "address", "version", "uptime_seconds", "counters", "members", "replicas", "cluster")
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
    node_id: str
    address: str
    version: str
    uptime_seconds: float
    counters: _containers.ScalarMap[str, float]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    replicas: int
    cluster: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., counters: _Optional[_Mapping[str, float]] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., replicas: _Optional[int] = ..., cluster: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("limit", "prefix")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    limit: int
    prefix: str
    def __init__(self, limit: _Optional[int] = ..., prefix: _Optional[str] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("key", "raw_size", "stored_size", "age_seconds", "meta")
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
    key: str
    raw_size: int
    stored_size: int
    age_seconds: float
    meta: _containers.ScalarMap[str, str]
    def __init__(self, key: _Optional[str] = ..., raw_size: _Optional[int] = ..., stored_size: _Optional[int] = ..., age_seconds: _Optional[float] = ..., meta: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("node_id", "address", "state", "incarnation", "capacity", "last_heard_age", "keys", "bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARD_AGE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: MemberState
    incarnation: int
    capacity: int
    last_heard_age: float
    keys: int
    bytes: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[MemberState, str]] = ..., incarnation: _Optional[int] = ..., capacity: _Optional[int] = ..., last_heard_age: _Optional[float] = ..., keys: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("cluster", "protocol", "sender", "members")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    protocol: int
    sender: Member
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, cluster: _Optional[str] = ..., protocol: _Optional[int] = ..., sender: _Optional[_Union[Member, _Mapping]] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("responder", "members")
    RESPONDER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    responder: Member
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, responder: _Optional[_Union[Member, _Mapping]] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

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
