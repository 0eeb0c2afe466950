"""WHIP ingest (RFC 9725) and WHEP egress (draft-ietf-wish-whep): speech in, the avatar out, over plain HTTP.

Routes, registered on the server's app by :meth:`WhipWhep.add_routes`:

* ``POST /whip/{stream}`` with an ``application/sdp`` offer holding one audio section (the speech) -> ``201
  Created``: the SDP answer, ``Location: /whip/{stream}/{id}``, ``ETag`` and one ``Link: <url>;
  rel="ice-server"`` per ICE server configured (with its credentials; TURN ones only for a caller with a token
  when the server has a token secret, as ``/config``). The stream is a session driven by the publisher's audio
  and sends nothing back; a video section (FFmpeg and OBS send one) is received and thrown away (aiortc's
  receive queue would grow without bound otherwise). Session options come from the query string
  (``?avatar=&emotion=&intensity=&pose=&low_latency=&paste_back=``), checked as the offer's. Stream names are
  1-64 characters of ``A-Z a-z 0-9 _ . -``; a name being published already is a ``409``.
* ``POST /whep/{target}`` -> ``201`` likewise, the avatar's video and delayed voice sent (``sendonly``), one
  :class:`WhepSink` on the session. ``target`` is, in this order: a live session id (any session, a browser
  caller's included), a WHIP stream name (its viewers share its one render), or an avatar name: a session of
  that avatar with no speech in (idle mouth, head moving per ``pose``), options from the query as WHIP's,
  shared by the viewers asking for the same avatar with the same options, which ends with its last viewer.
  Anything else is a ``404``.
* ``PATCH /whip/{stream}/{id}``, ``PATCH /whep/{target}/{id}`` (``application/trickle-ice-sdpfrag``,
  ``If-Match: <ETag>``): the client's trickled ICE candidates are added -> ``204``. No ``If-Match``: ``428``; an
  entity-tag that is not the resource's: ``412``; an ICE restart (``If-Match: *``, or new ICE credentials in the
  fragment): ``422``, as the RFC says for a server that trickles but cannot restart (aiortc cannot), and the
  entity-tag never changes. The server's own candidates are all in its answer (aiortc gathers them first).
* ``DELETE`` on a resource -> ``200``; a stream's session, publisher connection and viewers, or a viewer's sink
  and connection (and an avatar session its last viewer leaves) are gone when it answers.
* ``OPTIONS`` -> ``200`` with ``Accept-Post``/``Accept-Patch``; ``GET``/``HEAD /whep/{target}`` -> ``200`` with
  ``Content-Type: application/sdp`` (WHEP discovery) or ``404``; other methods ``405`` with ``Allow`` (aiohttp's
  router). A body of the wrong type: ``415``; a bad offer or fragment: ``400`` (``422`` for an offer with no
  audio to ingest or no video to watch); the server full (sessions, or :attr:`ServerSettings.max_viewers`
  viewers): ``503`` with ``Retry-After``. Errors are the server's one-line JSON ``{"error": ...}``.

Access: the POSTs pass the server's gate as ``/offer`` does (rate limit per address, bearer token), PATCH, DELETE
and GET only its token check; browsers on other origins per ``--cors-origin``, with ``Location, ETag, Link``
exposed (:func:`~edtalk_live.realtime.access.cors_middleware`).

Lifetimes: a stream is watched as a caller's session is (not connected within the connect timeout, or no audio
for the inactivity timeout: it ends, and its viewers with it). A viewer ends with its session, when its
connection fails or closes, when it is not connected within the connect timeout, or when no RTCP receiver report
has come from it for the inactivity timeout (aiortc keeps a vanished peer "connected" for about 30 s).

Behind the ``--workers`` supervisor each resource id starts with its worker's index (``{worker}-{hex}``), so the
supervisor sends PATCH and DELETE to the worker that holds it (:mod:`edtalk_live.realtime.workers`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.realtime.limits import SDP_LIMITS, check_offer_sdp, clip, excerpt
from edtalk_live.realtime.protocol import SessionOptions
from edtalk_live.realtime.tracks import WebRTCSink

if TYPE_CHECKING:
    from edtalk_live.realtime.server import AvatarServer, _Peer

logger = logging.getLogger(__name__)

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
#: what a WHIP stream may be called (it is a path segment of every URL of the stream)
STREAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: session options a WHIP or WHEP URL's query may set, and how each is read from text
_FLAGS = ("low_latency", "paste_back", "probe")
#: how often a viewer's connection and RTCP reports are checked (seconds)
VIEWER_WATCH_S = 1.0
#: ``Retry-After`` of a 503 (seconds)
RETRY_AFTER_S = 5


class WhepSink(WebRTCSink):
    """A WHEP viewer: a :class:`~edtalk_live.realtime.tracks.WebRTCSink` counted as ``kind="whep"``."""

    kind = "whep"


class _Unprocessable(InputError):
    """An offer that is valid SDP but not what the resource takes (422)."""


@dataclass
class _Resource:
    """A WHIP stream's publisher or a WHEP viewer: one peer connection, one URL."""

    id: str
    kind: str                       # "whip" | "whep"
    target: str                     # the stream name, or the WHEP target as POSTed
    sid: str                        # the session it feeds or watches
    pc: Any
    etag: str
    sink: WhepSink | None = None    # a viewer's
    watchdog: asyncio.Task | None = None
    drains: list[Any] = field(default_factory=list)     # MediaBlackholes of received tracks nobody uses
    on_close: Any = None            # its hook on the session's _Peer.on_close
    closed: bool = False

    @property
    def location(self) -> str:
        return f"/{self.kind}/{self.target}/{self.id}"


