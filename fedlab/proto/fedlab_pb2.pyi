from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "codec", "data", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    data: bytes
    offset: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    def __init__(self, client_id: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run", "config_toml", "heartbeat_seconds")
    RUN_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    run: str
    config_toml: str
    heartbeat_seconds: float
    def __init__(self, run: _Optional[str] = ..., config_toml: _Optional[str] = ..., heartbeat_seconds: _Optional[float] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("client_id", "wait_seconds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    wait_seconds: float
    def __init__(self, client_id: _Optional[int] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("status", "version", "task_id", "config_json", "total_bytes", "tensors")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[TaskHeader.Status]
        TASK: _ClassVar[TaskHeader.Status]
        NONE: _ClassVar[TaskHeader.Status]
        FINISHED: _ClassVar[TaskHeader.Status]
    STATUS_UNSPECIFIED: TaskHeader.Status
    TASK: TaskHeader.Status
    NONE: TaskHeader.Status
    FINISHED: TaskHeader.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    status: TaskHeader.Status
    version: int
    task_id: str
    config_json: str
    total_bytes: int
    tensors: int
    def __init__(self, status: _Optional[_Union[TaskHeader.Status, str]] = ..., version: _Optional[int] = ..., task_id: _Optional[str] = ..., config_json: _Optional[str] = ..., total_bytes: _Optional[int] = ..., tensors: _Optional[int] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("header", "tensors", "checksum")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    checksum: bytes
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., checksum: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("client_id", "version", "task_id", "num_examples", "metrics", "total_bytes", "tensors")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    version: int
    task_id: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    total_bytes: int
    tensors: int
    def __init__(self, client_id: _Optional[int] = ..., version: _Optional[int] = ..., task_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., total_bytes: _Optional[int] = ..., tensors: _Optional[int] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "tensors", "checksum")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    checksum: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., checksum: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "status", "reason")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[PushReply.Status]
        ACCEPTED: _ClassVar[PushReply.Status]
        REFUSED: _ClassVar[PushReply.Status]
    STATUS_UNSPECIFIED: PushReply.Status
    ACCEPTED: PushReply.Status
    REFUSED: PushReply.Status
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    status: PushReply.Status
    reason: str
    def __init__(self, accepted: bool = ..., status: _Optional[_Union[PushReply.Status, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "task_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    task_id: str
    def __init__(self, client_id: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("finished",)
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    finished: bool
    def __init__(self, finished: bool = ...) -> None: ...
