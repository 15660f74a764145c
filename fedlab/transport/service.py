"""The ``Federation`` gRPC service of the server: channel options and the call adapter.

Each call is admitted by the :class:`~fedlab.transport.admission.Gate`, its requests are read
under the gate's deadlines, and it is handed to the transport
(:class:`~fedlab.transport.server.GrpcTransport`), which holds the tasks and updates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import grpc

from fedlab.proto import fedlab_pb2 as pb
from fedlab.transport.admission import Gate
from fedlab.transport.codec import Chunk, decode
from fedlab.types import ClientId

MESSAGE_LIMIT = 8 << 20
"""gRPC message size limit on both sides; payload pieces are a quarter of it."""

OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    # A stream's receive window is what a peer may send before anyone reads it. Left to
    # gRPC's bandwidth-delay probing it grows to tens of MiB per stream, so clients waiting
    # for an upload slot parked about half a model each in the server: fixed at 4 MiB,
    # server memory no longer grows with the number of uploading clients (a 4 MiB window
    # still moves 40 MB/s per stream at 100 ms round trip).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 4 * 2**20),
]
"""gRPC options of the server and the clients' channels."""


class Federation(Protocol):
    """What the service hands an admitted call to: the transport's side of each method."""

    def join(self, client_id: ClientId) -> pb.JoinReply: ...

    def pull(self, client_id: ClientId, wait: float, active: Any) -> Iterator[bytes]: ...

    def push(
        self, chunks: Iterator[Chunk[pb.UpdateHeader]], context: grpc.ServicerContext
    ) -> pb.PushReply: ...

    def heartbeat_from(self, client_id: ClientId, task_id: str) -> pb.HeartbeatReply: ...


class _Servicer:
    """Thin gRPC adapter: admit the call, read its requests under deadlines, hand over.

    Every method is registered request-streaming, also those whose clients send a single
    request: gRPC then calls the handler before reading anything, so the gate admits the
    call from its metadata first and reads the request under the stall deadline. (For a
    unary method gRPC would wait for the request on the handler's thread, for as long as
    the peer likes, before any check could run.)
    """

    def __init__(self, transport: Federation, gate: Gate) -> None:
        self.t = transport
        self.gate = gate

    def Join(
        self, requests: Iterator[pb.JoinRequest], context: grpc.ServicerContext
    ) -> pb.JoinReply:
        with self.gate.call(context) as cid:
            request = self.gate.one(requests, context, f"client {cid}: join")
            self.gate.claim(context, cid, request.client_id)
            return self.t.join(cid)

    def PullTask(
        self, requests: Iterator[pb.PullRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        with self.gate.call(context) as cid:
            request = self.gate.one(requests, context, f"client {cid}: pull")
            self.gate.claim(context, cid, request.client_id)
            chunks = self.t.pull(cid, request.wait_seconds, context.is_active)
            yield from self.gate.send(chunks, context, f"client {cid}: task download")

    def PushUpdate(
        self, requests: Iterator[Chunk[pb.UpdateHeader]], context: grpc.ServicerContext
    ) -> pb.PushReply:
        with self.gate.call(context, upload=True) as cid:
            chunks = self.gate.read(requests, context, f"client {cid}: upload")
            return self.t.push(self._claimed(cid, chunks, context), context)

    def _claimed(
        self, cid: int, chunks: Iterator[Chunk[pb.UpdateHeader]], context: grpc.ServicerContext
    ) -> Iterator[Chunk[pb.UpdateHeader]]:
        for chunk in chunks:
            if chunk.header is not None:
                self.gate.claim(context, cid, chunk.header.client_id)
            yield chunk

    def Heartbeat(
        self, requests: Iterator[pb.HeartbeatRequest], context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        with self.gate.call(context) as cid:
            request = self.gate.one(requests, context, f"client {cid}: heartbeat")
            self.gate.claim(context, cid, request.client_id)
            return self.t.heartbeat_from(cid, request.task_id)


def _update_chunk(buf: bytes) -> Chunk[pb.UpdateHeader]:
    return decode(buf, pb.UpdateHeader)


def handlers(transport: Federation, gate: Gate) -> grpc.GenericRpcHandler:
    """The ``Federation`` service, with task and update chunks (de)serialized by the codec.

    The generated servicer would turn every chunk into protobuf objects, copying each tensor
    piece several times; the codec reads and writes the same wire format directly. Every
    method is request-streaming on this side (see :class:`_Servicer`); on the wire a stream
    of one message is a unary request, so clients call them as the proto declares.
    """
    s = _Servicer(transport, gate)
    service = pb.DESCRIPTOR.services_by_name["Federation"].full_name
    return grpc.method_handlers_generic_handler(
        service,
        {
            "Join": grpc.stream_unary_rpc_method_handler(
                s.Join,
                request_deserializer=pb.JoinRequest.FromString,
                response_serializer=pb.JoinReply.SerializeToString,
            ),
            "PullTask": grpc.stream_stream_rpc_method_handler(  # yields serialized chunks
                s.PullTask, request_deserializer=pb.PullRequest.FromString
            ),
            "PushUpdate": grpc.stream_unary_rpc_method_handler(
                s.PushUpdate,
                request_deserializer=_update_chunk,
                response_serializer=pb.PushReply.SerializeToString,
            ),
            "Heartbeat": grpc.stream_unary_rpc_method_handler(
                s.Heartbeat,
                request_deserializer=pb.HeartbeatRequest.FromString,
                response_serializer=pb.HeartbeatReply.SerializeToString,
            ),
        },
    )
