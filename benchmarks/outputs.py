"""Recorders of a session's other outputs, for ``benchmarks/latency.py --outputs``: what an RTMP receiver and a
WHEP viewer get, frame by frame and sample by sample, on the same wall clock as the client that sends the audio.

Each recorder fills a :class:`Recording` of the same shape as the sending client's
:class:`~edtalk_live.realtime.client.ClientResult` (each frame's painted probe index and arrival, the voice as
16 kHz mono chunks with their arrival and timestamps), so :func:`edtalk_live.benchmarks.latency.analyse_session`
measures every output the same way: audio in -> frame out, voice latency, A/V offset, fps, frames lost.

The RTMP receiver is FFmpeg's own RTMP protocol in listen mode (through PyAV) in a child process, so its
decoding does not share the clients' event loop; it streams one JSON line per frame back.

    python -m edtalk_live.benchmarks.outputs rtmp-receive PORT     # the receiver (one publisher, then exits)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from edtalk_live.edtalk.timing import SAMPLE_RATE

logger = logging.getLogger(__name__)

#: the path the benchmark's RTMP receiver listens on (``rtmp://127.0.0.1:PORT/live/bench``)
RTMP_PATH = "live/bench"


@dataclass
class Recording:
    """One output as a receiver got it (wall clock: ``time.time()``). ``frames`` holds each frame's painted probe
    index (read as it arrived), not the image: analyse with ``read_index=int``."""

    output: str
    frames: list[int] = field(default_factory=list)
    video_arrival: list[float] = field(default_factory=list)
    received_audio: list[np.ndarray] = field(default_factory=list, repr=False)   # float32 16 kHz mono chunks
    audio_rate: int = SAMPLE_RATE
    audio_arrival: list[tuple[float, int]] = field(default_factory=list)         # (arrival, samples so far)
    audio_pts: list[int] = field(default_factory=list)                           # each chunk's pts at 16 kHz
    audio_samples: int = 0
    error: str = ""

    def add_frame(self, index: int, wall: float) -> None:
        self.frames.append(int(index))
        self.video_arrival.append(wall)

    def add_voice(self, samples: np.ndarray, pts: int | None, wall: float) -> None:
        self.received_audio.append(np.asarray(samples, np.float32))
        self.audio_samples += len(samples)
        self.audio_arrival.append((wall, self.audio_samples))
        self.audio_pts.append(pts)


# ------------------------------------------------------------------------------------------ RTMP


def rtmp_receive(port: int) -> None:
    """Receive one publisher on ``rtmp://127.0.0.1:PORT/live/bench`` and print, per decoded frame, one JSON line:
    ``{"v": index, "w": wall}`` (the painted probe index) or ``{"a": base64 float32 16 kHz mono, "pts": 16 kHz,
    "w": wall}``; ``{"ready": wall}`` first, ``{"end": error or null}`` last."""
    import av

    from edtalk_live.realtime.probe import read_index

    def emit(**event) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    emit(ready=time.time())
    error = None
    try:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        # no probing ahead (it would hold the first packets back): the FLV header says it all
        with av.open(f"rtmp://127.0.0.1:{port}/{RTMP_PATH}", format="flv",
                     options={"listen": "1", "probesize": "32", "analyzeduration": "0"}) as c:
            for packet in c.demux():
                kind = packet.stream.type
                if kind not in ("video", "audio"):
                    continue
                for frame in packet.decode():
                    wall = time.time()
                    if kind == "video":
                        emit(v=read_index(frame.to_ndarray(format="rgb24")), w=wall)
                        continue
                    pts = None if frame.pts is None else int(round(float(frame.pts * frame.time_base) * SAMPLE_RATE))
                    for out in resampler.resample(frame):
                        samples = out.to_ndarray().reshape(-1).astype(np.float32)
                        emit(a=base64.b64encode(samples.tobytes()).decode(), pts=pts, w=wall)
                        if pts is not None:
                            pts += len(samples)
    except Exception as e:  # noqa: BLE001 - the benchmark reports why the stream ended
        error = f"{type(e).__name__}: {e}"
    emit(end=error)


class RtmpRecorder:
    """The RTMP receiver (:func:`rtmp_receive`) as a child process on ``port``; :meth:`start` waits until it
    listens, :meth:`stop` ends it and returns what it recorded."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"rtmp://127.0.0.1:{port}/{RTMP_PATH}"
        self.recording = Recording("rtmp")
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edtalk_live.benchmarks.outputs", "rtmp-receive", str(self.port),
            stdout=subprocess.PIPE, limit=1 << 24)
        self._reader = asyncio.create_task(self._read(), name="rtmp-recorder")
        await asyncio.wait_for(self._ready.wait(), 30.0)
        await asyncio.sleep(0.3)            # from "ready" to listening on the port

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        rec = self.recording
        while line := await self._proc.stdout.readline():
            ev = json.loads(line)
            if "ready" in ev:
                self._ready.set()
            elif "v" in ev:
                rec.add_frame(ev["v"], ev["w"])
            elif "a" in ev:
                rec.add_voice(np.frombuffer(base64.b64decode(ev["a"]), np.float32), ev["pts"], ev["w"])
            elif "end" in ev and ev["end"]:
                rec.error = ev["end"]

    async def stop(self, wait: float = 5.0) -> Recording:
        """What was received; waits up to ``wait`` seconds for the stream to end (the session's end ends it)."""
        if self._proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), wait)
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 10.0)
            if self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5.0)
        return self.recording


