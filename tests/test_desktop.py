"""The desktop client (``edtalk-live client --mic``): its voice buffer, clocks and measurements; the avatar window
and the virtual camera (a fake pyvirtualcam backend); the whole client on a machine without a sound card, through
a user-mode PulseAudio daemon and its null sinks.

The PulseAudio test starts its own daemon with two null sinks: ``mic``, whose monitor is the client's
microphone, and ``speaker``, where the client plays the voice. It plays tone bursts into ``mic``, records
``mic.monitor`` and ``speaker.monitor``, and measures how much later each burst comes out of the speaker. It
skips without ``pulseaudio``/``pacat``/``parec`` (Debian: pulseaudio, pulseaudio-utils) or PortAudio
(libportaudio2). PortAudio reaches PulseAudio through ALSA's ``pulse`` device (libasound2-plugins, which
pulseaudio pulls in); ``PULSE_SOURCE``/``PULSE_SINK`` pick the null sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import Running, free_port, write_wav

from edtalk_live.clients.desktop import (
    DesktopClient,
    DesktopOptions,
    format_measurement,
    format_summary,
    voice_round_trip,
)
from edtalk_live.clients.sound import SampleClock, StreamHistory, VoiceBuffer
from edtalk_live.clients.video_out import AvatarWindow, VideoItem, fit
from edtalk_live.edtalk.errors import EDTalkError, InputError

RATE = 48_000


# ------------------------------------------------------------------------------------------ the voice buffer


def _ramp(start: int, n: int) -> np.ndarray:
    """Samples whose value says their position (to check what is played where)."""
    return (np.arange(start, start + n) % 10_000).astype(np.float32) / 10_000


def test_voice_buffer_starts_at_its_target_and_plays_in_order():
    buf = VoiceBuffer(target=1920, slack=4800)
    buf.write(1000, _ramp(0, 960))
    out, at = buf.read(480)
    assert at is None and not out.any(), "played before the target was held"
    buf.write(1960, _ramp(960, 960))
    played = [buf.read(480) for _ in range(4)]
    assert [a for _, a in played] == [0, 480, 960, 1440]
    assert np.allclose(np.concatenate([o for o, _ in played]), _ramp(0, 1920))
    assert buf.underruns == 0 and buf.played == 1920


def test_voice_buffer_places_frames_by_timestamp_and_fills_a_gap_with_silence():
    buf = VoiceBuffer(target=960, slack=10_000)
    buf.write(0, _ramp(0, 960))
    buf.write(1920, _ramp(1920, 960))          # the frame at 960 was lost
    out, at = buf.read(2880)
    assert at == 0
    assert np.allclose(out[:960], _ramp(0, 960)) and not out[960:1920].any()
    assert np.allclose(out[1920:], _ramp(1920, 960))


def test_voice_buffer_underrun_plays_silence_and_resumes_where_it_stopped():
    buf = VoiceBuffer(target=960, slack=10_000)
    buf.write(0, _ramp(0, 1200))
    out, _ = buf.read(960)
    out, at = buf.read(960)                    # 240 held: they play, then silence
    assert at == 960 and np.allclose(out[:240], _ramp(960, 240)) and not out[240:].any()
    assert buf.underruns == 1 and buf.waiting
    buf.write(1200, _ramp(1200, 480))
    assert buf.read(480)[1] is None            # waits for the target again
    buf.write(1680, _ramp(1680, 480))
    out, at = buf.read(480)
    assert at == 1200 and np.allclose(out, _ramp(1200, 480)), "lost voice after the underrun"


def test_voice_buffer_skips_ahead_when_it_holds_too_much():
    buf = VoiceBuffer(target=960, slack=960)
    buf.write(0, _ramp(0, 960))
    buf.read(480)
    buf.write(960, _ramp(960, 4800))           # a burst: 5280 held, more than target + slack
    out, at = buf.read(480)
    assert at == 5760 - 960 and buf.skipped == 5760 - 960 - 480
    assert np.allclose(out, _ramp(at, 480))


def test_voice_buffer_reanchors_when_the_sender_restarts_its_timestamps():
    buf = VoiceBuffer(target=480, slack=10_000)
    buf.write(10**6, _ramp(0, 960))
    buf.read(960)
    pos = buf.write(5, _ramp(0, 480))          # far behind what played: a new clock
    assert pos == 960 and buf.resyncs == 1


# ------------------------------------------------------------------------------------------ clocks, measurements


def test_sample_clock_takes_the_earliest_callback_as_on_time():
    clock = SampleClock(1000)
    for k, late in enumerate([0.004, 0.0, 0.012, 0.002]):
        clock.observe(100.0 + k * 0.1 + late, k * 100)
    assert clock.time_of(0) == pytest.approx(100.0)
    assert clock.time_of(250) == pytest.approx(100.25)
    assert clock.position_at(100.5) == pytest.approx(500)


def test_voice_round_trip_finds_the_delay_between_two_streams():
    """A 48 kHz source and what a speaker played 0.437 s later (each with its own clock): the delay is found."""
    rng = np.random.default_rng(0)
    seconds, delay = 8.0, 0.437
    sent = rng.standard_normal(int(seconds * RATE)).astype(np.float32) * 0.3
    src_clock, out_clock = SampleClock(RATE), SampleClock(RATE)
    src, out = StreamHistory(RATE), StreamHistory(RATE)
    src.write(0, sent)
    src_clock.observe(50.0, 0)
    # the output's sample 0 played 1000 samples (20.8 ms) after the source's was captured
    played = np.concatenate([np.zeros(int(delay * RATE) - 1000, np.float32), sent])[: len(sent)]
    out.write(0, played)
    out_clock.observe(50.0 + 1000 / RATE, 0)
    found = voice_round_trip(src_clock, src, out_clock, out, now=50.0 + 7.5)
    assert found is not None
    rt, corr = found
    assert rt == pytest.approx(delay, abs=1e-3) and corr > 0.9
    out.write(0, np.zeros(len(sent), np.float32))          # nothing played: nothing measured
    assert voice_round_trip(src_clock, src, out_clock, out, now=57.5) is None


def test_voice_round_trip_keeps_to_its_range_when_the_sound_repeats():
    """Bursts every 2 s, played 0.437 s later: 2.437 s matches as well; the range (from the server's delay on)
    picks the real one."""
    rng = np.random.default_rng(1)
    burst = np.concatenate([rng.standard_normal(RATE // 4), np.zeros(2 * RATE - RATE // 4)]).astype(np.float32)
    sent = np.tile(burst, 5)
    src_clock, out_clock = SampleClock(RATE), SampleClock(RATE)
    src, out = StreamHistory(RATE), StreamHistory(RATE)
    src.write(0, sent)
    out.write(0, np.concatenate([np.zeros(int(0.437 * RATE), np.float32), sent])[: len(sent)])
    src_clock.observe(10.0, 0)
    out_clock.observe(10.0, 0)
    found = voice_round_trip(src_clock, src, out_clock, out, now=19.5, shortest=0.3, longest=1.8)
    assert found is not None and found[0] == pytest.approx(0.437, abs=1e-3)


def test_options_are_checked():
    with pytest.raises(InputError, match="--jitter-ms"):
        DesktopOptions(jitter_ms=5)
    with pytest.raises(InputError, match="--voice-delay"):
        DesktopOptions(voice_delay_ms=5000)
    from edtalk_live.clients.desktop import _size

    assert _size("1280x720") == (1280, 720)
    with pytest.raises(InputError, match="WIDTHxHEIGHT"):
        _size("wide")


def test_missing_optional_packages_name_their_extra(monkeypatch):
    from edtalk_live.clients import sound, video_out

    monkeypatch.setitem(sys.modules, "sounddevice", None)
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)
    monkeypatch.setitem(sys.modules, "pygame", None)
    with pytest.raises(EDTalkError, match=r"edtalk-live\[desktop\]"):
        sound.sounddevice()
    with pytest.raises(EDTalkError, match=r"edtalk-live\[virtualcam\]"):
        video_out.pyvirtualcam()
    with pytest.raises(EDTalkError, match=r"edtalk-live\[desktop\]"):
        AvatarWindow()


def test_client_command_options():
    from edtalk_live.clients.cli import build_parser
    from edtalk_live.clients.desktop import options_from_args

    parse = build_parser().parse_args
    o = options_from_args(parse(["client", "--mic", "--speaker", "pulse", "--virtual-camera", "--voice-delay", "-40",
                                 "--probe", "--camera-size", "640x360"]))
    assert o.audio is None and o.play and o.speaker == "pulse" and o.camera and o.camera_device is None
    assert o.voice_delay_ms == -40 and o.session == {"probe": True} and o.camera_size == (640, 360)
    o = options_from_args(parse(["client", "--mic", "--mic-device", "3", "--speaker", "none",
                                 "--virtual-camera", "/dev/video7"]))
    assert o.mic_device == 3 and not o.play and o.camera_device == "/dev/video7"
    o = options_from_args(parse(["client", "--audio", "x.wav", "--virtual-camera"]))
    assert o.audio == "x.wav" and not o.play
    with pytest.raises(SystemExit):
        parse(["client", "--mic", "--audio", "x.wav"])


def test_reports_read_as_one_line_each():
    from edtalk_live.clients.desktop import DesktopReport, Measurement

    m = Measurement(at_s=5.0, voice_round_trip_ms=412.0, video_latency_ms=380.0, av_offset_ms=8.0, exact=True,
                    fps=25.0, voice_buffer_ms=80.0, server={"delay_ms": 275.0, "latency_ms_p50": 190.0,
                                                            "av_offset_ms": 0.0})
    line = format_measurement(m)
    assert "voice round trip 412 ms" in line and "A/V offset +8 ms (probe)" in line and "\n" not in line
    text = format_summary(DesktopReport(session="abcdef0123", measurements=[m], final=m))
    assert "median 412 ms" in text and "server: delay 275 ms" in text


# ------------------------------------------------------------------------------------------ window, camera


def test_fit_scales_and_centres():
    image = np.full((64, 64, 3), 200, np.uint8)
    out = fit(image, 128, 72)
    assert out.shape == (72, 128, 3)
    assert out[:, :28].max() == 0 and out[:, 100:].max() == 0 and out[:, 28:100].min() == 200


def test_window_shows_each_frame_when_due(monkeypatch):
    pytest.importorskip("pygame")
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    shown: list[tuple[int, float]] = []
    closed = threading.Event()
    window = AvatarWindow(on_shown=lambda item, t: shown.append((item.index, t - item.due)), on_close=closed.set)
    thread = threading.Thread(target=window.run)
    thread.start()
    t0 = time.monotonic() + 0.1
    for i in range(10):
        image = np.full((64, 64, 3), i * 20, np.uint8)
        window.put(VideoItem(image, arrival=t0 + i * 0.04, due=t0 + i * 0.04 + 0.05, index=i))
    time.sleep(0.8)
    window.stop()
    thread.join(5)
    assert closed.is_set() and not thread.is_alive()
    assert [i for i, _ in shown] == list(range(10))
    assert all(-0.001 <= late < 0.03 for _, late in shown), shown


class _FakeCamera:
    """A pyvirtualcam backend that keeps what it is sent, and when."""

    sent: list[tuple[float, np.ndarray]] = []
    opened: list[dict] = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self._device = device or "fake-camera-0"
        _FakeCamera.opened.append({"width": width, "height": height, "fps": fps, "device": device})

    def send(self, frame):
        _FakeCamera.sent.append((time.monotonic(), frame.copy()))

    def close(self):
        pass

    def device(self):
        return self._device

    def native_fourcc(self):
        return None


@pytest.fixture
def fake_camera():
    pyvirtualcam = pytest.importorskip("pyvirtualcam")
    _FakeCamera.sent, _FakeCamera.opened = [], []
    pyvirtualcam.register_backend("edtalk-test", _FakeCamera)
    yield _FakeCamera
    pyvirtualcam.camera.BACKENDS.pop("edtalk-test", None)


def test_a_missing_virtual_camera_says_what_the_os_needs():
    pytest.importorskip("pyvirtualcam")
    from edtalk_live.clients.video_out import VirtualCamera

    with pytest.raises(EDTalkError, match="cannot open the virtual camera '/dev/no-such-camera'.*v4l2loopback.*OBS"):
        VirtualCamera(64, 64, device="/dev/no-such-camera")


@pytest.mark.slow
def test_virtual_camera_shows_the_avatar_at_25_fps(tmp_path, edtalk_weights, face_image, speech, fake_camera):
    """A 3 s file sent as the microphone: the camera gets 25 fps (+-1) from the start, black until the avatar
    comes, then frames that change while the speech plays."""
    seconds = 3.0
    wav = write_wav(tmp_path / "speech.wav", speech[: int(seconds * 16000)], 16000)
    options = DesktopOptions(audio=wav, play=False, camera=True, camera_backend="edtalk-test",
                             camera_size=(96, 64), report_every=1.0)

    async def main():
        async with Running(edtalk_weights, face_image) as srv:
            return await DesktopClient(dataclasses.replace(options, server=srv.url)).run()

    report = asyncio.run(main())
    assert fake_camera.opened == [{"width": 96, "height": 64, "fps": 25, "device": None}]
    times = np.array([t for t, _ in fake_camera.sent])
    frames = [f.reshape(64, 96, 3) for _, f in fake_camera.sent]
    span = times[-1] - times[0]
    fps = (len(times) - 1) / span
    print(f"virtual camera: {len(times)} frames in {span:.2f} s: {fps:.2f} fps; intervals ms p5/p50/p95 "
          f"{np.percentile(np.diff(times) * 1000, [5, 50, 95]).round(1).tolist()}; received {report.frames}")
    assert abs(fps - 25) <= 1, fps
    assert report.camera_device == "fake-camera-0" and abs(report.camera_fps - 25) <= 1
    assert frames[0].max() == 0, "the camera starts black"
    avatar = [f for f in frames if f.max() > 0]
    assert len(avatar) >= seconds * 25 * 0.8, len(avatar)
    assert avatar[0][:, :16].max() == 0 and avatar[0][:, 80:].max() == 0, "not letterboxed into 96x64"
    # the mouth moves with the speech: while it plays the frames stray from the rest pose that the silence after
    # it (the file's tail) settles on
    rest = avatar[-1].astype(np.float32)
    away = np.array([np.abs(f.astype(np.float32) - rest).mean() for f in avatar])
    speaking, silent = away[: int(seconds * 25 * 0.6)].mean(), away[-10:].mean()
    print(f"mean distance from the rest pose: {speaking:.2f} while speaking, {silent:.2f} in the silence after")
    assert speaking > 0.5 and silent < 0.3 * speaking, (speaking, silent)
    assert report.final is not None and report.final.fps is not None


# ------------------------------------------------------------------------------------------ PulseAudio, end to end


def _parse_ms(pattern: str, text: str) -> float | None:
    """The first number ``pattern`` captures in ``text`` (None: no match)."""
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


class _Recorder:
    """``parec`` of one PulseAudio source, 16 kHz mono, read on a thread; the time of each sample is estimated from
    when the reads return (the earliest read is on time, as :class:`SampleClock` does)."""

    def __init__(self, source: str, env: dict[str, str]):
        self.proc = subprocess.Popen(["parec", "-d", source, "--rate=16000", "--channels=1", "--format=s16le",
                                      "--latency-msec=20", "--raw"], stdout=subprocess.PIPE, env=env)
        self.chunks: list[bytes] = []
        self.base = float("inf")
        self.n = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            data = self.proc.stdout.read1(640)
            if not data:
                return
            now = time.monotonic()
            self.chunks.append(data)
            self.n += len(data) // 2
            self.base = min(self.base, now - self.n / 16000)

    def stop(self) -> np.ndarray:
        self.proc.terminate()
        self.proc.wait(10)
        self.thread.join(5)
        return np.frombuffer(b"".join(self.chunks), "<i2").astype(np.float32) / 32768


def _onsets(x: np.ndarray, rate: int = 16000) -> list[int]:
    """Where each tone burst starts: the envelope (5 ms RMS) first rises past 30 % of its peak, at least 1 s apart."""
    win = rate // 200
    env = np.sqrt(np.convolve(x.astype(np.float64) ** 2, np.ones(win) / win, mode="same"))
    if env.max() < 0.02:
        return []
    above = env > 0.3 * env.max()
    starts: list[int] = []
    for i in np.flatnonzero(above[1:] & ~above[:-1]) + 1:
        if not starts or i - starts[-1] >= rate:
            starts.append(int(i))
    return starts


@pytest.fixture
def pulse(tmp_path):
    """A user-mode PulseAudio daemon with the null sinks ``mic`` and ``speaker``; yields the environment that
    reaches it."""
    missing = [tool for tool in ("pulseaudio", "pacat", "parec", "pactl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: apt-get install pulseaudio pulseaudio-utils)")
    try:
        import sounddevice  # noqa: F401
    except ImportError:
        pytest.skip("sounddevice not installed (the [desktop] extra)")
    except OSError as e:
        pytest.skip(f"no PortAudio library (Debian: apt-get install libportaudio2): {e}")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    socket_path = run / "pulse" / "native"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run), "HOME": str(tmp_path), "PULSE_RUNTIME_PATH": str(run / "pulse"),
           "PULSE_SERVER": f"unix:{socket_path}"}
    log = (tmp_path / "pulseaudio.log").open("w")
    daemon = subprocess.Popen(["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "-n", "--log-target=stderr",
                               "--load=module-native-protocol-unix", "--load=module-null-sink sink_name=mic",
                               "--load=module-null-sink sink_name=speaker"], stdout=log, stderr=log, env=env)
    try:
        for _ in range(100):
            if subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0:
                break
            if daemon.poll() is not None:
                pytest.skip(f"pulseaudio did not start: {(tmp_path / 'pulseaudio.log').read_text()[-500:]}")
            time.sleep(0.1)
        else:
            pytest.skip("pulseaudio did not answer within 10 s")
        yield env
    finally:
        daemon.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(10)
        if daemon.poll() is None:
            daemon.kill()
        log.close()


def test_list_devices_shows_the_pulse_device(pulse):
    done = subprocess.run([sys.executable, "-m", "edtalk_live.clients.cli", "client", "--list-devices"], env=pulse,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pulse" in done.stdout, done.stdout


@pytest.mark.slow
def test_a_tone_at_the_microphone_comes_back_at_the_speaker(tmp_path, pulse, edtalk_weights, face_image):
    """Tone bursts played into the ``mic`` null sink (the client's microphone) come out of the ``speaker`` sink,
    later by the server's delay plus transport and the client's buffers; the client's own round-trip report
    agrees with what the sinks' monitors show."""
    port = free_port()
    server_log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "edtalk_live.clients.cli", "serve", "--weights",
                               str(edtalk_weights), "--avatar", str(face_image), "--no-align", "--backend", "torch",
                               "--workers", "1", "--port", str(port), "--offer-rate", "0"],
                              stdout=server_log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    # the null sinks render in chunks as large as their slowest reader allows (up to 2 s): the recorders read
    # their monitors at 20 ms, as a sound card would run them
    recorders = {name: _Recorder(f"{name}.monitor", pulse) for name in ("mic", "speaker")}
    client = None
    try:
        for _ in range(600):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        client = subprocess.Popen([sys.executable, "-m", "edtalk_live.clients.cli", "client", "--server", url,
                                   "--mic", "--mic-device", "pulse", "--speaker", "pulse", "--duration", "13",
                                   "--report-every", "3", "--probe"],
                                  env={**pulse, "PULSE_SOURCE": "mic.monitor", "PULSE_SINK": "speaker"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(300):               # until the session is up
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as r:
                if b'"sessions": 1' in r.read():
                    break
            assert client.poll() is None, client.communicate()
            time.sleep(0.1)
        time.sleep(1.0)
        # four bursts of a 1 kHz tone (0.3 s, 5 ms fades), 2 s apart
        t = np.arange(int(0.3 * 16000)) / 16000
        burst = 0.5 * np.sin(2 * np.pi * 1000 * t) * np.clip(np.minimum(t, t[-1] - t) / 0.005, 0, 1)
        period = np.concatenate([np.zeros(int(0.5 * 16000)), burst, np.zeros(int(1.2 * 16000))])
        signal = (np.tile(period, 4) * 32767).astype("<i2").tobytes()
        player = subprocess.Popen(["pacat", "--playback", "-d", "mic", "--rate=16000", "--channels=1",
                                   "--format=s16le", "--latency-msec=20", "--raw"], stdin=subprocess.PIPE, env=pulse)
        player.communicate(signal, timeout=30)
        out, err = client.communicate(timeout=60)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        recorded = {name: (rec.stop(), rec.base) for name, rec in recorders.items()}
        server.terminate()
        server.wait(15)
        server_log.close()
    assert client.returncode == 0, err[-3000:]
    (mic, mic_t0), (spk, spk_t0) = recorded["mic"], recorded["speaker"]
    sent, came = _onsets(mic), _onsets(spk)
    delays = []
    for i in sent:
        t_in = mic_t0 + i / 16000
        after = [spk_t0 + j / 16000 - t_in for j in came if 0 < spk_t0 + j / 16000 - t_in < 1.5]
        if after:
            delays.append(after[0] * 1000)
    server_delays = [float(d) for d in re.findall(r"server: delay (\d+) ms", out)]   # it adapts to the renderer
    client_rt = _parse_ms(r"voice round trip \(microphone -> speaker\): median (\d+) ms", out)
    av = _parse_ms(r"A/V offset: median ([+-]?\d+) ms", out)
    print(out)
    print(f"tone delays microphone -> speaker (sinks' monitors): {[round(d) for d in delays]} ms; "
          f"the client's own: {client_rt} ms; the server's delay {server_delays} ms; A/V offset {av} ms (probe)")
    assert len(sent) == 4 and len(delays) >= 3, (sent, came, delays)
    median = float(np.median(delays))
    assert server_delays and min(server_delays) <= median <= max(server_delays) + 700, (median, server_delays)
    assert client_rt is not None and abs(median - client_rt) <= 60, (median, client_rt)
    assert av is not None and abs(av) <= 60, av