class WhipWhep:
    """The WHIP streams and WHEP viewers of an :class:`~edtalk_live.realtime.server.AvatarServer`: their routes,
    resources and lifetimes. Sessions, limits, the gate, the ICE servers and errors are the server's."""

    def __init__(self, server: AvatarServer):
        self.server = server
        self.resources: dict[str, _Resource] = {}
        self.streams: dict[str, str] = {}       # WHIP stream name -> session id
        #: sessions made for WHEP viewers of an avatar, by id: their options (viewers asking for the same avatar
        #: with the same options share one), and they end with their last viewer
        self.idle: dict[str, SessionOptions] = {}
        #: the worker index behind the ``--workers`` supervisor (resource ids start with it), or None
        self.worker: int | None = None

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/whip/{stream}", self.whip_post)
        r.add_options("/whip/{stream}", functools.partial(self.options, accept=("Accept-Post", SDP)))
        r.add_patch("/whip/{stream}/{id}", self.patch)
        r.add_delete("/whip/{stream}/{id}", self.delete)
        r.add_options("/whip/{stream}/{id}", functools.partial(self.options, accept=("Accept-Patch", SDPFRAG)))
        r.add_post("/whep/{target}", self.whep_post)
        r.add_get("/whep/{target}", self.whep_get)       # and HEAD
        r.add_options("/whep/{target}", functools.partial(self.options, accept=("Accept-Post", SDP)))
        r.add_patch("/whep/{target}/{id}", self.patch)
        r.add_delete("/whep/{target}/{id}", self.delete)
        r.add_options("/whep/{target}/{id}", functools.partial(self.options, accept=("Accept-Patch", SDPFRAG)))

    # ------------------------------------------------------------ counts
    @property
    def viewers(self) -> int:
        return sum(r.kind == "whep" for r in self.resources.values())

    def viewers_of(self, sid: str) -> int:
        return sum(r.kind == "whep" and r.sid == sid for r in self.resources.values())

    # ------------------------------------------------------------ routes
    async def options(self, request: web.Request, accept: tuple[str, str]) -> web.Response:
        allow = sorted({route.method for route in request.match_info.route.resource})
        return web.Response(status=200, headers={accept[0]: accept[1], "Allow": ", ".join(allow)})

    async def whip_post(self, request: web.Request) -> web.Response:
        stream = request.match_info["stream"]
        refused = self.server.gate.check(request)
        if refused is not None:
            return refused
        if not STREAM_NAME.fullmatch(stream):
            return self._error(400, f"bad stream name {excerpt(stream)}: 1-64 characters of A-Z a-z 0-9 _ . -")
        if stream in self.streams:
            return self._error(409, f"stream {stream!r} is being published already")
        try:
            options = self.server.options_from(_query_options(request))
        except EDTalkError as e:
            return self._error(400, str(e))
        sdp = await self._read_offer(request)
        if isinstance(sdp, web.Response):
            return sdp
        if stream in self.streams:                  # taken while the offer was read
            return self._error(409, f"stream {stream!r} is being published already")
        full = self.server.full()
        if full is not None:
            return full
        server = self.server
        pc = server.new_pc()
        peer = server.new_session(options, pc)
        session, sid = peer.session, peer.session.id
        res = _Resource(self._new_id(), "whip", stream, sid, pc, _new_etag())
        self.streams[stream] = sid          # the name is taken from here: a second POST is a 409
        speech: list[Any] = []
        ok = False
        try:
            @pc.on("track")
            def on_track(track):
                if track.kind == "audio" and not speech:
                    speech.append(track)
                    server._shorten_audio_buffer(pc, track)
                    session.consume(track)
                else:                               # the video, if any: received and thrown away
                    self._drain(res, track)

            @pc.on("connectionstatechange")
            async def on_state():
                logger.info("WHIP stream %s: connection %s", stream, pc.connectionState)
                if pc.connectionState == "connected":
                    session.start()
                elif pc.connectionState in ("failed", "closed"):
                    await server.close_peer(sid, f"WHIP connection {pc.connectionState}")

            try:
                await self._answer(pc, sdp, "whip")
            except InputError as e:
                return self._error(422 if isinstance(e, _Unprocessable) else 400, str(e))
            self._register(res, peer)
            server.watch(peer)
            ok = True
            logger.info("WHIP stream %s: session %s (avatar %s, emotion %s, pose %s)", stream, sid[:8],
                        options.avatar, options.emotion, options.pose)
            return self._created(request, res)
        finally:
            if not ok:
                self.streams.pop(stream, None)
                await server.close_peer(sid, "WHIP setup failed")

    async def whep_post(self, request: web.Request) -> web.Response:
        target = request.match_info["target"]
        refused = self.server.gate.check(request)
        if refused is not None:
            return refused
        server = self.server
        peer = self._live(target)
        if peer is None and target not in server.avatars:     # first: the supervisor asks each worker in turn
            return self._not_found(target)
        if peer is not None and request.query:
            return self._error(400, "query options apply only to a new session (a WHEP URL naming an avatar), "
                               f"not to {excerpt(target)}")
        if self.viewers >= server.settings.max_viewers:
            return web.json_response({"error": f"too many WHEP viewers: {self.viewers} of "
                                      f"{server.settings.max_viewers}, try again later"}, status=503,
                                     headers={"Retry-After": str(RETRY_AFTER_S)})
        options = None
        if peer is None:
            try:
                query = _query_options(request)
                if query.setdefault("avatar", target) != target:
                    raise InputError(f"the URL names avatar {target!r}: no avatar option in its query")
                options = server.options_from(query)
            except EDTalkError as e:
                return self._error(400, str(e))
        sdp = await self._read_offer(request)
        if isinstance(sdp, web.Response):
            return sdp
        if options is not None:                     # an avatar: its session with these options, or a new one
            peer = self._idle_session(options)
            if peer is None:
                full = server.full()
                if full is not None:
                    return full
                peer = server.new_session(options)
                self.idle[peer.session.id] = options
        elif peer.closed:                           # it ended while the offer was read
            return self._not_found(target)
        session, sid = peer.session, peer.session.id
        pc = server.new_pc()
        res = _Resource(self._new_id(), "whep", target, sid, pc, _new_etag())
        res.sink = WhepSink(f"{sid[:8]}-{res.id[-6:]}", on_count=server.prometheus.sinks.count,
                            on_av_offset=session.note_av_offset)
        ok = False
        try:
            pc.on("track", functools.partial(self._drain, res))     # a sendrecv offer's media: not wanted

            @pc.on("connectionstatechange")
            async def on_state():
                logger.info("WHEP viewer %s of %s: connection %s", res.id[-6:], sid[:8], pc.connectionState)
                if pc.connectionState == "connected" and sid in self.idle:
                    session.start()                 # an avatar session runs while it is watched
                elif pc.connectionState in ("failed", "closed"):
                    await self._close_viewer(res.id, f"connection {pc.connectionState}")

            try:
                await self._answer(pc, sdp, "whep", res.sink)
            except InputError as e:
                return self._error(422 if isinstance(e, _Unprocessable) else 400, str(e))
            try:
                session.add_sink(res.sink)
            except InputError as e:         # the session ended while this viewer was negotiated
                return self._not_found(target, str(e))
            self._register(res, peer)
            res.watchdog = asyncio.create_task(self._watch_viewer(res), name=f"whep-{res.id[-6:]}-watchdog")
            ok = True
            logger.info("WHEP viewer %s: watching session %s (%s)", res.id[-6:], sid[:8], target)
            return self._created(request, res)
        finally:
            if not ok:
                await res.sink.stop()
                await _close_pc(pc)
                if sid in self.idle and not self.viewers_of(sid):
                    del self.idle[sid]
                    await server.close_peer(sid, "WHEP setup failed")

    async def whep_get(self, request: web.Request) -> web.Response:
        """WHEP discovery: ``200`` with ``Content-Type: application/sdp`` for a target a POST may watch."""
        refused = self.server.gate.check(request, rate_limited=False)
        if refused is not None:
            return refused
        target = request.match_info["target"]
        if self._live(target) is None and target not in self.server.avatars:
            return self._not_found(target)
        return web.Response(status=200, headers={"Content-Type": SDP})

    async def patch(self, request: web.Request) -> web.Response:
        """Trickle ICE: the client's candidates from an ``application/trickle-ice-sdpfrag`` body."""
        refused = self.server.gate.check(request, rate_limited=False)
        if refused is not None:
            return refused
        fail = functools.partial(self._error, refused=False)       # not a refused session
        res = self._resource(request)
        if res is None:
            return self._not_found(request.match_info["id"])
        if request.content_type != SDPFRAG:
            return fail(415, f"a PATCH body must be {SDPFRAG}, got {excerpt(request.content_type)}",
                        headers={"Accept-Patch": SDPFRAG})
        tags = request.headers.get("If-Match")
        if tags is None:
            return fail(428, f"a PATCH needs If-Match: {res.etag} (the resource's ETag)")
        if tags.strip() == "*":
            return fail(422, "ICE restarts are not supported: DELETE this resource and POST a new offer")
        if res.etag not in (t.strip() for t in tags.split(",")):
            return fail(412, f"If-Match {excerpt(tags)} is not this resource's ETag")
        body = await self._read_body(request, "SDP fragment", refused=False)
        if isinstance(body, web.Response):
            return body
        try:
            frag = parse_sdpfrag(body)
        except InputError as e:
            return fail(400, str(e))
        remote = _ice_credentials(res.pc.remoteDescription.sdp if res.pc.remoteDescription else "")
        if any(mine is not None and mine != theirs for mine, theirs in zip(frag.credentials, remote, strict=True)):
            return fail(422, "the fragment has new ICE credentials (an ICE restart), which are not supported: "
                        "DELETE this resource and POST a new offer")
        mid = _bundle_mid(res.pc.remoteDescription.sdp) if res.pc.remoteDescription else None
        for candidate in frag.candidates:
            if mid is not None:                 # one transport for every section (max-bundle)
                candidate.sdpMid, candidate.sdpMLineIndex = mid, None
            try:
                await res.pc.addIceCandidate(candidate)
            except Exception as e:  # noqa: BLE001 - an unusable candidate is skipped (RFC 9725 section 4.3.2)
                logger.debug("%s %s: candidate skipped: %s", res.kind, res.id[-6:], e)
        if frag.end:
            try:
                await res.pc.addIceCandidate(None)
            except Exception as e:  # noqa: BLE001 - e.g. the end was in the offer already
                logger.debug("%s %s: end-of-candidates skipped: %s", res.kind, res.id[-6:], e)
        return web.Response(status=204)

    async def delete(self, request: web.Request) -> web.Response:
        refused = self.server.gate.check(request, rate_limited=False)
        if refused is not None:
            return refused
        res = self._resource(request)
        if res is None:
            return self._not_found(request.match_info["id"])
        if res.kind == "whip":
            await self.server.close_peer(res.sid, "WHIP client hung up (DELETE)")
        else:
            await self._close_viewer(res.id, "WHEP client hung up (DELETE)")
        return web.Response(status=200)

    # ------------------------------------------------------------ negotiation
    async def _read_offer(self, request: web.Request) -> str | web.Response:
        """The request's SDP offer, or the 4xx answering it (415 not ``application/sdp``, 413, 400)."""
        if request.content_type != SDP:
            return self._error(415, f"the offer must be {SDP}, got {excerpt(request.content_type)}",
                               headers={"Accept-Post": SDP})
        sdp = await self._read_body(request, "offer")
        if isinstance(sdp, web.Response):
            return sdp
        try:
            check_offer_sdp(sdp)
        except InputError as e:
            return self._error(400, f"bad SDP offer: {e}")
        return sdp

    async def _read_body(self, request: web.Request, what: str, refused: bool = True) -> str | web.Response:
        limit = self.server.settings.max_offer_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._error(413, f"{what} larger than {limit} bytes", refused=refused)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, f"{what} larger than {limit} bytes", refused=refused)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(400, f"the {what} must be UTF-8 text", refused=refused)

    async def _answer(self, pc, sdp: str, kind: str, sink: WhepSink | None = None) -> None:
        """Apply the offer, check its sections, answer. WHIP: receive only (one audio section, at most one video);
        WHEP: the sink's video (and voice, if the offer has audio) sent only. Raises :class:`InputError`."""
        from aiortc import RTCSessionDescription

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            kinds = [t.kind for t in pc.getTransceivers()]
            if kind == "whip":
                audio, video = kinds.count("audio"), kinds.count("video")
                if audio != 1 or video > 1:
                    raise _Unprocessable("a WHIP offer must have one audio section (the speech) and at most one "
                                         f"video section, got {audio} audio and {video} video")
                for t in pc.getTransceivers():
                    t.direction = "recvonly"
            else:
                if "video" not in kinds:
                    raise _Unprocessable("a WHEP offer must have a video section (the avatar)")
                pc.addTrack(sink.video)
                if "audio" in kinds:
                    pc.addTrack(sink.voice)
                for t in pc.getTransceivers():
                    t.direction = "sendonly" if t.sender.track is not None else "inactive"
            await pc.setLocalDescription(await pc.createAnswer())
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - mutated offers raise many exception types, at each step
            logger.info("%s: negotiation failed: %s: %s", kind.upper(), type(e).__name__, clip(str(e)))
            raise InputError(f"bad SDP offer: {type(e).__name__}: {clip(str(e))}") from None

    def _created(self, request: web.Request, res: _Resource) -> web.Response:
        headers = CIMultiDict([("Content-Type", SDP), ("Location", res.location), ("ETag", res.etag)])
        for link in ice_server_links(self.server.ice_servers(self.server.gate.authenticated(request))):
            headers.add("Link", link)
        return web.Response(status=201, body=res.pc.localDescription.sdp.encode(), headers=headers)

    # ------------------------------------------------------------ resources
    def _new_id(self) -> str:
        rid = uuid.uuid4().hex
        return rid if self.worker is None else f"{self.worker}-{rid}"

    def _live(self, target: str) -> _Peer | None:
        """The live session a WHEP target names (a session id, else a stream name), or None."""
        peer = self.server.peers.get(target)
        if peer is None and target in self.streams:
            peer = self.server.peers.get(self.streams[target])
        return peer

    def _idle_session(self, options: SessionOptions) -> _Peer | None:
        """The live session made for WHEP viewers of an avatar with these options, if any."""
        for sid, chosen in self.idle.items():
            peer = self.server.peers.get(sid)
            if chosen == options and peer is not None and not peer.closed:
                return peer
        return None

    def _resource(self, request: web.Request) -> _Resource | None:
        res = self.resources.get(request.match_info["id"])
        kind = request.path.split("/")[1]
        where = request.match_info.get("stream", request.match_info.get("target"))
        return res if res is not None and res.kind == kind and res.target == where and not res.closed else None

    def _register(self, res: _Resource, peer: _Peer) -> None:
        """Keep ``res`` until it or its session ends."""
        self.resources[res.id] = res
        res.on_close = functools.partial(self._session_closed, res)
        peer.on_close.append(res.on_close)

    async def _session_closed(self, res: _Resource) -> None:
        """``res``'s session ended (its hook on ``_Peer.on_close``): a stream's name is free, a viewer goes."""
        if res.kind == "whip":
            self.resources.pop(res.id, None)
            res.closed = True
            if self.streams.get(res.target) == res.sid:
                del self.streams[res.target]
            await _stop_drains(res)
        else:
            await self._close_viewer(res.id, "its session ended")
        self.idle.pop(res.sid, None)

    async def _close_viewer(self, rid: str, reason: str) -> None:
        res = self.resources.pop(rid, None)
        if res is None or res.closed:
            return
        res.closed = True
        logger.info("WHEP viewer %s of %s: closing (%s)", rid[-6:], res.sid[:8], reason)
        peer = self.server.peers.get(res.sid)
        if peer is not None:
            if res.on_close in peer.on_close:
                peer.on_close.remove(res.on_close)
            await peer.session.remove_sink(res.sink)
        else:
            await res.sink.stop()
        if res.watchdog is not None and res.watchdog is not asyncio.current_task():
            res.watchdog.cancel()
        await _close_pc(res.pc)
        await _stop_drains(res)
        if peer is not None and res.sid in self.idle and not self.viewers_of(res.sid):
            del self.idle[res.sid]
            await self.server.close_peer(res.sid, "its last WHEP viewer left")

    async def _watch_viewer(self, res: _Resource) -> None:
        """Close a viewer that did not connect in time, or whose RTCP receiver reports stopped coming."""
        from aiortc import clock

        s = self.server.settings
        loop = asyncio.get_running_loop()
        began, connected = loop.time(), None
        while not res.closed:
            await asyncio.sleep(VIEWER_WATCH_S)
            state = res.pc.connectionState
            if state != "connected":
                if loop.time() - began > s.connect_timeout:
                    await self._close_viewer(res.id, f"not connected after {s.connect_timeout:g} s ({state})")
                continue
            if connected is None:
                connected = loop.time()
            silent = loop.time() - connected
            for t in res.pc.getTransceivers():
                if t.sender.track is None:
                    continue
                try:
                    report = await t.sender.getStats()
                except Exception:  # noqa: BLE001 - e.g. closing under us: the next round decides
                    continue
                for stats in report.values():
                    if stats.type == "remote-inbound-rtp":
                        silent = min(silent, (clock.current_datetime() - stats.timestamp).total_seconds())
            if silent > s.inactivity_timeout:
                await self._close_viewer(res.id, f"no RTCP report for {s.inactivity_timeout:g} s")

    def _drain(self, res: _Resource, track) -> None:
        """Receive ``track`` and throw its frames away (a queue nobody reads grows without bound in aiortc)."""
        from aiortc.contrib.media import MediaBlackhole

        hole = MediaBlackhole()
        hole.addTrack(track)
        res.drains.append(hole)
        asyncio.ensure_future(hole.start())

    # ------------------------------------------------------------ errors
    def _error(self, status: int, message: str, headers: dict[str, str] | None = None,
               refused: bool = True) -> web.Response:
        """The server's one-line JSON error; ``refused``: a refused offer (counted as ``/offer``'s are)."""
        if refused:
            response = self.server._error(status, message)
        else:
            response = web.json_response({"error": clip(message, 300)}, status=status)
        response.headers.update(headers or {})
        return response

    def _not_found(self, what: str, why: str | None = None) -> web.Response:
        return self._error(404, why or f"no WHIP stream, session, avatar or resource {excerpt(what)} here")