# ------------------------------------------------------------------------------------------ WHEP


class WhepRecorder:
    """A WHEP viewer (aiortc) of a session: :meth:`attach` to session ``sid`` (``POST /whep/{sid}``), and
    :meth:`stop` hangs up (``DELETE``) and returns what it received, frame by frame as aiortc hands it over."""

    def __init__(self, base: str, headers: dict[str, str] | None = None):
        self.base = base.rstrip("/")
        self.headers = dict(headers or {})
        self.recording = Recording("whep")
        self.recording.audio_rate = 0
        self._pc = None
        self._location: str | None = None
        self._tasks: list[asyncio.Task] = []

    async def attach(self, sid: str) -> None:
        import aiohttp
        from aiortc import RTCSessionDescription

        from edtalk_live.realtime.client import peer_connection, server_config, skip_lost_video

        pc = self._pc = peer_connection(await server_config(self.base, self.headers or None))
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")

        @pc.on("track")
        def on_track(track):
            if track.kind == "video":
                skip_lost_video(pc, track)
            self._tasks.append(asyncio.ensure_future(self._read(track)))

        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http, http.post(
                f"{self.base}/whep/{sid}", data=pc.localDescription.sdp,
                headers={**self.headers, "Content-Type": "application/sdp"}) as r:
            answer = await r.text()
            if r.status != 201:
                raise RuntimeError(f"WHEP POST answered {r.status}: {answer[:200]}")
            self._location = r.headers.get("Location")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def _read(self, track) -> None:
        from edtalk_live.realtime.client import each_frame
        from edtalk_live.realtime.probe import read_index

        rec = self.recording

        def add(frame) -> None:
            wall = time.time()
            if track.kind == "video":
                rec.add_frame(read_index(frame.to_ndarray(format="rgb24")), wall)
                return
            rec.audio_rate = frame.sample_rate
            samples = frame.to_ndarray().reshape(frame.samples, -1).mean(axis=1, dtype=np.float32)
            if frame.format.name == "s16":
                samples /= 32768.0
            rec.add_voice(samples, frame.pts, wall)

        await each_frame(track, add, f"{track.kind} frame")

    async def stop(self) -> Recording:
        import aiohttp

        if self._location:
            with contextlib.suppress(Exception):
                async with aiohttp.ClientSession() as http, http.delete(
                        self.base + self._location if self._location.startswith("/") else self._location,
                        headers=self.headers) as r:
                    await r.read()
        if self._pc is not None:
            await self._pc.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return self.recording


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "rtmp-receive":
        rtmp_receive(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m edtalk_live.benchmarks.outputs rtmp-receive PORT")
