"""In-process LiveKit rooms for tests: two (or more) participants' ``rtc.Room`` stand-ins joined in memory, with
what LiveKit Agents' avatar I/O uses of a room: participants and their events, byte streams by topic (to given
identities), RPC (registered methods, ``UNSUPPORTED_METHOD`` otherwise), attributes, track publication (recorded;
the tracks are real ``rtc`` tracks and need no server).

    agent, avatar = loopback_rooms("agent-1", "avatar-1")
    output = DataStreamAudioOutput(agent, destination_identity="avatar-1")       # the real classes
    receiver = DataStreamAudioReceiver(avatar, sender_identity="agent-1")
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from livekit import rtc

_ids = itertools.count(1)


class LoopbackReader:
    """The reading end of a byte stream (``rtc.ByteStreamReader``'s ``info`` and async iteration)."""

    def __init__(self, info: rtc.ByteStreamInfo):
        self.info = info
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def __aiter__(self) -> LoopbackReader:
        return self

    async def __anext__(self) -> bytes:
        data = await self._queue.get()
        if data is None:
            raise StopAsyncIteration
        return data


class LoopbackWriter:
    """The writing end (``rtc.ByteStreamWriter``'s ``write`` and ``aclose``)."""

    def __init__(self, readers: list[LoopbackReader]):
        self._readers = readers
        self.bytes = 0
        self.closed = False

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise RuntimeError("write on a closed byte stream")
        self.bytes += len(data)
        for reader in self._readers:
            reader._queue.put_nowait(bytes(data))

    async def aclose(self, *, reason: str = "", attributes: dict[str, str] | None = None) -> None:
        if not self.closed:
            self.closed = True
            for reader in self._readers:
                reader._queue.put_nowait(None)


@dataclass
class LoopbackPublication:
    track: Any
    options: Any
    sid: str = field(default_factory=lambda: f"TR_{next(_ids)}")

    @property
    def kind(self):
        return self.track.kind

    async def wait_for_subscription(self) -> None:
        return None


class LoopbackRemoteParticipant:
    def __init__(self, local: LoopbackLocalParticipant):
        self._local = local
        self.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self.track_publications: dict[str, Any] = {}

    identity = property(lambda self: self._local.identity)
    name = property(lambda self: self._local.name)
    kind = property(lambda self: self._local.kind)
    attributes = property(lambda self: self._local.attributes)
    sid = property(lambda self: self._local.sid)


class LoopbackLocalParticipant:
    def __init__(self, room: LoopbackRoom, identity: str, kind, attributes: dict[str, str] | None):
        self.room = room
        self.identity = identity
        self.name = identity
        self.kind = kind
        self.sid = f"PA_{next(_ids)}"
        self.attributes = dict(attributes or {})
        self.track_publications: dict[str, LoopbackPublication] = {}
        self._rpc_handlers: dict[str, Any] = {}
        self.rpc_calls: list[tuple[float, str, str, str]] = []      # (time, to, method, payload) sent

    # -------------------------------------------------------------- RPC
    def register_rpc_method(self, method_name: str, handler=None):
        if handler is None:
            def decorator(fn):
                self._rpc_handlers[method_name] = fn
                return fn
            return decorator
        self._rpc_handlers[method_name] = handler
        return handler

    def unregister_rpc_method(self, method: str) -> None:
        self._rpc_handlers.pop(method, None)

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float | None = None) -> str:
        self.rpc_calls.append((time.monotonic(), destination_identity, method, payload))
        peer = self.room.network.get(destination_identity)
        if peer is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.RECIPIENT_NOT_FOUND, "recipient not found")
        handler = peer.local_participant._rpc_handlers.get(method)
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, "method not supported")
        data = rtc.RpcInvocationData(request_id=f"RQ_{next(_ids)}", caller_identity=self.identity, payload=payload,
                                     response_timeout=response_timeout or 10.0, method=method)
        result = handler(data)
        if inspect.isawaitable(result):
            result = await result
        return result if isinstance(result, str) else ""

    # -------------------------------------------------------------- data streams
    async def stream_bytes(self, name: str, *, topic: str = "", destination_identities: list[str] | None = None,
                           attributes: dict[str, str] | None = None, mime_type: str = "application/octet-stream",
                           **_: Any) -> LoopbackWriter:
        readers = []
        for room in self.room.network.values():
            if room is self.room or (destination_identities and room.local_participant.identity not in
                                     destination_identities):
                continue
            handler = room.byte_handlers.get(topic)
            if handler is None:
                continue
            info = rtc.ByteStreamInfo(stream_id=f"ST_{next(_ids)}", mime_type=mime_type, topic=topic,
                                      timestamp=int(time.time() * 1000), size=None,
                                      attributes=dict(attributes or {}), name=name)
            reader = LoopbackReader(info)
            readers.append(reader)
            handler(reader, self.identity)
        return LoopbackWriter(readers)

    # -------------------------------------------------------------- tracks, attributes
    async def publish_track(self, track, options=None) -> LoopbackPublication:
        publication = LoopbackPublication(track, options)
        self.track_publications[publication.sid] = publication
        self.room.emit("local_track_published", publication, track)
        for room in self.room.network.values():
            if room is not self.room:
                remote = room.remote_participants[self.identity]
                remote.track_publications[publication.sid] = publication
                room.emit("track_published", publication, remote)
        return publication

    async def unpublish_track(self, sid: str) -> None:
        self.track_publications.pop(sid, None)

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        self.attributes.update(attributes)
        for room in self.room.network.values():
            if room is not self.room:
                room.emit("participant_attributes_changed", list(attributes), room.remote_participants[self.identity])