# ------------------------------------------------------------------------------------------ helpers


def _new_etag() -> str:
    return f'"{uuid.uuid4().hex[:16]}"'


async def _close_pc(pc) -> None:
    try:
        await pc.close()
    except Exception:  # noqa: BLE001 - pc.close() can raise on a malformed session
        logger.warning("error while closing a WHIP/WHEP peer connection", exc_info=True)


async def _stop_drains(res: _Resource) -> None:
    for hole in res.drains:
        await hole.stop()
    res.drains.clear()


def _query_options(request: web.Request) -> dict[str, Any]:
    """Session options from a URL's query string, as the offer's JSON would give them; :class:`InputError` for a
    value that cannot be read (the names and values are checked by ``SessionOptions``)."""
    out: dict[str, Any] = {}
    for name in request.query:
        values = request.query.getall(name)
        if len(values) > 1:
            raise InputError(f"session option {excerpt(name)} given {len(values)} times")
        value = values[0]
        if name in _FLAGS:
            if value.lower() not in ("", "1", "0", "true", "false", "yes", "no"):
                raise InputError(f"{name} must be true or false, got {excerpt(value)}")
            out[name] = value.lower() in ("", "1", "true", "yes")
        elif name == "intensity":
            try:
                out[name] = float(value)
            except ValueError:
                raise InputError(f"intensity must be a number, got {excerpt(value)}") from None
        else:
            out[name] = value
    return out


