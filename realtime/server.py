"""The WebRTC avatar server: aiohttp signaling + aiortc media, one frame scheduler for all sessions.

Routes: ``GET /`` (the browser page), ``POST /offer`` (SDP offer + session options -> answer),
``GET /config`` (avatars, emotions, pose modes, ICE servers, RTMP target names for clients), ``GET /health``,
``GET /metrics`` (Prometheus text, :mod:`edtalk_live.realtime.metrics`), and WHIP ingest and WHEP egress
(``/whip/{stream}``, ``/whep/{target}``: :mod:`edtalk_live.realtime.whip`). State lives on the :class:`AvatarServer`
object, never in module globals; a failing session closes only its own peer connection.

Hostile input: an offer is answered with an answer or a one-line 4xx ``{"error": ...}``, never a 5xx
(but 503 when full): the gate first (:mod:`edtalk_live.realtime.access`: 429 rate limit, 401 token),
then the size (413), bounded JSON and SDP checks (:mod:`edtalk_live.realtime.limits`, 400) before
aiortc parses anything, and any error of aiortc's negotiation is a 400 that closes the peer
connection. Control messages are bounded the same way, rate-limited per session, and never let an
exception into aiortc's receive loop. ICE uses only the servers configured (none: host candidates,
no STUN request to anyone).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import functools
import gc
import importlib.resources
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aiohttp import web

from edtalk_live.avatar.prepare import PreparedAvatar, make_paste_back
from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.engines.base import Renderer
from edtalk_live.realtime import pushsocket
from edtalk_live.realtime.access import OfferGate, cors_middleware, rtc_ice_servers, turn_credentials
from edtalk_live.realtime.audio_in import shorten_audio_buffer
from edtalk_live.realtime.budget import RenderBudget
from edtalk_live.realtime.limits import TokenBuckets, check_offer_sdp, clip, excerpt, loads_bounded
from edtalk_live.realtime.lipbatch import LipBatcher
from edtalk_live.realtime.metrics import SINK_KINDS, BufferSizes, EventLoopLag, ServerMetrics, SessionCounts
from edtalk_live.realtime.protocol import MAX_CONTROL_BYTES, POSE_MODES, SessionOptions, parse_control
from edtalk_live.realtime.rtmp import RtmpSink, check_target
from edtalk_live.realtime.scheduler import FrameScheduler
from edtalk_live.realtime.session import PRODUCER_TICK_S, Session
from edtalk_live.realtime.tracks import WebRTCSink
from edtalk_live.realtime.whip import WhipWhep

logger = logging.getLogger(__name__)

#: how often a session's peer is checked (not connected in time, no audio for a while): a vanished peer is
#: reclaimed at most this long after its timeout (a browser sends audio, silence included, every 20 ms)
WATCH_PERIOD_S = 0.25

#: threads of the event loop's default executor, where aiortc encodes every session's audio and video (asyncio's
#: own default size)
CODEC_THREADS = min(32, (os.cpu_count() or 1) + 4)

#: the browser page, package data of this package
WEB_DIR = Path(str(importlib.resources.files("edtalk_live.realtime") / "web"))


@dataclass(frozen=True)
class ServerSettings:
    """Server configuration (one object, passed down)."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 8
    ice_servers: tuple[dict, ...] = ()          # [{"urls": "stun:...", "username":..., "credential":...}]
    udp_ports: tuple[int, int] | None = None    # restrict ICE host candidates to this port range
    inactivity_timeout: float = 8.0             # seconds without incoming audio before the session is reclaimed
    connect_timeout: float = 15.0               # seconds for ICE/DTLS to connect
    #: seconds added to the lip-sync look-ahead for rendering; None: measured (:mod:`edtalk_live.realtime.budget`)
    render_budget: float | None = None
    #: audio frames aiortc's receiver holds before handing one over (its default, 4, adds 80 ms; audio is
    #: placed by its timestamps here, so reordering needs no buffer; late packets become silence)
    audio_prefetch: int = 1
    #: CPU threads of the renderer (torch intra-op threads, ONNX Runtime's, not spinning): the other cores
    #: are left to the sessions' media; on a 2-core CPU one render thread is faster than two (measured)
    render_threads: int = 1
    #: how far behind real time silence replaces audio that has not arrived (must stay below render_budget;
    #: audio arriving later than this is dropped, so it also bounds the network jitter tolerated)
    jitter_margin: float = 0.05
    max_batch: int = 16
    max_wait_ms: float = 4.0
    max_offer_bytes: int = 64 * 1024
    paste_back_max_size: int | None = 1280      # longest side of paste-back streams (None: the photo's size)
    #: offers a second from one client address, and how many may come at once (None: no limit; behind the
    #: ``--workers`` supervisor the limit is the supervisor's, which sees the clients' addresses)
    offer_rate: float | None = 1.0
    offer_burst: int = 5
    #: HS256 secret of the bearer tokens ``POST /offer`` needs (None: no token needed)
    token_secret: str | None = field(default=None, repr=False)
    #: web origins allowed to call the server from their pages (CORS); none: the page's own origin only
    cors_origins: tuple[str, ...] = ()
    #: TURN servers whose credentials are made per caller from ``turn_secret`` (TURN REST API), valid ``turn_ttl`` s
    turn_servers: tuple[str, ...] = ()
    turn_secret: str | None = field(default=None, repr=False)
    turn_ttl: float = 3600.0
    #: control messages a second per session, and how many may come at once; the rest are dropped
    control_rate: float = 20.0
    control_burst: int = 50
    #: RTMP targets a session may push to, by name (``{"live": "rtmp://host/app/key"}``): a session chooses one by
    #: name (session option ``rtmp``); the URLs (stream keys) are never shown
    rtmp_targets: dict[str, str] = field(default_factory=dict, repr=False)
    #: WHEP viewers of the whole server (each is one more video encode); then 503
    max_viewers: int = 32

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise InputError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_viewers < 0:
            raise InputError(f"max_viewers must be >= 0, got {self.max_viewers}")
        if self.render_threads < 1:
            raise InputError(f"render_threads must be >= 1, got {self.render_threads}")
        if self.audio_prefetch < 0:
            raise InputError(f"audio_prefetch must be >= 0, got {self.audio_prefetch}")
        if self.render_budget is not None and not 0 <= self.jitter_margin < self.render_budget:
            raise InputError(f"jitter_margin ({self.jitter_margin}) must be >= 0 and below render_budget "
                             f"({self.render_budget})")
        if self.offer_rate is not None and not (self.offer_rate > 0 and self.offer_burst >= 1):
            raise InputError(f"offer rate must be > 0 with a burst >= 1, got {self.offer_rate:g}/s, burst "
                             f"{self.offer_burst}")
        if self.turn_servers and not self.turn_secret:
            raise InputError("TURN servers with per-caller credentials need a TURN secret")
        if self.turn_secret and not self.token_secret:
            raise InputError("TURN credentials are handed only to callers with a token: give a token secret too "
                             "(--token-secret), or the TURN server relays for anyone who asks this one")
        if not self.turn_ttl > 0:
            raise InputError(f"turn_ttl must be > 0 seconds, got {self.turn_ttl}")
        if not (self.control_rate > 0 and self.control_burst >= 1):
            raise InputError(f"control rate must be > 0 with a burst >= 1, got {self.control_rate:g}/s, burst "
                             f"{self.control_burst}")
        if self.udp_ports is not None:
            lo, hi = self.udp_ports
            if not (1024 <= lo <= hi <= 65535):
                raise InputError(f"UDP port range must be within 1024-65535, got {lo}-{hi}")
        for name, url in self.rtmp_targets.items():
            check_target(name, url)


