"""RTMP output (realtime/rtmp.py): a session's video and voice pushed to a local receiver (FFmpeg's RTMP protocol in
listen mode, tests/rtmp_receiver.py), its timing and reconnects; the targets' configuration and its checks."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Running, free_port
from conftest import until as _until

from edtalk_live.clients.cli import main as cli_main
from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.timing import FPS, SAMPLES_PER_FRAME
from edtalk_live.realtime.pacer import Pacer, SessionClock
from edtalk_live.realtime.protocol import Choices, SessionOptions
from edtalk_live.realtime.rtmp import RtmpError, RtmpSink, check_target, parse_targets
from edtalk_live.realtime.server import ServerSettings
from edtalk_live.realtime.sinks import MediaChunk

RECEIVER = Path(__file__).with_name("rtmp_receiver.py")
FRAME = 1 / FPS
KEY = "s3cret-stream-key"


async def until(predicate, timeout: float) -> None:
    """Wait for ``predicate()`` to hold; fail the test when it does not within ``timeout`` seconds."""
    await _until(predicate, timeout)
    assert predicate(), f"timed out after {timeout:g} s"


class Receiver:
    """tests/rtmp_receiver.py as a process on ``port``; its events collected as they come."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"rtmp://127.0.0.1:{port}/live/s"
        self.events: list[dict] = []
        self.proc = subprocess.Popen([sys.executable, str(RECEIVER), str(port)], stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def of(self, ev: str) -> list[dict]:
        return [e for e in list(self.events) if e["ev"] == ev]

    def video_packets(self) -> list[dict]:
        return [e for e in self.of("p") if e["kind"] == "video"]

    def stop(self) -> None:
        """Stop it as a restarted server does: the process ends, its connection with it."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(5)

    def wait_end(self, timeout: float = 10.0) -> None:
        self.proc.wait(timeout)
        self._reader.join(5)


@pytest.fixture
def receivers():
    """``receivers(port)`` starts a :class:`Receiver`; any still running at the end of the test is killed."""
    made: list[Receiver] = []

    def start(port: int) -> Receiver:
        made.append(Receiver(port))
        return made[-1]

    yield start
    for rx in made:
        if rx.proc.poll() is None:
            rx.proc.kill()
            rx.proc.wait(5)


def marked(index: int, size: tuple[int, int] = (65, 49)) -> np.ndarray:
    """Frame ``index``: white once a second (index % 25 == 0), black otherwise; ``size`` is (width, height)."""
    return np.full((size[1], size[0], 3), 255 if index % FPS == 0 else 0, np.uint8)


def voice(start: int, n: int) -> np.ndarray:
    """Voice samples ``[start, start + n)``: a 1 kHz tone at half scale under each white frame, silence elsewhere."""
    t = start + np.arange(n)
    loud = (t // SAMPLES_PER_FRAME) % FPS == 0
    return np.where(loud, 0.5 * 32767 * np.sin(2 * np.pi * 1000 * t / 16000), 0).astype(np.int16)


def chunk(index: int) -> MediaChunk:
    return MediaChunk(index, marked(index), voice(index * SAMPLES_PER_FRAME, SAMPLES_PER_FRAME), due=0.0)


def check_connection(rx: Receiver, label: str) -> dict:
    """What one connection of the sink delivered, checked: 25 fps in its timestamps and as it arrived, one frame
    per 40 ms of voice, lips (white frames) and voice (tone onsets) within a frame, 2 s GOP, starting at 0."""
    packets = rx.video_packets()
    frames, audio = rx.of("v"), rx.of("a")
    assert len(frames) >= 2 * FPS, f"{label}: only {len(frames)} video frames"
    t = np.array([f["t"] for f in frames])
    assert t[0] < 2 * FRAME, f"{label}: the connection's timestamps start at {t[0]:.3f} s, not 0"
    steps = np.diff(t)
    assert np.allclose(steps, FRAME, atol=0.0015), f"{label}: gaps in the video timestamps: {np.unique(steps)}"
    pts_fps = (len(t) - 1) / (t[-1] - t[0])
    # as the frames arrived: the sink keeps real time (counted from the 13th frame: a new connection's first frames
    # can reach the receiver together, as the RTMP handshake's last steps and the first encode finish)
    wall = np.array([p["wall"] for p in packets])[FPS // 2:]
    wall_fps = (len(wall) - 1) / (wall[-1] - wall[0])
    assert abs(pts_fps - FPS) <= 1 and abs(wall_fps - FPS) <= 1, (label, pts_fps, wall_fps)
    audio_s = sum(a["n"] for a in audio) / 48000
    assert abs(audio_s - len(frames) * FRAME) <= 2 * FRAME, (label, audio_s, len(frames))
    a0 = next(p["t"] for p in rx.of("p") if p["kind"] == "audio")
    assert abs(a0 - packets[0]["t"]) <= FRAME, (label, a0, packets[0]["t"])
    flashes = [f["t"] for f in frames if f["luma"] > 128]
    onsets = [a["onset"] for a in audio if a["onset"] is not None]
    assert len(flashes) >= 2, f"{label}: {len(flashes)} white frames"
    spread = [min((o - f for o in onsets if o > f - 0.2), key=abs, default=1.0) for f in flashes]
    assert max(abs(s) for s in spread) <= FRAME, f"{label}: tone onset - white frame: {spread}"
    keys = [p["t"] for p in packets if p["key"]]
    assert np.allclose(np.diff(keys), 2.0, atol=0.002), f"{label}: keyframes at {keys}"
    (info,) = rx.of("connected")
    assert info["audio"] == {"codec": "aac", "rate": 48000, "channels": 2}, info
    assert {(f["w"], f["h"]) for f in frames} == {(64, 48)}, "the 65x49 images are not cut to even sizes"
    return {"frames": len(frames), "pts_fps": pts_fps, "wall_fps": wall_fps, "av_ms": 1000 * max(map(abs, spread)),
            "audio_s": audio_s}


# ------------------------------------------------------------------------------------------ the stream


@pytest.mark.slow
def test_stream_keeps_25_fps_in_sync_and_reconnects_after_the_receiver_restarts(receivers):
    """A pacer on the real clock feeds the sink for ~3 s, the receiver stops (the sink's next send fails, then a
    connection is refused), comes back, and the stream goes on from a new connection for ~3 s more."""
    port = free_port()
    counted: dict[tuple[str, str], int] = {}

    def on_count(kind, what, n):
        counted[kind, what] = counted.get((kind, what), 0) + n

    async def main():
        rx1 = receivers(port)
        await until(lambda: rx1.of("listening"), 10)
        await asyncio.sleep(0.3)                    # from printing "listening" to listening
        clock = SessionClock(0.0)
        pacer = Pacer(clock, marked, voice, marked(1))
        sink = RtmpSink(rx1.url, (65, 49), name="test", on_count=on_count)
        pacer.sinks.append(sink)
        sink.start()
        pacing = asyncio.create_task(pacer.run())
        try:
            await until(lambda: len(rx1.of("v")) >= 3 * FPS, 15)
            rx1.stop()
            await until(lambda: sink.stats.errors >= 2, 10)     # the send failed, then a connection was refused
            rx2 = receivers(port)
            await until(lambda: rx2.of("p"), 10)
            reconnect_s = rx2.of("p")[0]["wall"] - rx2.of("listening")[0]["wall"]
            await until(lambda: len(rx2.of("v")) >= 3 * FPS, 15)
        finally:
            pacing.cancel()
            await sink.stop()
        rx2.wait_end()
        return rx1, rx2, sink, reconnect_s

    rx1, rx2, sink, reconnect_s = asyncio.run(main())
    first, second = check_connection(rx1, "first connection"), check_connection(rx2, "after the restart")
    assert rx2.of("end")[0]["error"] is None or "Input/output" in rx2.of("end")[0]["error"]
    assert sink.stats.reconnects == 1 and counted["rtmp", "reconnects"] == 1, (sink.stats, counted)
    assert counted["rtmp", "frames"] == sink.stats.frames >= first["frames"] + second["frames"] - 2
    # the refused connection backs off 1 s before the next try; the receiver came up within that
    assert reconnect_s <= 1.5, f"reconnected {reconnect_s:.2f} s after the receiver listened again"
    print(f"rtmp: {first} / after restart {second}; reconnected {reconnect_s * 1000:.0f} ms after the receiver "
          f"listened again")


@pytest.mark.slow
def test_frames_missing_from_the_session_leave_gaps_not_shifted_timestamps(receivers):
    """Chunks 0-49, then 76-125 (a second skipped): the video timestamps jump by the gap, and the voice after
    it stays with the video (each new connection starts at 0: the first chunk here is 0)."""
    port = free_port()

    async def main():
        rx = receivers(port)
        await until(lambda: rx.of("listening"), 10)
        await asyncio.sleep(0.3)
        sink = RtmpSink(rx.url, (65, 49), name="gaps", capacity=200)
        sink.start()
        await until(lambda: sink.connected, 10)     # a new connection drops what was queued before it
        for index in [*range(0, 50), *range(76, 126)]:
            sink.put(chunk(index))
        await until(lambda: sink.stats.frames == 100, 20)
        await sink.stop()
        rx.wait_end()
        return rx

    rx = asyncio.run(main())
    t = np.array([f["t"] for f in rx.of("v")])
    assert len(t) == 100, len(t)
    steps = np.round(np.diff(t), 3)
    assert sorted(set(steps.tolist())) == [0.04, 1.08], steps
    assert t[50] - t[0] == pytest.approx(76 * FRAME, abs=0.002)
    flashes = [f["t"] for f in rx.of("v") if f["luma"] > 128]
    onsets = [a["onset"] for a in rx.of("a") if a["onset"] is not None]
    # white frames 0, 25, 100 and 125: at 0, 1, 4 and 5 s of the stream
    assert len(flashes) == 4 and np.allclose(np.subtract(flashes, flashes[0]), [0, 1, 4, 5], atol=0.002), flashes
    for f in flashes:          # each white frame with its tone, before the gap and after it
        assert min(abs(o - f) for o in onsets) <= FRAME, (f, onsets)
    audio_s = sum(a["n"] for a in rx.of("a")) / 48000
    assert abs(audio_s - 100 * FRAME) <= 2 * FRAME, audio_s     # the voice has the same gap: no extra audio


def test_a_receiver_that_never_answers_times_out_and_errors_hide_the_stream_key():
    """Connecting to a port that accepts and says nothing gives up after ``io_timeout``; a refused connection
    fails at once; neither error shows the URL (its path holds the stream key)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        sink = RtmpSink(f"rtmp://127.0.0.1:{server.getsockname()[1]}/live/{KEY}", (64, 64), name="silent")
        sink.io_timeout = 0.5
        t0 = time.monotonic()
        with pytest.raises(RtmpError) as silent:
            sink.open()
        took = time.monotonic() - t0
        sink.close()
    assert 0.4 <= took <= 3.0, f"gave up after {took:.2f} s"
    refused = RtmpSink(f"rtmp://127.0.0.1:{free_port()}/live/{KEY}", (64, 64), name="refused")
    with pytest.raises(RtmpError) as no_one:
        refused.open()
    refused.close()
    for e in (silent.value, no_one.value):
        assert KEY not in str(e) and "127.0.0.1" not in str(e), str(e)
    assert "timed out" in str(silent.value).lower() and "refused" in str(no_one.value).lower()
    assert KEY not in repr(sink)


# ------------------------------------------------------------------------------------------ configuration


def test_targets_are_checked():
    assert parse_targets(["live=rtmp://a.example.com/live2/key", "backup=rtmps://b.example.com:443/app/k"]) == {
        "live": "rtmp://a.example.com/live2/key", "backup": "rtmps://b.example.com:443/app/k"}
    bad = {
        "live=http://example.com/live/key": "rtmp:// or rtmps://",
        "live=rtmp:/example.com/key": "rtmp:// or rtmps://",
        "live=rtmp:///app/key": "no host",
        "live=file:///etc/passwd": "rtmp:// or rtmps://",
        "live=rtmp://host/app/a key": "without spaces",
        "live=rtmp://host:99999/app/key": "bad port",
        "li ve=rtmp://host/app/key": "letters, digits",
        "=rtmp://host/app/key": "letters, digits",
        "a/b=rtmp://host/app/key": "letters, digits",
        "rtmp://host/app/key": "NAME=rtmp://",
    }
    for spec, why in bad.items():
        with pytest.raises(InputError, match=why):
            parse_targets([spec])
    with pytest.raises(InputError, match="given twice"):
        parse_targets(["live=rtmp://a/x/1", "live=rtmp://b/x/2"])
    with pytest.raises(InputError, match="rtmp:// or rtmps://") as e:
        check_target("live", f"https://host/{KEY}")
    assert KEY not in str(e.value)


def test_settings_check_targets_and_never_show_their_urls():
    settings = ServerSettings(rtmp_targets={"live": f"rtmp://host/app/{KEY}"})
    assert KEY not in repr(settings)
    with pytest.raises(InputError, match="rtmp:// or rtmps://"):
        ServerSettings(rtmp_targets={"live": f"udp://host/{KEY}"})
    with pytest.raises(InputError, match="target name"):
        ServerSettings(rtmp_targets={"no spaces": "rtmp://host/app/key"})


def test_serve_refuses_a_bad_target_before_loading_anything(capsys, monkeypatch):
    monkeypatch.delenv("EDTALK_LIVE_RTMP_TARGETS", raising=False)
    assert cli_main(["serve", "--rtmp-target", f"live=http://host/{KEY}"]) != 0
    err = capsys.readouterr().err
    assert "rtmp:// or rtmps://" in err and KEY not in err, err
    assert cli_main(["serve", "--rtmp-target", "a=rtmp://h/x/1", "--rtmp-target", "a=rtmp://h/x/2"]) != 0
    assert "given twice" in capsys.readouterr().err
    monkeypatch.setenv("EDTALK_LIVE_RTMP_TARGETS", "good=rtmp://h/x/1 bad=rtmpx://h/x/2")
    assert cli_main(["serve"]) != 0
    assert "RTMP target bad" in capsys.readouterr().err


def test_session_option_rtmp_takes_a_configured_name_only():
    choices = Choices(avatars=("a",), rtmp_targets=("live", "backup"))
    assert SessionOptions.parse({"rtmp": "live"}, choices).rtmp == "live"
    assert SessionOptions.parse({}, choices).rtmp is None and SessionOptions.parse({"rtmp": ""}, choices).rtmp is None
    for value in ("nope", "rtmp://evil.example.com/app/key", 3, ["live"]):
        with pytest.raises(InputError, match="unknown RTMP target .*available: live, backup"):
            SessionOptions.parse({"rtmp": value}, choices)
    with pytest.raises(InputError, match="available: none"):
        SessionOptions.parse({"rtmp": "live"}, Choices(avatars=("a",)))


# ------------------------------------------------------------------------------------------ the server


@pytest.mark.slow
def test_session_pushed_to_a_configured_target(receivers, edtalk_weights, face_image, speech):
    """A real session with ``"rtmp": "test"``: the receiver gets its frames and voice at 25 fps; /config lists
    the target's name, never its URL; an unknown name is a 400 naming the configured ones; the sink ends with
    the session and is counted in /metrics."""
    from edtalk_live.realtime.client import run_client

    port = free_port()
    seconds = 3.0

    async def main():
        rx = receivers(port)
        await until(lambda: rx.of("listening"), 10)
        target = f"rtmp://127.0.0.1:{port}/live/s"
        async with Running(edtalk_weights, face_image, rtmp_targets={"test": target}) as srv:
            _, config = await srv.get("/config")
            unknown = await srv.post("/offer", json.dumps({"type": "offer", "sdp": "v=0", "rtmp": "other"}))
            url = await srv.post("/offer", json.dumps({"type": "offer", "sdp": "v=0", "rtmp": target}))
            result = await run_client(srv.url, speech[: int(seconds * 16000)], None, {"rtmp": "test"})
            await until(lambda: not srv.server.peers, 10)
            await asyncio.to_thread(rx.wait_end)
            metrics = await srv.metrics()
        return rx, config, unknown, url, result, metrics, target

    rx, config, unknown, url, result, metrics, target = asyncio.run(main())
    assert config["rtmp_targets"] == ["test"] and target not in json.dumps(config) and "rtmp://" not in json.dumps(
        config)
    for status, body in (unknown, url):
        assert status == 400 and "unknown RTMP target" in body["error"] and "available: test" in body["error"], body
    frames = rx.of("v")
    t = np.array([f["t"] for f in frames])
    # the session's output from connect to hang-up: at least the sent speech, at 25 fps without gaps
    assert len(frames) >= seconds * FPS - 3, (len(frames), result.video_frames)
    assert np.allclose(np.diff(t), FRAME, atol=0.0015), np.unique(np.round(np.diff(t), 3))
    assert {(f["w"], f["h"]) for f in frames} == {(64, 64)}
    audio_s = sum(a["n"] for a in rx.of("a")) / 48000
    assert abs(audio_s - len(frames) * FRAME) <= 2 * FRAME, (audio_s, len(frames))
    assert any(a["onset"] is not None for a in rx.of("a")), "no voice in the RTMP stream"
    assert rx.of("end"), "the sink did not end with the session"
    sent = metrics[("edtalk_sink_frames_total", (("kind", "rtmp"),))][1]
    assert abs(sent - len(frames)) <= 2, (sent, len(frames))
    assert metrics[("edtalk_sinks", (("kind", "rtmp"),))][1] == 0
    print(f"rtmp session: {len(frames)} frames, {audio_s:.2f} s of voice, {sent:g} counted; the peer got "
          f"{result.video_frames}")
