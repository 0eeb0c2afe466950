"""Python WebRTC client: sends an audio file as if it were a microphone and records what comes back.

    edtalk-live client --server http://127.0.0.1:8080 --audio speech.wav --out recorded.mp4

The audio is sent in real time (20 ms frames, paced by the clock); the avatar video and the
delayed voice are written to an mp4 (H.264 + AAC) with their received timestamps. Used by the
end-to-end tests and the latency benchmark, and for scripted use.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.edtalk.timing import SAMPLE_RATE
from edtalk_live.media.io import load_audio
from edtalk_live.realtime.access import rtc_ice_servers
from edtalk_live.realtime.audio_in import replace_jitter_buffer, shorten_audio_buffer
from edtalk_live.realtime.probe import read_index

logger = logging.getLogger(__name__)

RATE = SAMPLE_RATE
PTIME = 0.02
CHUNK = int(RATE * PTIME)


class FileAudioTrack(MediaStreamTrack):
    """An aiortc audio track that plays 16 kHz mono samples in real time (20 ms frames), then ends."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, tail_silence: float = 0.0):
        super().__init__()
        x = np.clip(np.asarray(samples, np.float32), -1, 1)
        self.samples = (x * 32767).astype(np.int16)
        self.total = len(self.samples) + int(tail_silence * RATE)
        self.pos = 0
        self.t_start: float | None = None       # wall clock (time.time) at which sample 0 was due
        self._loop_start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live" or self.pos >= self.total:
            self.stop()
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._loop_start is None:
            self._loop_start = loop.time()
            self.t_start = time.time()
        wait = self._loop_start + self.pos / RATE - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = self.samples[self.pos: self.pos + CHUNK]
        if len(chunk) < CHUNK:
            chunk = np.concatenate([chunk, np.zeros(CHUNK - len(chunk), np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self.pos
        frame.time_base = fractions.Fraction(1, RATE)
        self.pos += CHUNK
        return frame


def is_keyframe(data: bytes) -> bool:
    """Whether a depacketized video frame decodes on its own: a VP8 key frame (its start code 9d 01 2a after
    the 3-byte frame tag) or H.264 Annex B data with an IDR slice or a sequence parameter set."""
    if len(data) >= 6 and not data[0] & 1 and data[3:6] == b"\x9d\x01\x2a":
        return True
    i = data.find(b"\x00\x00\x01")
    while 0 <= i < len(data) - 3:
        if data[i + 3] & 0x1F in (5, 7):
            return True
        i = data.find(b"\x00\x00\x01", i + 3)
    return False


def _video_buffer_class():
    from aiortc.jitterbuffer import JitterBuffer
    from aiortc.utils import uint16_add, uint32_add

    class CatchUpVideoBuffer(JitterBuffer):
        """aiortc's video jitter buffer, without its stall after a loss.

        aiortc's waits at a missing packet until 128 packets are behind it (5 s of small frames), then hands
        over one frame per packet that arrives: once a packet and its retransmission are both lost, the video
        stays seconds behind for the rest of the call. A browser gives up on the gap and asks for a keyframe;
        so does this buffer: when packets ``max_wait`` (90 kHz ticks) newer than the oldest one held wait behind
        a missing packet, everything before the arriving packet is dropped and a keyframe is asked for (the PLI
        flag); frames are handed over again from that keyframe on (those between decode into garbage).
        """

        def __init__(self, max_wait: int = 90000 * 150 // 1000):
            super().__init__(capacity=128, is_video=True)
            self.max_wait = max_wait
            self.skips = 0
            self._keyless = 0          # frames dropped since a skip while waiting for a keyframe (0: not waiting)
            self._waiting = False

        def add(self, packet):
            pli = False
            origin = self._origin
            if origin is not None:
                # how far the arriving packet is past the oldest one held (RTP timestamps wrap at 2^32): at most
                # a frame while frames complete, more only while they wait behind a missing packet
                ages = [uint32_add(packet.timestamp, -p.timestamp) for p in self._packets if p is not None]
                waited = max((a for a in ages if a < 1 << 31), default=0)
                ahead = uint16_add(packet.sequence_number, -origin)
                if waited > self.max_wait and 0 < ahead < self._capacity:
                    self.remove(ahead)
                    self.skips += 1
                    self._waiting, self._keyless, pli = True, 0, True
            more_pli, frame = super().add(packet)
            if frame is not None and self._waiting:
                # frames after a lost one decode into garbage: none until a keyframe, as a browser holds the last
                if is_keyframe(frame.data):
                    self._waiting = False
                else:
                    self._keyless += 1
                    pli = pli or self._keyless % 25 == 0           # ask again each second until one comes
                    frame = None
            return pli or more_pli, frame

    return CatchUpVideoBuffer


def skip_lost_video(pc, track) -> bool:
    """Give ``track``'s video receiver on ``pc`` a jitter buffer that skips a lost packet after 150 ms and asks
    for a keyframe (see ``CatchUpVideoBuffer``), as browsers do. aiortc has no setting for it: the buffer is
    a private attribute of ``RTCRtpReceiver``, set before any packet arrives. Returns False, with a
    warning, when this aiortc has none to replace."""
    return replace_jitter_buffer(pc, track, _video_buffer_class(), "a lost packet may stall the video")


@dataclass
class ClientResult:
    """What came back from the server."""

    out: Path | None
    video_frames: int = 0
    video_pts: list[int] = field(default_factory=list)           # received RTP-derived pts (90 kHz)
    video_arrival: list[float] = field(default_factory=list)     # wall-clock arrival of each frame
    audio_samples: int = 0
    audio_rate: int = 0
    audio_arrival: list[tuple[float, int]] = field(default_factory=list)   # (wall time, samples so far)
    audio_pts: list[int] = field(default_factory=list)           # each voice frame's pts (RTP clock, audio_rate)
    sent_seconds: float = 0.0
    send_start: float | None = None
    session: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    replies: list[dict] = field(default_factory=list)            # every control-channel reply
    size: tuple[int, int] = (0, 0)
    received_audio: list[np.ndarray] = field(default_factory=list, repr=False)
    frames: list[np.ndarray] = field(default_factory=list, repr=False)
    video_index: list[int] = field(default_factory=list)         # each frame's painted index (``read_probe``)


class _Writer:
    """Writes received video and audio frames to an mp4 with their relative timestamps.

    Encoding runs on its own thread (frames are handed over through a queue), so the event loop,
    which also carries the WebRTC session, never waits for the encoder.
    """

    def __init__(self, path: Path):
        import queue
        import threading

        self.path = path
        self.tmp = path.with_name(f".{path.name}.part")
        self.container = av.open(str(self.tmp), "w", format="mp4")
        self.video = None
        self.audio = None
        self.v0: int | None = None
        self.a_samples = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="client-recorder", daemon=True)
        self._thread.start()

    def add_video(self, frame: av.VideoFrame) -> None:
        self._queue.put(("video", frame))

    def add_audio(self, frame: av.AudioFrame) -> None:
        self._queue.put(("audio", frame))

    def _work(self) -> None:
        while True:
            kind, frame = self._queue.get()
            if kind == "stop":
                return
            if self.error is not None:
                continue
            try:
                self._write_video(frame) if kind == "video" else self._write_audio(frame)
            except Exception as e:  # noqa: BLE001 - reported by close()
                self.error = e

    def _write_video(self, frame: av.VideoFrame) -> None:
        if self.video is None:
            self.video = self.container.add_stream("libx264", rate=25)
            self.video.width, self.video.height = frame.width, frame.height
            self.video.pix_fmt = "yuv420p"
            self.video.time_base = fractions.Fraction(1, 90_000)
            self.video.codec_context.time_base = fractions.Fraction(1, 90_000)
        if self.v0 is None:
            self.v0 = frame.pts
        out = frame.reformat(format="yuv420p")
        out.pts = frame.pts - self.v0
        out.time_base = fractions.Fraction(1, 90_000)
        for packet in self.video.encode(out):
            self.container.mux(packet)

    def _write_audio(self, frame: av.AudioFrame) -> None:
        if self.audio is None:
            self.audio = self.container.add_stream("aac", rate=48_000)
            self.audio.layout = "mono"
            self.resampler = av.AudioResampler(format="fltp", layout="mono", rate=48_000)
        for f in self.resampler.resample(frame):
            f.pts = self.a_samples
            f.time_base = fractions.Fraction(1, 48_000)
            self.a_samples += f.samples
            for packet in self.audio.encode(f):
                self.container.mux(packet)

    def close(self, ok: bool) -> None:
        self._queue.put(("stop", None))
        self._thread.join()
        ok = ok and self.error is None
        try:
            if ok:
                for stream in (self.video, self.audio):
                    if stream is not None:
                        for packet in stream.encode(None):
                            self.container.mux(packet)
            self.container.close()
            if ok:
                self.tmp.replace(self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
        if self.error is not None:
            raise EDTalkError(f"could not record {self.path}: {self.error}")


async def each_frame(track, on_frame: Callable[[Any], Any], what: str = "frame") -> None:
    """Receive ``track`` until it ends, calling ``on_frame(frame)`` for each frame as it comes; an exception of
    ``on_frame`` is logged and the next frame comes (one bad frame must not end a track)."""
    from aiortc.mediastreams import MediaStreamError

    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        try:
            on_frame(frame)
        except Exception:  # noqa: BLE001 - see above
            logger.exception("a received %s failed", what)


def peer_connection(config: dict[str, Any]):
    """A new ``RTCPeerConnection`` with the ICE servers of the server's ``config`` (:func:`server_config`); none
    when it gives none (aiortc's default for None would ask a public STUN server)."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    servers = [e for e in config.get("ice_servers", []) if isinstance(e, dict) and e.get("urls")]
    return RTCPeerConnection(RTCConfiguration(iceServers=rtc_ice_servers(servers)))


async def negotiate(pc, base: str, options: dict[str, Any] | None, headers: dict[str, str] | None,
                    connect_timeout: float, on_answer: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Offer ``pc`` (its tracks and channels added) to the server at ``base`` with the session ``options``,
    apply its answer and wait until the peers are connected; returns the server's answer (``session``,
    ``delay_ms``, ...). Raises :class:`EDTalkError` naming the cause when the server refuses the session, cannot
    be reached, or no connection comes within ``connect_timeout`` seconds."""
    import aiohttp
    from aiortc import RTCSessionDescription

    connected = asyncio.Event()

    @pc.on("connectionstatechange")
    async def on_state():
        if pc.connectionState == "connected":
            connected.set()

    await pc.setLocalDescription(await pc.createOffer())
    payload = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, **(options or {})}
    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(f"{base}/offer", json=payload, headers=headers) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise EDTalkError(f"server refused the session ({resp.status}): {body.get('error', body)}")
        except aiohttp.ClientError as e:
            raise EDTalkError(f"cannot reach {base}: {e}") from None
    if on_answer is not None:                 # e.g. a test that needs the server's candidates
        on_answer(body["sdp"])
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    try:
        await asyncio.wait_for(connected.wait(), connect_timeout)
    except TimeoutError:
        raise EDTalkError(f"no WebRTC connection to {base} within {connect_timeout:g} s") from None
    return body


async def server_config(base: str, headers: dict[str, str] | None) -> dict[str, Any]:
    """The server's ``/config`` (its avatars, emotions, frame size and the ICE servers it gives this client; with
    a token: TURN credentials made for it); empty when it cannot be asked (the offer then says why)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession() as http, http.get(f"{base}/config", headers=headers,
                                                            timeout=aiohttp.ClientTimeout(total=10)) as r:
            config = (await r.json(content_type=None)) if r.status == 200 else {}
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


async def run_client(server: str, audio: str | Path | np.ndarray, out: str | Path | None = None,
                     options: dict[str, Any] | None = None, tail: float | None = None,
                     connect_timeout: float = 20.0, keep_frames: bool = False,
                     control: list[tuple[float, dict | str | Callable[[Any], None]]] | None = None,
                     record_window: bool = True, token: str | None = None,
                     audio_prefetch: int | None = None, read_probe: bool = False,
                     on_answer: Callable[[str], None] | None = None,
                     on_session: Callable[[str], Any] | None = None) -> ClientResult:
    """Connect to ``server``, send ``audio`` in real time, record the answer; returns a :class:`ClientResult`.

    With ``record_window`` (default) only what the server sends for the sent audio is kept: video and
    voice arriving from ``delay`` after the first sample was sent until ``delay`` after the last, where
    ``delay`` is the server's output delay (from the answer), so the recording has one frame per 40 ms
    of sent audio. ``tail`` is how long to stay connected after that (0.5 s). ``control`` lists
    ``(seconds after start, message)`` pairs sent on the ``control`` data channel, e.g.
    ``{"type": "emotion", "name": "happy"}``, or a function called with the channel (tests sending what
    ``send`` would not); every reply is kept in ``ClientResult.replies``. ``on_answer`` is called with the
    server's answer SDP as soon as it comes, ``on_session`` (a function or a coroutine function) with the session
    id once connected, before the audio starts. ``token`` is sent as ``Authorization: Bearer <token>`` (a
    server with a token secret needs it). ``audio_prefetch``
    gives the returned voice the receive buffer the server gives its incoming audio
    (:func:`~edtalk_live.realtime.audio_in.shorten_audio_buffer`) instead of aiortc's, which holds the voice
    about 60 ms after the video, and 300 ms after a packet was lost. ``read_probe`` (a session in probe mode)
    reads each frame's painted index as it arrives into ``ClientResult.video_index`` and keeps the voice, but
    not the frames: a call of hours fits in memory.
    """
    samples = audio if isinstance(audio, np.ndarray) else load_audio(audio, RATE)
    base = server.rstrip("/")
    result = ClientResult(out=Path(out) if out else None, sent_seconds=len(samples) / RATE)
    headers = bearer(token)
    pc = peer_connection(await server_config(base, headers))
    writer = _Writer(result.out) if result.out else None
    sender_track = FileAudioTrack(samples)
    pc.addTrack(sender_track)
    pc.addTransceiver("video", direction="recvonly")
    channel = pc.createDataChannel("control")
    replies: list[dict] = []
    channel.on("message", lambda m: replies.append(json.loads(m)))
    done = asyncio.Event()
    tasks: list[asyncio.Task] = []

    window: list[float] = []          # [start, end] wall-clock window to keep (set once sending starts)

    def keep(now: float) -> bool:
        return bool(window) and window[0] <= now < window[1]

    def on_video(frame: av.VideoFrame, now: float) -> None:
        result.video_frames += 1
        result.video_pts.append(frame.pts)
        result.video_arrival.append(now)
        result.size = (frame.width, frame.height)
        if keep_frames or read_probe:
            image = frame.to_ndarray(format="rgb24")
            if keep_frames:
                result.frames.append(image)
            if read_probe:
                result.video_index.append(read_index(image))
        if writer is not None:
            writer.add_video(frame)

    def on_audio(frame: av.AudioFrame, now: float) -> None:
        result.audio_rate = frame.sample_rate
        result.audio_samples += frame.samples
        result.audio_arrival.append((now, result.audio_samples))
        result.audio_pts.append(frame.pts)
        if keep_frames or read_probe:      # float32: half an hour of voice at 48 kHz is 350 MB
            result.received_audio.append(frame.to_ndarray().reshape(frame.samples, -1).mean(axis=1, dtype=np.float32))
        if writer is not None:
            writer.add_audio(frame)

    async def read(track, on_frame) -> None:
        """Receive ``track`` until it ends, keeping the frames that arrive inside the recording window."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if done.is_set():
                return
            now = time.time()
            if keep(now):
                on_frame(frame, now)

    @pc.on("track")
    def on_track(track):
        if track.kind == "audio" and audio_prefetch is not None:
            shorten_audio_buffer(pc, track, audio_prefetch)
        if track.kind == "video":
            skip_lost_video(pc, track)
        tasks.append(asyncio.ensure_future(read(track, on_video if track.kind == "video" else on_audio)))

    @pc.on("connectionstatechange")
    async def on_state():
        if pc.connectionState in ("failed", "closed"):
            done.set()

    ok = False
    try:
        body = await negotiate(pc, base, options, headers, connect_timeout, on_answer)
        result.session = body.get("session", "")
        if on_session is not None:            # e.g. a benchmark attaching other outputs to the session
            pending = on_session(result.session)
            if asyncio.iscoroutine(pending):
                await pending
        server_delay = float(body.get("delay_ms", 300)) / 1000
        while sender_track.t_start is None:               # sending starts once media flows
            await asyncio.sleep(0.005)
        start = sender_track.t_start
        window[:] = [start + server_delay, start + result.sent_seconds + server_delay]
        if not record_window:
            window[:] = [0.0, float("inf")]
        if control:
            for at, msg in control:
                await asyncio.sleep(max(0.0, start + at - time.time()))
                if channel.readyState == "open":
                    if callable(msg):
                        msg(channel)
                    else:
                        channel.send(msg if isinstance(msg, str) else json.dumps(msg))
        await asyncio.sleep(max(0.0, start + result.sent_seconds - time.time()))
        if channel.readyState == "open":
            channel.send(json.dumps({"type": "stats"}))
        # the last frames leave the server `server_delay` after the audio; the receiver adds its jitter buffer
        await asyncio.sleep(server_delay + (0.5 if tail is None else tail))
        if channel.readyState == "open":
            channel.send(json.dumps({"type": "stats"}))
            await asyncio.sleep(0.2)
        stats = next((r for r in reversed(replies) if r.get("type") == "stats"), {})
        result.stats = stats.get("stats", {})
        result.replies = list(replies)
        result.send_start = sender_track.t_start
        ok = True
        return result
    finally:
        done.set()
        await pc.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, writer.close, ok and result.video_frames > 0)


def bearer(token: str | None) -> dict[str, str] | None:
    """The ``Authorization`` header for ``token`` (None: no header)."""
    return {"Authorization": f"Bearer {token}"} if token else None


def main_client(args) -> int:
    """``edtalk-live client``: returns the exit code."""
    options = {}
    for key in ("avatar", "emotion", "pose"):
        value = getattr(args, key, None)
        if value:
            options[key] = value
    if getattr(args, "probe", False):
        options["probe"] = True
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise InputError(f"output folder does not exist: {Path(args.out).parent}")
    token = args.token or os.environ.get("EDTALK_LIVE_TOKEN")
    result = asyncio.run(run_client(args.server, args.audio, args.out, options, token=token))
    s = result.stats
    print(f"sent {result.sent_seconds:.2f} s of audio; received {result.video_frames} video frames "
          f"{result.size[0]}x{result.size[1]} and {result.audio_samples / max(result.audio_rate, 1):.2f} s of voice"
          + (f"; wrote {result.out}" if result.out else ""))
    if s:
        print(f"server: latency p50 {s.get('latency_ms_p50')} ms, p95 {s.get('latency_ms_p95')} ms, "
              f"A/V offset {s.get('av_offset_ms')} ms, frames dropped {s.get('frames_dropped')}")
    return 0