def restrict_udp_ports(loop: asyncio.AbstractEventLoop, lo: int, hi: int) -> None:
    """Make ICE bind its host candidates inside ``[lo, hi]`` (aioice binds port 0 otherwise).

    aiortc has no option for this; the loop's ``create_datagram_endpoint`` is wrapped so that a
    bind to port 0 tries the ports of the range in turn.
    """
    original = loop.create_datagram_endpoint
    state = {"next": lo}

    async def create_datagram_endpoint(protocol_factory, local_addr=None, **kw):
        if not local_addr or local_addr[1] != 0:
            return await original(protocol_factory, local_addr=local_addr, **kw)
        span = hi - lo + 1
        for k in range(span):
            port = lo + (state["next"] - lo + k) % span
            try:
                result = await original(protocol_factory, local_addr=(local_addr[0], port), **kw)
            except OSError:
                continue
            state["next"] = port + 1 if port < hi else lo
            return result
        raise OSError(f"no free UDP port in {lo}-{hi} for {local_addr[0]}")

    loop.create_datagram_endpoint = create_datagram_endpoint  # type: ignore[method-assign]


@dataclass
class _Peer:
    """A live session and what feeds it: its caller's peer connection (a WHIP publisher's; None for a session only
    WHEP viewers watch), its watchdog, and what else to close with it (``on_close``: its WHEP viewers)."""

    session: Session
    pc: Any
    watchdog: asyncio.Task | None = None
    closed: bool = False
    log: list[str] = field(default_factory=list)
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