def ice_server_links(entries: list[dict]) -> list[str]:
    """``Link`` header values for ICE servers as ``/config`` lists them (RFC 9725 section 4.6):
    ``<stun:host>; rel="ice-server"``, with ``username``, ``credential`` and ``credential-type`` for TURN."""

    def quoted(value: str) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    links = []
    for entry in entries:
        urls = entry.get("urls")
        for url in [urls] if isinstance(urls, str) else list(urls or ()):
            link = f'<{url}>; rel="ice-server"'
            if entry.get("username") is not None and entry.get("credential") is not None:
                link += (f'; username={quoted(entry["username"])}; credential={quoted(entry["credential"])}'
                         '; credential-type="password"')
            links.append(link)
    return links


@dataclass
class SdpFragment:
    """What a trickle-ice-sdpfrag (RFC 8840) carries: candidates, end-of-candidates, ICE credentials."""

    candidates: list[Any]
    end: bool
    credentials: tuple[str | None, str | None]      # (ufrag, pwd), None where absent


def parse_sdpfrag(text: str) -> SdpFragment:
    """Parse a trickle-ice-sdpfrag body within the offer's SDP bounds; :class:`InputError` names what is wrong.

    Only ``a=``, ``m=`` and empty lines may appear; ``a=candidate`` lines are read with aiortc's parser and
    take the ``a=mid`` of their section; other attributes (``a=group``, ``a=ice-options``, ...) are ignored.
    """
    from aiortc.sdp import candidate_from_sdp

    lines = text.splitlines()
    limits = SDP_LIMITS
    if len(lines) > limits.max_lines:
        raise InputError(f"SDP fragment has {len(lines)} lines, at most {limits.max_lines} allowed")
    candidates, end, mid, ufrag, pwd = [], False, None, None, None
    for n, line in enumerate(lines, 1):
        if len(line) > limits.max_line_chars:
            raise InputError(f"SDP fragment line {n} is {len(line)} characters long, at most "
                             f"{limits.max_line_chars} allowed")
        if not line:
            continue
        if not line.startswith(("a=", "m=")):
            raise InputError(f"bad SDP fragment line {n}: {excerpt(line)} (only a= and m= lines belong in one)")
        if line.startswith("m="):
            mid = None
        elif line.startswith("a=mid:"):
            mid = line[6:].strip()
            for c in candidates:
                if c.sdpMid is None and c.sdpMLineIndex == -1:     # candidates before the section's a=mid
                    c.sdpMid, c.sdpMLineIndex = mid, None
        elif line.startswith("a=ice-ufrag:"):
            ufrag = line[12:].strip()
        elif line.startswith("a=ice-pwd:"):
            pwd = line[10:].strip()
        elif line.startswith("a=end-of-candidates"):
            end = True
        elif line.startswith("a=candidate:"):
            if len(candidates) >= limits.max_candidates:
                raise InputError(f"SDP fragment has more than {limits.max_candidates} candidates")
            try:
                candidate = candidate_from_sdp(line[12:])
            except (AssertionError, ValueError, IndexError):
                raise InputError(f"bad ICE candidate on SDP fragment line {n}: {excerpt(line)}") from None
            candidate.sdpMid, candidate.sdpMLineIndex = (mid, None) if mid is not None else (None, -1)
            candidates.append(candidate)
    for c in candidates:
        if c.sdpMLineIndex == -1:           # no a=mid anywhere: the first section
            c.sdpMLineIndex = 0
    return SdpFragment(candidates, end, (ufrag, pwd))


def _ice_credentials(sdp: str) -> tuple[str | None, str | None]:
    """The first ``a=ice-ufrag`` and ``a=ice-pwd`` of an SDP."""
    ufrag = re.search(r"^a=ice-ufrag:(\S+)", sdp, re.M)
    pwd = re.search(r"^a=ice-pwd:(\S+)", sdp, re.M)
    return (ufrag.group(1) if ufrag else None, pwd.group(1) if pwd else None)


def _bundle_mid(sdp: str) -> str | None:
    """The first mid of an SDP's BUNDLE group (the section whose transport all of them use), or None."""
    group = re.search(r"^a=group:BUNDLE[ \t]+(\S+)", sdp, re.M)
    return group.group(1) if group else None

