"""Shared fixtures: the ``../shared`` parity fixtures and test media, weight folders, short clips; the
server started in the test's event loop (:class:`Running`, imported by the server tests as ``from conftest import``).

Everything that needs ``../shared`` (next to the repository) skips with a reason when it is absent,
so the project's own suite still passes on a machine without it.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import wave
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
import torch
from aiohttp import web
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE_RATE = 16000
SIZE = 64  # image size of the parity fixture networks


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (tests that need ../shared skip without it)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED, "the shared fixtures folder")


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return _require(shared_dir / "fixtures", "the parity fixtures")


@pytest.fixture(scope="session")
def testdata(shared_dir: Path) -> Path:
    """``../shared/testdata/edtalk``: sample media of the EDTalk repository (Apache-2.0)."""
    return _require(shared_dir / "testdata" / "edtalk", "the EDTalk test media")


# ------------------------------------------------------------------------------------------ weights


def _weights_folder(dest: Path, fixture: Path, gen_name: str, presets: Path | None) -> Path:
    """A folder laid out like the official release, from a parity fixture file."""
    data = torch.load(fixture, weights_only=True)
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(data["checkpoint"], dest / gen_name)  # already {'gen': state_dict}
    torch.save(data["audio2lip_checkpoint"], dest / "Audio2Lip.pt")  # {'audio2lip': state_dict}
    if presets is not None:
        (dest / "predefined_exp_weights").mkdir(exist_ok=True)
        for npy in sorted(glob.glob(str(presets / "*.npy"))):
            shutil.copy(npy, dest / "predefined_exp_weights")
    return dest


@pytest.fixture(scope="session")
def edtalk_weights(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path, testdata: Path) -> Path:
    """Weights folder with ``EDTalk.pt`` (size 64), ``Audio2Lip.pt`` and the eight emotion presets."""
    fixture = _require(fixtures_dir / "edtalk_s64.pt", "the edtalk parity fixture")
    return _weights_folder(
        tmp_path_factory.mktemp("weights_edtalk"), fixture, "EDTalk.pt", testdata / "predefined_exp_weights"
    )


@pytest.fixture(scope="session")
def lip_pose_weights(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> Path:
    """Weights folder with ``EDTalk_lip_pose.pt`` (size 64) and ``Audio2Lip.pt``."""
    fixture = _require(fixtures_dir / "lip_pose_s64.pt", "the lip_pose parity fixture")
    return _weights_folder(tmp_path_factory.mktemp("weights_lip_pose"), fixture, "EDTalk_lip_pose.pt", None)


# ------------------------------------------------------------------------------------------ media


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Write float samples ``[N]`` (mono) or ``[N,C]`` in [-1,1] as 16-bit PCM with the ``wave`` module."""
    samples = np.asarray(samples, dtype=np.float64)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def write_mp3(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Encode mono float samples as mp3 with PyAV (skips when PyAV has no mp3 encoder)."""
    codec = next((c for c in ("libmp3lame", "mp3") if c in av.codecs_available), None)
    if codec is None:
        pytest.skip("this PyAV build has no mp3 encoder")
    with av.open(str(path), "w", format="mp3") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None], format="fltp", layout="mono")
        frame.sample_rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="session")
def wav_writer():
    """:func:`write_wav` for tests: ``wav_writer(path, samples, rate) -> path``."""
    return write_wav


@pytest.fixture(scope="session")
def speech(testdata: Path) -> np.ndarray:
    """10 s of speech, float32 mono 16 kHz, read with the ``wave`` module (independent of edtalk_live.media.io)."""
    with wave.open(str(testdata / "mouth_source.wav"), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return (pcm.astype(np.float32) / 32768.0).copy()


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory, speech: np.ndarray) -> dict[str, Path]:
    """Short audio files cut from ``mouth_source.wav``: 2.0 s and 1.23 s wav (16 kHz mono) and a
    1.23 s stereo 44.1 kHz wav (right channel at half level)."""
    d = tmp_path_factory.mktemp("clips")
    cut = speech[: int(1.23 * SAMPLE_RATE)]
    t_out = np.arange(int(round(1.23 * 44100))) / 44100
    resampled = np.interp(t_out, np.arange(len(cut)) / SAMPLE_RATE, cut)
    return {
        "wav_2s": write_wav(d / "speech_2s.wav", speech[: 2 * SAMPLE_RATE], SAMPLE_RATE),
        "wav_1_23s": write_wav(d / "speech_1_23s.wav", cut, SAMPLE_RATE),
        "stereo_44k": write_wav(d / "speech_stereo_44k.wav", np.stack([resampled, 0.5 * resampled], 1), 44100),
    }


@pytest.fixture(scope="session")
def mp3_clip(tmp_path_factory: pytest.TempPathFactory, speech: np.ndarray) -> Path:
    """2.0 s of speech as a 16 kHz mono mp3 written with PyAV."""
    return write_mp3(tmp_path_factory.mktemp("mp3") / "speech_2s.mp3", speech[: 2 * SAMPLE_RATE], SAMPLE_RATE)


@pytest.fixture(scope="session")
def face_image(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Path:
    """The aligned identity crop, resized to 64×64 (PNG)."""
    path = tmp_path_factory.mktemp("face") / "face64.png"
    with Image.open(testdata / "crop_identity_source.jpg") as img:
        img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(path)
    return path


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep ONNX exports and engines made by the tests out of the user's cache."""
    old = os.environ.get("EDTALK_LIVE_CACHE")
    os.environ["EDTALK_LIVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("EDTALK_LIVE_CACHE", None)
    else:
        os.environ["EDTALK_LIVE_CACHE"] = old


# ------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server started on a free port inside the test's event loop."""

    def __init__(self, weights: Path, avatar: Path, align: bool = False, **settings):
        from edtalk_live.realtime.serve import build_server  # the model: only for the server tests
        from edtalk_live.realtime.server import ServerSettings

        settings.setdefault("offer_rate", None)     # the tests send many offers from one address
        self.port = free_port()
        self.server = build_server(weights, avatar, settings=ServerSettings(port=self.port, **settings), align=align,
                                   cache=False)
        self.url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self):
        self.runner = web.AppRunner(self.server.app())
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    def record_answers(self) -> list[str]:
        """From now on, the SDP of every answer the server gives is appended to the returned list."""
        answers: list[str] = []
        original = self.server._connect

        async def spy(sdp, options):
            answer = await original(sdp, options)
            answers.append(answer["sdp"])
            return answer

        self.server._connect = spy
        return answers

    async def get(self, path: str):
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())

    async def metrics(self) -> dict[tuple[str, tuple], tuple[str, float]]:
        """``/metrics`` parsed: ``{(sample name, labels): (family type, value)}``."""
        async with aiohttp.ClientSession() as http, http.get(self.url + "/metrics") as r:
            assert r.status == 200 and r.content_type == "text/plain", (r.status, r.content_type)
            text = await r.text()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                assert key not in samples, f"{key} exported twice"
                samples[key] = (family.type, sample.value)
        return samples

    async def post(self, path: str, data: bytes | str, content_type="application/json"):
        async with aiohttp.ClientSession() as http, http.post(
                self.url + path, data=data, headers={"Content-Type": content_type}) as r:
            return r.status, await r.json(content_type=None)


async def until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