class LoopbackRoom(rtc.EventEmitter):
    """One participant's view of an in-memory room (see the module)."""

    def __init__(self, identity: str, *, network: dict[str, LoopbackRoom], name: str = "loopback",
                 kind=rtc.ParticipantKind.PARTICIPANT_KIND_AGENT, attributes: dict[str, str] | None = None):
        super().__init__()
        self.name = name
        self.network = network
        self.local_participant = LoopbackLocalParticipant(self, identity, kind, attributes)
        self.remote_participants: dict[str, LoopbackRemoteParticipant] = {}
        self.byte_handlers: dict[str, Any] = {}
        self.connection_state = rtc.ConnectionState.CONN_CONNECTED

    def isconnected(self) -> bool:
        return self.connection_state == rtc.ConnectionState.CONN_CONNECTED

    def register_byte_stream_handler(self, topic: str, handler) -> None:
        self.byte_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self.byte_handlers.pop(topic, None)

    def join(self) -> None:
        """Enter the network: every participant sees every other one (``participant_connected``/``_active``)."""
        for other in self.network.values():
            if other is self:
                continue
            self.remote_participants[other.local_participant.identity] = LoopbackRemoteParticipant(
                other.local_participant)
            mine = LoopbackRemoteParticipant(self.local_participant)
            other.remote_participants[self.local_participant.identity] = mine
            other.emit("participant_connected", mine)
            other.emit("participant_active", mine)
        self.network[self.local_participant.identity] = self

    async def disconnect(self) -> None:
        self.network.pop(self.local_participant.identity, None)
        for other in self.network.values():
            gone = other.remote_participants.pop(self.local_participant.identity, None)
            if gone is not None:
                other.emit("participant_disconnected", gone)
        self.connection_state = rtc.ConnectionState.CONN_DISCONNECTED
        self.emit("connection_state_changed", self.connection_state)
        self.emit("disconnected", "client initiated")


def loopback_rooms(*identities: str, name: str = "loopback") -> list[LoopbackRoom]:
    """One connected room per identity, all agents' kind, in one in-memory network."""
    network: dict[str, LoopbackRoom] = {}
    rooms = [LoopbackRoom(identity, network=network, name=name) for identity in identities]
    for room in rooms:
        room.join()
    return rooms
