"""What a live session streams equals what ``render`` writes, for the same photo, audio and options.

Checked as a user would see it: ``edtalk-live serve`` started as a process, a WebRTC client written
here directly on aiortc (not the project's own client) sending the speech in real time and recording
the video, and ``edtalk-live render`` run as a command. The two videos pass through different codecs
(VP8 live, H.264 in the file, and the voice through Opus), so frames are compared with a tolerance,
and the live frames must be much closer to the render with the same options than to one without.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from edtalk_live.media.io import load_audio

pytestmark = pytest.mark.slow

RATE = 16000
SECONDS = 3.0
EXE = str(Path(sys.executable).with_name("edtalk-live"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``edtalk-live serve`` as a user starts it, on a free port."""

    def __init__(self, weights: Path, photo: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "EDTALK_LIVE_CACHE": str(log.parent / "cache")}
        self.proc = subprocess.Popen([EXE, "serve", "--workers", "1", "--weights", str(weights), "--avatar", str(photo),
                                      "--port", str(self.port)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=env)

    def wait(self, timeout: float = 120.0) -> None:
        import urllib.request

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"serve did not come up: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _live_frames(url: str, wav: np.ndarray, options: dict) -> list[tuple[int, np.ndarray]]:
    """Send ``wav`` (16 kHz mono) as a microphone in real time, then a second of silence; return the
    received video frames as (90 kHz timestamp, RGB)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    pcm = (np.clip(np.concatenate([wav, np.zeros(RATE, np.float32)]), -1, 1) * 32767).astype(np.int16)

    class Speech(MediaStreamTrack):
        kind = "audio"

        def __init__(self):
            super().__init__()
            self.pos = 0
            self.t0: float | None = None

        async def recv(self):
            if self.pos >= len(pcm):
                self.stop()
                raise MediaStreamError
            loop = asyncio.get_running_loop()
            self.t0 = loop.time() if self.t0 is None else self.t0
            await asyncio.sleep(max(0.0, self.t0 + self.pos / RATE - loop.time()))
            chunk = pcm[self.pos:self.pos + 320]
            chunk = np.pad(chunk, (0, 320 - len(chunk)))
            frame = av.AudioFrame.from_ndarray(chunk[None], format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, self.pos, fractions.Fraction(1, RATE)
            self.pos += 320
            return frame

    pc = RTCPeerConnection()
    frames: list[tuple[int, np.ndarray]] = []
    done = asyncio.Event()

    @pc.on("track")
    def on_track(track):
        if track.kind != "video":
            return

        async def read():
            try:
                while True:
                    f = await track.recv()
                    frames.append((f.pts, f.to_ndarray(format="rgb24")))
            except MediaStreamError:
                done.set()

        asyncio.ensure_future(read())

    speech = Speech()
    pc.addTrack(speech)
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    body = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, **options}
    async with aiohttp.ClientSession() as http, http.post(url + "/offer", json=body) as r:
        answer = await r.json()
        assert r.status == 200, answer
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    deadline = time.monotonic() + SECONDS + 15
    while speech.readyState == "live" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5 + answer["delay_ms"] / 1000)      # the last frames, delayed like the voice
    await pc.close()
    return frames


def _render(weights: Path, photo: Path, audio: Path, out: Path, *options: str) -> np.ndarray:
    done = subprocess.run([EXE, "render", "--weights", str(weights), "--image", str(photo), "--audio", str(audio),
                           "--out", str(out), "--still", "--no-progress", *options],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with av.open(str(out)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _match(live: list[tuple[int, np.ndarray]], offline: np.ndarray) -> tuple[int, np.ndarray, float, float]:
    """The live frames placed on the offline timeline by their mouth motion.

    Returns the index offset, the mean absolute difference (gray levels) of every offline frame the
    live stream covers, the correlation of the two videos' motion (each frame minus the mean frame)
    at that offset, and the best correlation at offsets 5 or more frames away from it.
    """
    pts0 = live[0][0]
    index = {round(((pts - pts0) % 2**32) / 3600): img.astype(np.float32) for pts, img in live}
    off = offline.astype(np.float32)
    best = None
    corrs = {}
    for k in range(min(index), max(index) - len(off) // 2 + 1):
        common = [i for i in range(len(off)) if k + i in index]
        if len(common) < 0.9 * len(off):
            continue
        a = np.stack([index[k + i] for i in common])
        b = off[common]
        da, db = a - a.mean(0), b - b.mean(0)
        corr = corrs[k] = float((da * db).sum() / np.sqrt((da * da).sum() * (db * db).sum()))
        if best is None or corr > best[2]:
            best = (k, np.abs(a - b).mean(axis=(1, 2, 3)), corr)
    assert best is not None, f"the live stream does not cover the render ({len(index)} frames for {len(off)})"
    elsewhere = max((c for k, c in corrs.items() if abs(k - best[0]) >= 5), default=0.0)
    return (*best, elsewhere)


@pytest.fixture(scope="module")
def visible_mouth(tmp_path_factory, edtalk_weights, lip_pose_weights) -> dict[str, Path]:
    """The fixture weights with Audio2Lip's output scaled up, so the random networks' mouth moves the
    picture by more than the codecs' noise (about 3 gray levels per frame instead of 0.1)."""
    import shutil

    import torch

    out = {}
    for family, src in (("edtalk", edtalk_weights), ("lip_pose", lip_pose_weights)):
        dest = tmp_path_factory.mktemp(f"loud_{family}")
        for item in src.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy)(item, dest / item.name)
        ckpt = torch.load(src / "Audio2Lip.pt", weights_only=True)
        for name in ("mapping.weight", "mapping.bias"):
            ckpt["audio2lip"][name] = ckpt["audio2lip"][name] * 30.0
        torch.save(ckpt, dest / "Audio2Lip.pt")
        out[family] = dest
    return out