class AvatarServer:
    """Owns the renderer, the scheduler, the prepared avatars and the live sessions."""

    def __init__(self, renderer: Renderer, avatars: dict[str, PreparedAvatar], presets: dict[str, torch.Tensor],
                 settings: ServerSettings | None = None, clip_poses: torch.Tensor | None = None):
        if not avatars:
            raise InputError("the server needs at least one avatar")
        self.renderer = renderer
        self.avatars = avatars
        self.presets = presets if renderer.config.has_expression else {}
        self.clip_poses = clip_poses            # [N,6] head poses of the server's pose clip (pose mode "clip")
        self.settings = settings = settings or ServerSettings()
        # measured render budget: never below what the silence fill behind real time needs (the margin and
        # the producer's tick); its start value comes from timing the renderer at start-up (_warm_up)
        self.budget = RenderBudget(floor=settings.jitter_margin + PRODUCER_TICK_S)
        self.scheduler = FrameScheduler(renderer, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms)
        self.lip_batcher = LipBatcher(renderer.audio_to_lip, functools.partial(self.scheduler.run, stage="lipsync"),
                                      hold=PRODUCER_TICK_S)
        self.peers: dict[str, _Peer] = {}
        self._pastes: dict[str, Any] = {}
        self.started = time.time()
        self._closing: dict[str, Session] = {}          # left self.peers, still closing: still counted as live
        self._pcs: weakref.WeakSet = weakref.WeakSet()   # every peer connection made, until it is freed
        self._tasks: set[asyncio.Task] = set()          # the server's own short tasks (a bye's hang-up)
        self._malloc_trim = _malloc_trim()
        self._releasing: asyncio.Task | None = None     # the memory of ended sessions being given back
        self.prometheus = ServerMetrics(settings.max_sessions, self._live_counts, scheduler=self.scheduler.metrics)
        self.prometheus.sessions.set_function(lambda: len(self.peers))
        self.prometheus.session_fps.set_function(self._mean_fps)
        self.prometheus.av_offset.set_function(self._max_av_offset)
        self.prometheus.peer_connections.set_function(
            lambda: sum(pc.connectionState != "closed" for pc in list(self._pcs)))
        self.prometheus.asyncio_tasks.set_function(_loop_tasks)
        for kind in SINK_KINDS:
            self.prometheus.sinks.active.labels(kind).set_function(functools.partial(self._sinks_of, kind))
        self.gate = OfferGate(settings.token_secret, settings.offer_rate, settings.offer_burst,
                              on_reject=lambda reason: self.prometheus.sessions_rejected.labels(reason).inc())
        self.loop_lag = self._health_metrics()
        self.frame_seconds: float | None = None        # one frame's device work, timed at start-up (_warm_up)
        self.whip = WhipWhep(self)      # WHIP ingest and WHEP egress (POST /whip/{stream}, POST /whep/{target})

    # ------------------------------------------------------------ app
    def app(self) -> web.Application:
        middlewares = [cors_middleware(self.settings.cors_origins)] if self.settings.cors_origins else []
        app = web.Application(client_max_size=self.settings.max_offer_bytes, middlewares=middlewares)
        app.router.add_get("/", self.index)
        if WEB_DIR.is_dir():
            app.router.add_static("/static/", WEB_DIR, show_index=False)
        app.router.add_post("/offer", self.offer)
        app.router.add_get("/config", self.config)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        self.whip.add_routes(app)
        pushsocket.routes(self, app)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _startup(self, _app: web.Application) -> None:
        if self.settings.udp_ports is not None:
            restrict_udp_ports(asyncio.get_running_loop(), *self.settings.udp_ports)
        asyncio.get_running_loop().set_default_executor(_started_pool(CODEC_THREADS))
        await self.scheduler.start()
        self.loop_lag.start()
        if self.settings.render_budget is None:
            await self._warm_up()
        # what start-up made (model, avatars, imports) lives as long as the server: keep it out of the
        # collector's full passes, which otherwise stall the event loop (and every session) for a large heap
        gc.collect()
        gc.freeze()

    async def _warm_up(self, calls: int = 8) -> None:
        """Time one frame's device work (Audio2Lip on a window, a decoder call) on the render thread, and start
        the measured budget from it: a new server's first session gets a budget that fits this device and
        model (the producer's tick, then the lip sync and the frame, with the measured budget's margin)."""
        assets = next(iter(self.avatars.values()))
        r = self.renderer

        def timed() -> float:
            avatar = r.prepare_expression(assets.source, assets.rest_exp)
            lip, pose = torch.zeros(1, r.config.lip_dim), assets.rest_pose.reshape(1, -1)
            windows = torch.zeros(1, 1, 80, 16)
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                r.audio_to_lip(windows)
                r.render(avatar, lip, pose)
                times.append(time.perf_counter() - t0)
            return float(np.percentile(times[1:], 90))

        try:
            frame = await self.scheduler.run(timed, stage="other")
        except Exception:  # noqa: BLE001 - the server still works with the default start value
            logger.exception("timing the renderer at start-up failed; the render budget starts at %.0f ms",
                             self.budget.initial * 1000)
            return
        # a frame of silence fill (no audio arriving) is final the jitter margin behind real time, up to a tick
        # later, and then needs its device work: the budget never goes below that
        self.budget.floor = min(self.settings.jitter_margin + PRODUCER_TICK_S + frame * self.budget.margin + 0.005,
                                self.budget.ceiling)
        self.budget.initial = self.budget.estimate(PRODUCER_TICK_S + frame)
        self.frame_seconds = frame
        logger.info("one frame's device work takes %.1f ms here: the render budget starts at %.0f ms, at least "
                    "%.0f ms", frame * 1000, self.budget.current() * 1000, self.budget.floor * 1000)

    async def _shutdown(self, _app: web.Application) -> None:
        await self.loop_lag.stop()
        await asyncio.gather(*(self.close_peer(sid, "server shutdown") for sid in list(self.peers)))
        await asyncio.gather(*self._tasks, *([self._releasing] if self._releasing else []), return_exceptions=True)
        await self.lip_batcher.close()
        await self.scheduler.stop()

    # ------------------------------------------------------------ routes
    async def index(self, _request: web.Request) -> web.StreamResponse:
        page = WEB_DIR / "index.html"
        if not page.is_file():
            return web.Response(status=404, text="the browser page is not installed")
        return web.FileResponse(page)

    def ice_servers(self, authenticated: bool = True) -> list[dict]:
        """The ICE servers for a peer: the configured ones, plus the TURN servers with credentials made now for
        this peer. A caller that is not ``authenticated`` gets no credentials: neither these nor configured
        ones, when the server has a token secret (without one, anyone may call it and gets what it uses)."""
        s = self.settings
        open_server = s.token_secret is None
        out = [dict(e) for e in s.ice_servers if authenticated or open_server or "credential" not in e]
        if s.turn_servers and authenticated:
            out += [{"urls": url, **turn_credentials(s.turn_secret, s.turn_ttl)} for url in s.turn_servers]
        return out

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response({
            "avatars": list(self.avatars),
            "emotions": sorted(self.presets),
            "pose_modes": [m for m in POSE_MODES if m != "clip" or self.clip_poses is not None],
            "ice_servers": self.ice_servers(self.gate.authenticated(request)),
            "size": self.renderer.config.size,
            "family": self.renderer.config.family,
            "rtmp_targets": list(self.settings.rtmp_targets),      # the names only: a URL holds a stream key
        })

    async def health(self, _request: web.Request) -> web.Response:
        ok = self.scheduler.running
        return web.json_response({"status": "ok" if ok else "degraded", "sessions": len(self.peers),
                                  "max_sessions": self.settings.max_sessions, "backend": self.renderer.describe(),
                                  "uptime_s": round(time.time() - self.started, 1)}, status=200 if ok else 503)

    def _error(self, status: int, message: str) -> web.Response:
        """A one-line JSON error (``message`` cut to 300 characters: it may quote the input)."""
        if status in (400, 413):
            self.prometheus.sessions_rejected.labels("bad_request" if status == 400 else "too_large").inc()
        return web.json_response({"error": clip(message, 300)}, status=status)

    def full(self) -> web.Response | None:
        """The 503 (with ``Retry-After``) a request for a new session gets when the server is full, or None."""
        if len(self.peers) < self.settings.max_sessions:
            return None
        self.prometheus.sessions_rejected.labels("full").inc()
        return web.json_response({"error": f"server full: {len(self.peers)} of {self.settings.max_sessions} "
                                  "sessions in use, try again later"}, status=503, headers={"Retry-After": "5"})

    def options_from(self, params: dict) -> SessionOptions:
        """Session options (the offer's JSON fields, or a WHIP/WHEP URL's query) checked against this server's
        avatars, emotions and pose modes; :class:`InputError` names a bad one."""
        return SessionOptions.from_json(params, list(self.avatars), sorted(self.presets), self.clip_poses is not None,
                                        list(self.settings.rtmp_targets))

    async def offer(self, request: web.Request) -> web.Response:
        refused = self.gate.check(request)
        if refused is not None:
            return refused
        if request.content_length is not None and request.content_length > self.settings.max_offer_bytes:
            return self._error(413, f"offer larger than {self.settings.max_offer_bytes} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, f"offer larger than {self.settings.max_offer_bytes} bytes")
        try:
            params = loads_bounded(body, "the offer", self.settings.max_offer_bytes)
        except InputError as e:
            return self._error(400, f"{e}: it must be a JSON object {{sdp, type, ...options}}")
        if not isinstance(params, dict):
            return self._error(400, "the offer must be a JSON object {sdp, type, ...options}")
        sdp, kind = params.pop("sdp", None), params.pop("type", None)
        if kind != "offer" or not isinstance(sdp, str) or not sdp.strip():
            return self._error(400, 'expected {"type": "offer", "sdp": "<session description>"}')
        full = self.full()
        if full is not None:
            return full
        try:
            options = self.options_from(params)
        except EDTalkError as e:
            return self._error(400, str(e))
        try:
            check_offer_sdp(sdp)        # before aiortc's parser, whose cost some offers make explode
        except InputError as e:
            return self._error(400, f"bad SDP offer: {e}")
        try:
            answer = await self._connect(sdp, options)
        except InputError as e:
            return self._error(400, str(e))
        return web.json_response(answer)

    def rtc_configuration(self):
        """The sessions' ``RTCConfiguration``: the ICE servers configured, and none when none are (an
        explicit empty list: aiortc's default for ``None`` is a public STUN server, asked by every session)."""
        from aiortc import RTCConfiguration

        return RTCConfiguration(iceServers=rtc_ice_servers(self.ice_servers()))

    def new_pc(self):
        """A peer connection with the sessions' ICE configuration, counted in ``edtalk_peer_connections``."""
        from aiortc import RTCPeerConnection

        pc = RTCPeerConnection(self.rtc_configuration())
        self._pcs.add(pc)
        return pc

    def new_session(self, options: SessionOptions, pc=None) -> _Peer:
        """A new session with ``options``, live from here (counted, closed by :meth:`close_peer`); ``pc`` is the
        peer connection that feeds it, if any. Not started: :meth:`Session.start` when its media begins."""
        sid = uuid.uuid4().hex
        paste = self._paste_back(options.avatar) if options.paste_back else None
        session = Session(sid, self.renderer, self.scheduler, self.avatars[options.avatar], options, self.presets,
                          render_budget=self.render_budget(), jitter_margin=self.settings.jitter_margin,
                          paste=paste, lip_batcher=self.lip_batcher, clip_poses=self.clip_poses,
                          on_lag=lambda lag: self.budget.report(lag, load=len(self.peers)),
                          budget_fn=(None if self.settings.render_budget is not None
                                     else lambda: self.budget.current(load=len(self.peers))))
        peer = _Peer(session, pc)
        self.peers[sid] = peer
        self.prometheus.sessions_started.inc()
        if options.rtmp:                  # a WebRTC session's, a WHIP stream's or a WHEP avatar's
            self.push_rtmp(session, options.rtmp)
        return peer

    def watch(self, peer: _Peer) -> None:
        """Start the watchdog of a session fed by a peer connection (see :meth:`_watch`)."""
        sid = peer.session.id
        peer.watchdog = asyncio.create_task(self._watch(sid), name=f"session-{sid[:8]}-watchdog")

    async def _connect(self, sdp: str, options: SessionOptions) -> dict:
        from aiortc import RTCSessionDescription

        pc = self.new_pc()
        peer = self.new_session(options, pc)
        session, sid = peer.session, peer.session.id
        ok = False
        try:
            @pc.on("track")
            def on_track(track):
                if track.kind == "audio" and options.input == "push":
                    session.drain(track)        # the speech is pushed: a microphone track is not listened to
                elif track.kind == "audio":
                    self._shorten_audio_buffer(pc, track)
                    session.consume(track)

            @pc.on("datachannel")
            def on_datachannel(channel):
                bucket = TokenBuckets(self.settings.control_rate, self.settings.control_burst)
                limited = {"now": False}
                session.attach_events(lambda event: channel.send(json.dumps(event)))

                @channel.on("message")
                def on_message(message):
                    try:        # nothing may escape into aiortc's receive loop: it would end the session
                        if bucket.take(None) > 0:
                            if not limited["now"]:      # one error per stretch of dropped messages
                                limited["now"] = True
                                channel.send(json.dumps({"type": "error", "error": (
                                    f"too many control messages (more than {self.settings.control_rate:g} a "
                                    "second): dropping them until they slow down")}))
                            return
                        limited["now"] = False
                        reply = self._control(session, message)
                        channel.send(json.dumps(reply))
                        if reply.get("for") == "bye" and reply["type"] == "ok":
                            self._background(self.close_peer(sid, "bye"), f"session-{sid[:8]}-bye")
                    except Exception:  # noqa: BLE001 - e.g. the channel closed under us
                        logger.warning("session %s: a control message failed", sid[:8], exc_info=True)

            @pc.on("connectionstatechange")
            async def on_state():
                logger.info("session %s: connection %s", sid[:8], pc.connectionState)
                if pc.connectionState == "connected":
                    session.start()
                elif pc.connectionState in ("failed", "closed"):
                    await self.close_peer(sid, f"connection {pc.connectionState}")

            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
                self._guard_text_messages(pc)
                kinds = [t.kind for t in pc.getTransceivers()]
                if "audio" not in kinds or "video" not in kinds:
                    raise InputError("the offer must have one audio (microphone) and one video (avatar) media "
                                     "section")
                sink = WebRTCSink(f"{sid[:8]}", on_count=self.prometheus.sinks.count,
                                  on_av_offset=session.note_av_offset)
                session.add_sink(sink)
                pc.addTrack(sink.voice)
                pc.addTrack(sink.video)
                answer = await pc.createAnswer()
                await pc.setLocalDescription(answer)
            except InputError:
                raise
            except Exception as e:  # noqa: BLE001 - mutated offers raise many exception types, at each step
                logger.info("session %s: negotiation failed: %s: %s", sid[:8], type(e).__name__, clip(str(e)))
                raise InputError(f"bad SDP offer: {type(e).__name__}: {clip(str(e))}") from None
            self.watch(peer)
            ok = True
            logger.info("session %s: started (avatar %s, emotion %s, pose %s)", sid[:8], options.avatar,
                        options.emotion, options.pose)
            return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "session": sid,
                    "delay_ms": round(session.delay * 1000, 1),
                    "lookahead_ms": round(session.lips.latency_s * 1000, 1),
                    "render_budget_ms": round(session.render_budget * 1000, 1)}
        finally:
            if not ok:
                await self.close_peer(sid, "setup failed")

    def push_rtmp(self, session: Session, target: str) -> RtmpSink:
        """Push ``session``'s output to the configured RTMP target named ``target`` too, until the session ends
        (its sink connects now, in a thread of its own, and reconnects with backoff when the receiver refuses or
        drops it; see :mod:`edtalk_live.realtime.rtmp`)."""
        url = self.settings.rtmp_targets.get(target)
        if url is None:
            raise InputError(f"unknown RTMP target {target!r}; available: "
                             f"{', '.join(self.settings.rtmp_targets) or 'none'}")
        height, width = session.idle_frame.shape[:2]
        sink = RtmpSink(url, (width, height), name=f"{session.id[:8]}-{target}", on_count=self.prometheus.sinks.count)
        session.add_sink(sink)
        return sink

    def _background(self, coro, name: str) -> None:
        """Run ``coro`` as a task the server holds until it ends (the loop keeps only weak references)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def render_budget(self) -> float:
        """The render budget of a session starting now: the fixed one, or the measured one."""
        fixed = self.settings.render_budget
        return fixed if fixed is not None else self.budget.current(load=len(self.peers) + 1)

    def _shorten_audio_buffer(self, pc, track) -> None:
        """The peer's audio arrives after ``audio_prefetch`` frames, and a lost packet holds it up by one
        (:func:`~edtalk_live.realtime.audio_in.shorten_audio_buffer`; exercised by tests/test_faults.py's
        packet-loss test)."""
        shorten_audio_buffer(pc, track, self.settings.audio_prefetch)

    @staticmethod
    def _guard_text_messages(pc) -> None:
        """Hand a data-channel text message that is not UTF-8 (or too large to be a control message) to the
        channel as bytes, which :func:`~edtalk_live.realtime.protocol.parse_control` answers with an error.

        aiortc decodes text messages itself, inside its SCTP receive loop: a message that is not UTF-8
        raises there and ends the session. It has no hook for this; the transport's private ``_receive``
        is wrapped (checked by tests/test_hardening.py); when a future aiortc renames it, this logs a
        warning and such a message ends its own session, as before.
        """
        from aiortc.rtcsctptransport import WEBRTC_BINARY, WEBRTC_STRING

        sctp = pc.sctp
        if sctp is None:
            return
        receive = getattr(sctp, "_receive", None)
        if receive is None:
            logger.warning("aiortc's SCTP receive hook not found: a text message that is not UTF-8 will end "
                           "its session")
            return

        async def guarded(stream_id: int, pp_id: int, data: bytes) -> None:
            if pp_id == WEBRTC_STRING:
                try:
                    if len(data) > MAX_CONTROL_BYTES:
                        raise ValueError("too large")
                    data.decode("utf-8")
                except ValueError:      # UnicodeDecodeError included
                    pp_id = WEBRTC_BINARY
            await receive(stream_id, pp_id, data)

        sctp._receive = guarded

    def _paste_back(self, name: str):
        """The avatar's paste-back (built once per avatar, on the renderer's device), as ``render``'s."""
        if name not in self._pastes:
            self._pastes[name] = make_paste_back(self.avatars[name], self.renderer.config.size,
                                                 device=self.renderer.device,
                                                 max_size=self.settings.paste_back_max_size)
        return self._pastes[name]

    def _control(self, session: Session, message: str | bytes) -> dict:
        try:
            return session.control(parse_control(message, session.choices))
        except EDTalkError as e:
            return {"type": "error", "error": str(e)}
        except Exception:  # noqa: BLE001 - a bad message must never take the session down
            logger.exception("session %s: control message %s failed", session.id[:8], excerpt(message))
            return {"type": "error", "error": "internal error handling the control message"}

    async def _watch(self, sid: str) -> None:
        """Reclaim a session whose peer vanished: not connected in time, or no audio for a while."""
        peer = self.peers.get(sid)
        s = self.settings
        while peer is not None and not peer.closed:
            await asyncio.sleep(WATCH_PERIOD_S)
            state = peer.pc.connectionState
            age = peer.session.clock.now()
            if state != "connected" and age > s.connect_timeout:
                await self.close_peer(sid, f"not connected after {s.connect_timeout:g} s ({state})")
            elif state == "connected" and peer.session.idle_seconds > s.inactivity_timeout:
                await self.close_peer(sid, f"no audio for {s.inactivity_timeout:g} s")

    async def close_peer(self, sid: str, reason: str) -> None:
        peer = self.peers.pop(sid, None)
        if peer is None or peer.closed:
            return
        peer.closed = True
        logger.info("session %s: closing (%s)", sid[:8], reason)
        self._closing[sid] = peer.session
        try:
            await peer.session.close()
        finally:
            # its final counts join the totals as it leaves the live ones, in one step: no total goes down
            self.prometheus.session_totals.retire(self._closing.pop(sid).counts())
            try:
                if peer.pc is not None:
                    await peer.pc.close()
            except Exception:  # noqa: BLE001 - pc.close() can raise on a malformed session
                logger.warning("session %s: error while closing the peer connection", sid[:8], exc_info=True)
            for hook in list(peer.on_close):     # a hook may take itself off the list
                try:
                    await hook()
                except Exception:  # noqa: BLE001 - one failing hook must not keep the others
                    logger.warning("session %s: error while closing what watched it", sid[:8], exc_info=True)
            if peer.watchdog is not None and peer.watchdog is not asyncio.current_task():
                peer.watchdog.cancel()
            if self._releasing is None or self._releasing.done():
                self._releasing = asyncio.create_task(self._release_memory(), name="release-memory")

    async def _release_memory(self, after: float = 0.1) -> None:
        """Give the memory of ended sessions back to the OS (once for the sessions that end together).

        A session and its peer connection sit in reference cycles (the tracks and aiortc's event handlers
        point back at them), so they are freed by the garbage collector, not when they end: collect them.
        Then glibc's allocator keeps the freed memory (a session's 2 MB sample ring, frames, codec buffers)
        in its heaps, where later sessions do not fit it back: measured by benchmarks/churn.py, RSS grew
        by about 250 KiB a call until ``malloc_trim`` returned the free pages (0.2-3 ms measured).
        """
        await asyncio.sleep(after)          # aiortc's own tasks of the closed peer connections finish first
        gc.collect()
        if self._malloc_trim is not None:
            # on the loop (a few ms at most): in the default executor it could meet a closed session's last
            # encodes still running there and add a thread to that pool
            self._malloc_trim(0)

    # ------------------------------------------------------------ metrics
    def _health_metrics(self) -> EventLoopLag:
        """What a long run is judged by (``benchmarks/soak.py``): the event loop's lag (sampled while the server
        runs) and the largest size of each per-session buffer, in the server's registry."""
        self.prometheus.registry.register(BufferSizes(lambda: [p.session.buffer_sizes() for p in self.peers.values()]))
        return EventLoopLag(self.prometheus.registry)

    def _sinks_of(self, kind: str) -> int:
        return sum(sink.kind == kind for p in self.peers.values() for sink in p.session.sinks)

    def _live_counts(self) -> list[SessionCounts]:
        return [p.session.counts() for p in self.peers.values()] + [s.counts() for s in self._closing.values()]

    def _mean_fps(self) -> float:
        fps = [s.out.sent / s.clock.now() for s in (p.session for p in self.peers.values())
               if s.clock.now() > 1.0]
        return float(np.mean(fps)) if fps else 0.0

    def _max_av_offset(self) -> float:
        offsets = [abs(x) for p in self.peers.values() for x in list(p.session.stats.av_offset_ms)[-25:]]
        return max(offsets) / 1000 if offsets else 0.0

    async def metrics(self, _request: web.Request) -> web.Response:
        body, content_type = self.prometheus.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})


def _started_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool with all its threads started. asyncio's default executor starts a thread whenever a job finds
    none idle, up to its size, at any time: a closed session's last encode still running when the next session
    encodes grew the server's threads long after start-up (one more after ~400 calls in benchmarks/churn.py)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="asyncio")
    barrier = threading.Barrier(threads)
    for job in [pool.submit(barrier.wait, 10.0) for _ in range(threads)]:
        job.result()
    return pool


def _malloc_trim():
    """glibc's ``malloc_trim`` (None with another C library)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def _loop_tasks() -> int:
    """asyncio tasks not done in the running event loop (0 outside one)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0
