"""The pushed-speech socket: a bot streams its TTS audio to a session over a WebSocket instead of a microphone.

``GET /sessions/{session}/speech?rate=24000`` upgrades to a WebSocket on a session made with the session option
``"input": "push"`` (``POST /offer``). The bot then sends:

- binary messages: 16-bit little-endian mono PCM at ``rate`` Hz (default 16000), as fast as its TTS makes it;
  it is queued and played at 25 fps with the lips (:mod:`edtalk_live.realtime.speech`);
- ``{"type": "end"}``: the current utterance is complete (the next audio starts a new one);
- ``{"type": "interrupt"}``: stop now (queued speech and frames dropped, the mouth closes).

The server sends JSON text messages: ``{"type": "ready", "session", "rate", "delay_ms"}`` first, then
``{"type": "queued", "utterance": id}`` when an utterance's first audio arrives,
``{"type": "playback_started", "utterance": id}``, ``{"type": "playback_finished", "utterance": id,
"position": seconds played, "interrupted": bool}``, and ``{"type": "error", "error": ...}`` for a message it
could not use (the socket stays open). While a socket is open the session is not ended for a lack of incoming
audio; one socket per session at a time (409). With a token secret the socket needs the token, in an
``Authorization: Bearer`` header or, for browsers (which cannot set headers on a WebSocket), ``?token=``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import WSMsgType, web

from edtalk_live.edtalk.errors import EDTalkError
from edtalk_live.edtalk.timing import SAMPLE_RATE
from edtalk_live.realtime.limits import clip, loads_bounded
from edtalk_live.realtime.speech import MAX_RATE, MIN_RATE

if TYPE_CHECKING:
    from edtalk_live.realtime.server import AvatarServer

logger = logging.getLogger(__name__)

#: the largest binary message (bytes): 8 s of 16-bit audio at 64 kHz, more than a TTS engine sends at once
MAX_MESSAGE_BYTES = 1 << 20
#: the largest text message (bytes)
MAX_TEXT_BYTES = 1024


def routes(server: AvatarServer, app: web.Application) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await speech_socket(server, request)

    app.router.add_get("/sessions/{session}/speech", handler)


async def speech_socket(server: AvatarServer, request: web.Request) -> web.StreamResponse:
    token = request.query.get("token")
    if token and "Authorization" not in request.headers:
        request = request.clone(headers={**request.headers, "Authorization": f"Bearer {token}"})
    refused = server.gate.check(request, rate_limited=False)
    if refused is not None:
        return refused
    sid = request.match_info["session"]
    peer = server.peers.get(sid)
    if peer is None:
        return web.json_response({"error": f"no session {clip(sid, 40)!r} here"}, status=404)
    session = peer.session
    if session.options.input != "push":
        return web.json_response({"error": 'the session takes its speech from its microphone: make it with the '
                                           'session option "input": "push"'}, status=409)
    if session.speech_sources:
        return web.json_response({"error": "the session's speech socket is already open"}, status=409)
    try:
        rate = int(request.query.get("rate", SAMPLE_RATE))
    except ValueError:
        rate = -1
    if not MIN_RATE <= rate <= MAX_RATE:
        return web.json_response({"error": f"rate must be {MIN_RATE}-{MAX_RATE} Hz"}, status=400)

    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=20.0)
    await ws.prepare(request)
    sent_queued: set[int] = set()

    def send(event: dict) -> None:
        if not ws.closed:
            server._background(ws.send_str(json.dumps(event)), f"session-{sid[:8]}-speech-event")

    async def session_closed() -> None:         # the session ended (hang-up, shutdown): so does its socket
        await ws.close(code=1001, message=b"session ended")

    session.speech_sources += 1
    session.speech_listeners.append(send)
    peer.on_close.append(session_closed)
    logger.info("session %s: speech socket open (%d Hz)", sid[:8], rate)
    try:
        await ws.send_str(json.dumps({"type": "ready", "session": sid, "rate": rate,
                                      "delay_ms": round(session.delay * 1000, 1)}))
        async for msg in ws:
            try:
                if msg.type == WSMsgType.BINARY:
                    if len(msg.data) % 2:
                        raise EDTalkError("binary messages are 16-bit PCM: an even number of bytes")
                    utt = session.push_speech(np.frombuffer(msg.data, "<i2"), rate)
                    if utt not in sent_queued:
                        sent_queued.add(utt)
                        await ws.send_str(json.dumps({"type": "queued", "utterance": utt}))
                elif msg.type == WSMsgType.TEXT:
                    data = loads_bounded(msg.data.encode(), "a speech control message", MAX_TEXT_BYTES)
                    kind = data.get("type") if isinstance(data, dict) else None
                    if kind == "end":
                        session.end_speech()
                    elif kind == "interrupt":
                        session.clear_speech()
                    else:
                        raise EDTalkError(f"unknown message {clip(str(kind), 40)!r}: send PCM as binary messages, "
                                          'or {"type": "end"} or {"type": "interrupt"}')
                elif msg.type == WSMsgType.ERROR:
                    break
            except EDTalkError as e:
                await ws.send_str(json.dumps({"type": "error", "error": clip(str(e), 300)}))
    finally:
        session.speech_sources -= 1
        if session_closed in peer.on_close:
            peer.on_close.remove(session_closed)
        if send in session.speech_listeners:
            session.speech_listeners.remove(send)
        session.end_speech()                # what was pushed plays to its end; the session goes on
        session.note_audio()
        logger.info("session %s: speech socket closed", sid[:8])
    return ws