@pytest.fixture(scope="module")
def speech_clip(tmp_path_factory, testdata) -> Path:
    wav = load_audio(testdata / "mouth_source.wav")[: int(SECONDS * RATE)]
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=RATE)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray((wav * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = RATE
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


CASES = {
    "edtalk": [({}, ()), ({"emotion": "happy", "intensity": 0.5}, ("--emotion", "happy", "--intensity", "0.5")),
               ({"low_latency": True}, ("--low-latency",))],
    "lip_pose": [({}, ()), ({"low_latency": True}, ("--low-latency",))],
}


@pytest.mark.parametrize("family", ["edtalk", "lip_pose"])
def test_live_session_streams_what_render_writes(family, visible_mouth, tmp_path, testdata, speech_clip):
    weights = visible_mouth[family]
    photo = testdata / "uncrop_face.jpg"            # a photo that needs detection and alignment
    wav = load_audio(speech_clip)
    server = _Server(weights, photo, tmp_path / "serve.log")
    try:
        server.wait()
        results = {}
        for options, flags in CASES[family]:
            live = asyncio.run(_live_frames(server.url, wav, {"pose": "still", **options}))
            assert len(live) > SECONDS * 25 * 0.8, f"{len(live)} frames received for {options}"
            name = json.dumps(options, sort_keys=True)
            results[name] = (live, _render(weights, photo, speech_clip, tmp_path / f"r{len(results)}.mp4", *flags))
    finally:
        server.stop()

    matched = {name: _match(live, offline) for name, (live, offline) in results.items()}
    for name, (k, diffs, corr, elsewhere) in matched.items():
        # VP8 (live) against H.264 (file) of a 64x64 face, the lips read from Opus-coded speech
        assert np.median(diffs) < 4.5 and np.percentile(diffs, 95) < 6.0, \
            (name, k, np.round(np.percentile(diffs, [50, 95, 100]), 2).tolist())
        # the mouth moves with the render's, at one place in time only
        assert corr > 0.15 and corr > 2 * elsewhere, \
            f"{name}: the live mouth does not follow the render's (correlation {corr:.2f}, {elsewhere:.2f} elsewhere)"
    if family == "edtalk":           # the emotion shows: the live frames are far from a render without it
        live_happy = results[json.dumps({"emotion": "happy", "intensity": 0.5}, sort_keys=True)][0]
        _, wrong, _, _ = _match(live_happy, results["{}"][1])
        right = matched[json.dumps({"emotion": "happy", "intensity": 0.5}, sort_keys=True)][1]
        assert np.median(wrong) > np.median(right) + 2.0, (np.median(wrong), np.median(right))
