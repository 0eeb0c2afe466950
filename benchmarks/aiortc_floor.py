"""aiortc's own cost: a server with edtalk-live's media and signaling that computes nothing.

    python -m edtalk_live.benchmarks.aiortc_floor --port 8770 --size 64

It answers ``POST /offer`` as ``edtalk-live serve`` does (the same JSON, so the same clients connect),
receives the peer's voice (Opus, decoded by aiortc), sends it straight back (encoded again) and sends a
still picture of ``--size`` pixels at 25 fps (VP8 or H.264, as negotiated). ``/health``, ``/config``
and ``/metrics`` (the process's CPU, sessions, frames sent) are what the benchmarks read from
``serve``. ``benchmarks/capacity.py --baseline`` ramps it beside the real server, so the table shows
what a session costs over what aiortc itself spends on the same media, measured in the same run.

Not a product: no avatar, no lip sync, no limits, no authentication. It binds to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import logging
import time
from collections.abc import Sequence

import av
import numpy as np

from edtalk_live.edtalk.timing import FPS

logger = logging.getLogger(__name__)

VIDEO_CLOCK = 90000


def build_app(size: int):
    """The aiohttp application (routes ``/offer``, ``/health``, ``/config``, ``/metrics``)."""
    from aiohttp import web
    from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        ProcessCollector,
        generate_latest,
    )

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    frames_sent = Counter("edtalk_frames_sent", "video frames sent", registry=registry)
    peers: set = set()
    Gauge("edtalk_sessions", "live sessions", registry=registry).set_function(lambda: len(peers))
    picture = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)

    class StillVideo(MediaStreamTrack):
        """The same picture at 25 fps on the wall clock."""

        kind = "video"

        def __init__(self):
            super().__init__()
            self._start: float | None = None
            self._n = 0

        async def recv(self) -> av.VideoFrame:
            if self._start is None:
                self._start = time.monotonic()
            self._n += 1
            await asyncio.sleep(max(0.0, self._start + self._n / FPS - time.monotonic()))
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = self._n * VIDEO_CLOCK // FPS, fractions.Fraction(1, VIDEO_CLOCK)
            frames_sent.inc()
            return frame

    class Echo(MediaStreamTrack):
        """The peer's voice, frame by frame, as received."""

        kind = "audio"

        def __init__(self, source):
            super().__init__()
            self._source = source

        async def recv(self) -> av.AudioFrame:
            return await self._source.recv()

    async def offer(request: web.Request) -> web.Response:
        body = await request.json()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        peers.add(pc)

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                pc.addTrack(Echo(track))

        @pc.on("datachannel")
        def on_datachannel(channel):
            @channel.on("message")
            def on_message(message):
                if isinstance(message, str) and '"stats"' in message:
                    channel.send(json.dumps({"type": "stats", "stats": {}}))

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                peers.discard(pc)
                await pc.close()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                transceiver.sender.replaceTrack(StillVideo())
                transceiver.direction = "sendonly"
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "session": f"floor-{id(pc):x}", "delay_ms": 0})

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "sessions": len(peers), "backend": "none (aiortc only)"})

    async def config(_request: web.Request) -> web.Response:
        return web.json_response({"size": size})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close_all(_app) -> None:
        await asyncio.gather(*(pc.close() for pc in list(peers)), return_exceptions=True)
        peers.clear()

    app = web.Application()
    app.router.add_post("/offer", offer)
    app.router.add_get("/health", health)
    app.router.add_get("/config", config)
    app.router.add_get("/metrics", metrics)
    app.on_shutdown.append(close_all)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    from aiohttp import web

    p = argparse.ArgumentParser(prog="python -m edtalk_live.benchmarks.aiortc_floor",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8770)
    p.add_argument("--size", type=int, default=64, help="side of the picture sent, in pixels (64)")
    args = p.parse_args(argv)
    if not 16 <= args.size <= 4096:
        p.error("--size must be within 16..4096")
    logging.basicConfig(level=logging.WARNING)
    web.run_app(build_app(args.size), host="127.0.0.1", port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
