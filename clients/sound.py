"""Sound devices for the desktop client: the microphone as an aiortc track, the returned voice to a speaker.

Both sides use sounddevice (PortAudio), imported only here and only when used (:func:`sounddevice`: the
``[desktop]`` extra). Its callbacks run on PortAudio's audio thread and never wait on the event loop:

- :class:`MicrophoneTrack` copies each 20 ms block of the ``InputStream`` into a bounded drop-oldest queue
  (:class:`~edtalk_live.realtime.sinks.DropOldest`); ``recv()`` takes blocks from it on the loop, stamped
  with their position in the capture (a sample counter), so a block lost to an overrun is a gap the server
  fills with silence, not a shift of the voice.
- :class:`Speaker` plays the voice from a :class:`VoiceBuffer`, a small jitter buffer that places the
  received frames by their timestamps, starts playing once it holds its target (80 ms by default, plus any
  voice delay), plays silence on an underrun and skips ahead when it holds far more than its target.

Each stream keeps a :class:`SampleClock`, which maps its sample positions to ``time.monotonic()`` at the
converter (capture or playback), for the latency measurements of :mod:`edtalk_live.clients.desktop`.

PulseAudio and PipeWire (Linux): PortAudio reaches them through ALSA's ``pulse`` device; the PulseAudio
source and sink it uses are chosen with the ``PULSE_SOURCE`` and ``PULSE_SINK`` environment variables.
"""

from __future__ import annotations

import collections
import fractions
import logging
import threading
import time
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.realtime.audio_in import SampleRing
from edtalk_live.realtime.sinks import DropOldest

logger = logging.getLogger(__name__)

#: the rate of both streams: Opus's own, so aiortc neither resamples what is sent nor what comes back
RATE = 48_000
#: samples of one microphone block (20 ms, one Opus packet)
BLOCK = RATE // 50
#: microphone blocks the queue to aiortc holds before it drops the oldest (0.5 s)
MIC_QUEUE = 25
#: seconds of audio each stream keeps for the measurements
HISTORY_S = 12.0


def sounddevice():
    """The ``sounddevice`` module, or a clear error: not installed (the ``[desktop]`` extra), or no PortAudio."""
    try:
        import sounddevice as sd
    except ImportError:
        raise EDTalkError("the desktop client needs sounddevice: pip install 'edtalk-live[desktop]'") from None
    except OSError as e:       # sounddevice raises OSError when it cannot load the PortAudio library
        raise EDTalkError(f"sounddevice cannot load the PortAudio library ({e}): install it (Debian/Ubuntu: "
                          "apt-get install libportaudio2; Fedora: dnf install portaudio; macOS: brew install "
                          "portaudio)") from None
    return sd


def list_devices() -> str:
    """sounddevice's table of the audio devices (``>``: default input, ``<``: default output)."""
    sd = sounddevice()
    return f"{sd.query_devices()}\n(host APIs: {', '.join(api['name'] for api in sd.query_hostapis())})"


def device_arg(text: str | None) -> int | str | None:
    """A ``--mic-device``/``--speaker`` value as sounddevice takes it: an index, or (part of) a device name."""
    if text is None or text == "" or text == "default":
        return None
    return int(text) if text.isdigit() else text


def _check_device(sd, device: int | str | None, kind: str) -> None:
    """Raise an :class:`InputError` naming ``device`` when sounddevice has no such ``kind`` (input/output) device."""
    try:
        sd.query_devices(device, kind)
    except (ValueError, sd.PortAudioError) as e:
        what = "microphone" if kind == "input" else "speaker"
        raise InputError(f"no {what} device {device!r}: {e} (see `edtalk-live client --list-devices`)") from None


def _extra_settings(sd, device: int | str | None, kind: str):
    """Host-API settings for ``device``: WASAPI (Windows) opens a device only at its own rate unless asked to
    convert (``auto_convert``); the others need none."""
    try:
        api = sd.query_hostapis(sd.query_devices(device, kind)["hostapi"])["name"]
        return sd.WasapiSettings(auto_convert=True) if "WASAPI" in api else None
    except Exception:  # noqa: BLE001 - an older sounddevice, or no such device: open it as it is
        return None


class SampleClock:
    """When a sound stream's samples reach (or left) the converter, on ``time.monotonic()``.

    Each callback says where the stream is: ``observe(now, position)`` with ``position`` the sample at the
    converter at ``now``. Callbacks come late, never early, so the clock's base is the
    smallest ``now - position / rate`` seen in the last ``window`` seconds. The window is short: a stream's
    start can run its callbacks in a burst (a device buffer filling, larger than the latency PortAudio
    reports), which would otherwise hold the base too early for as long; it also follows a converter whose
    clock drifts from the system's.
    """

    def __init__(self, rate: int, window: float = 2.0):
        self.rate = rate
        self.window = window
        self._mins: collections.deque[tuple[float, float]] = collections.deque()   # (second, smallest base)
        self._lock = threading.Lock()

    def observe(self, now: float, position: float) -> None:
        base = now - position / self.rate
        second = float(int(now))
        with self._lock:
            if self._mins and self._mins[-1][0] == second:
                if base < self._mins[-1][1]:
                    self._mins[-1] = (second, base)
            else:
                self._mins.append((second, base))
            while self._mins and self._mins[0][0] < second - self.window:
                self._mins.popleft()

    @property
    def base(self) -> float | None:
        """``time.monotonic()`` of sample 0 (None before the first callback)."""
        with self._lock:
            return min(b for _, b in self._mins) if self._mins else None

    def time_of(self, position: float) -> float | None:
        base = self.base
        return None if base is None else base + position / self.rate

    def position_at(self, t: float) -> float | None:
        base = self.base
        return None if base is None else (t - base) * self.rate


class StreamHistory:
    """The last :data:`HISTORY_S` seconds of a stream, by absolute sample position (thread-safe)."""

    def __init__(self, rate: int = RATE):
        self.rate = rate
        self._ring = SampleRing(int(HISTORY_S * rate))
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        return self._ring.end

    def write(self, pos: int, samples: np.ndarray) -> None:
        with self._lock:
            self._ring.write(pos, samples)

    def read(self, pos: int, n: int) -> np.ndarray:
        with self._lock:
            return self._ring.read(pos, n)


class MicrophoneTrack(MediaStreamTrack):
    """The microphone as an aiortc audio track: 20 ms frames, 48 kHz mono s16, pts from the capture's sample counter.

    The ``InputStream`` opens (and a bad device fails, naming it) when the track is made; capture starts with
    :meth:`start`. ``recv()`` starts from the newest block the first time, so a session begins at the live
    edge; :attr:`first_sent` is the capture position of the first sample sent. :attr:`clock` and
    :attr:`history` keep when each sample was captured and the last seconds of it (float, for the
    measurements); :attr:`overruns` counts blocks dropped because the loop did not take them in time.
    """

    kind = "audio"
    rate = RATE

    def __init__(self, device: int | str | None = None, latency: str | float = "low"):
        super().__init__()
        sd = sounddevice()
        _check_device(sd, device, "input")
        self.clock = SampleClock(RATE)
        self.history = StreamHistory(RATE)
        self.queue = DropOldest(MIC_QUEUE, on_drop=self._dropped)
        self.overruns = 0
        self.status_flags = 0           # PortAudio's input overflows
        self.first_sent: int | None = None
        self._position = 0
        self._time_base = fractions.Fraction(1, RATE)
        try:
            self.stream = sd.InputStream(device=device, samplerate=RATE, channels=1, dtype="int16",
                                         blocksize=BLOCK, latency=latency, callback=self._callback,
                                         extra_settings=_extra_settings(sd, device, "input"))
        except sd.PortAudioError as e:
            raise InputError(f"cannot open the microphone {device if device is not None else '(default)'}: "
                             f"{e}") from None
        self.device_name = sd.query_devices(self.stream.device, "input")["name"]

    @property
    def latency(self) -> float:
        """PortAudio's input latency, seconds."""
        return float(self.stream.latency)

    def start(self) -> None:
        if not self.stream.active:
            self.stream.start()

    def _dropped(self) -> None:
        self.overruns += 1

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio's audio thread: copy the block out and queue it; never waits."""
        now = time.monotonic()
        if status:
            self.status_flags += 1
        pos = self._position
        self._position += frames
        # the earliest callbacks come as a block completes, its last sample just captured (subtracting PortAudio's
        # input latency, which is its buffer's size, counted 40 ms too many with ALSA's pulse device)
        self.clock.observe(now, self._position)
        pcm = indata[:, 0].copy()
        self.history.write(pos, pcm.astype(np.float32) / 32768.0)
        self.queue.put((pos, pcm))

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.first_sent is None:                 # start at the live edge: drop what queued before the call
            while len(self.queue) > 1:
                self.queue.get_nowait()
        item = await self.queue.get()
        if item is None or self.readyState != "live":
            raise MediaStreamError
        pos, pcm = item
        if self.first_sent is None:
            self.first_sent = pos
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = pos
        frame.time_base = self._time_base
        return frame

    def stop(self) -> None:
        super().stop()
        self.queue.close()
        try:
            self.stream.stop()
            self.stream.close()
        except Exception:  # noqa: BLE001 - a device gone away must not keep the client from ending
            logger.debug("closing the microphone failed", exc_info=True)


class VoiceBuffer:
    """The returned voice between the network and the speaker: a small jitter buffer, placed by timestamps.

    :meth:`write` (the event loop) places each frame at its timestamp (a gap left by a lost packet is silence);
    :meth:`read` (the audio thread) plays from a cursor. Playing starts once the buffer holds ``target``
    samples past the cursor; when it holds less than a block, what it holds is played and then silence (an
    underrun, counted), and playing waits until it holds ``target`` again, from where it stopped (nothing is
    lost); when it holds more than ``target + slack`` it skips ahead to ``target`` (counted in :attr:`skipped`
    samples). ``target`` is the jitter allowance plus the settable voice delay. Thread-safe.
    """

    def __init__(self, target: int, slack: int | None = None, rate: int = RATE):
        self.rate = rate
        self.target = max(0, int(target))
        self.slack = int(slack) if slack is not None else max(rate * 60 // 1000, self.target // 2)
        self._ring = SampleRing(self.target + self.slack + 2 * rate)
        self._lock = threading.Lock()
        self._origin: int | None = None         # timestamp (in samples) placed at position 0
        self.cursor = 0                         # next position to play
        self.waiting = True                     # filling up to the target (at the start, after an underrun)
        self.underruns = 0
        self.skipped = 0
        self.played = 0                         # voice samples played (not counting silence)
        self.resyncs = 0

    @property
    def level(self) -> int:
        """Samples held past the cursor."""
        with self._lock:
            return max(self._ring.end - self.cursor, 0) if self._origin is not None else 0

    def write(self, timestamp: int, samples: np.ndarray) -> int:
        """Place ``samples`` (float, mono, at :attr:`rate`) at ``timestamp`` (in samples); returns their position.

        A timestamp more than a second behind the cursor (the sender restarted its clock) re-anchors the buffer
        on it."""
        with self._lock:
            if self._origin is None:
                self._origin = timestamp
            pos = timestamp - self._origin
            if pos < self.cursor - self.rate:
                self._origin = timestamp - self._ring.end
                pos = self._ring.end
                self.resyncs += 1
            self._ring.write(pos, samples)
            return pos

    def read(self, n: int) -> tuple[np.ndarray, int | None]:
        """The next ``n`` samples to play and the position of the first (None: silence while filling)."""
        with self._lock:
            held = self._ring.end - self.cursor
            if self.waiting:
                if self._origin is None or held < max(self.target, 1):
                    return np.zeros(n, np.float32), None
                self.waiting = False
            if held > self.target + self.slack:
                self.skipped += held - self.target
                self.cursor += held - self.target
                held = self.target
            out, at = self._ring.read(self.cursor, n), self.cursor
            if held < n:
                out[max(held, 0):] = 0.0
                self.underruns += 1
                self.waiting = True
                n = max(held, 0)
            self.cursor += n
            self.played += n
            return out, at


class Speaker:
    """Plays a :class:`VoiceBuffer` on an output device through a sounddevice ``OutputStream`` callback.

    :attr:`clock` says when each output sample reaches the DAC; :attr:`history` keeps what was played
    (silence included); :attr:`blocks` logs the last blocks that carried voice as ``(output position, voice
    position, samples)``, which :meth:`played_at` reads to say when a voice position played.
    """

    def __init__(self, buffer: VoiceBuffer, device: int | str | None = None, latency: str | float = 0.04):
        sd = sounddevice()
        _check_device(sd, device, "output")
        self.buffer = buffer
        self.clock = SampleClock(RATE)
        self.history = StreamHistory(RATE)
        self.blocks: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=400)
        self.status_flags = 0           # PortAudio's output underflows
        self._position = 0
        try:
            self.stream = sd.OutputStream(device=device, samplerate=RATE, channels=1, dtype="float32",
                                          latency=latency, callback=self._callback,
                                          extra_settings=_extra_settings(sd, device, "output"))
        except sd.PortAudioError as e:
            raise InputError(f"cannot open the speaker {device if device is not None else '(default)'}: "
                             f"{e}") from None
        self.device_name = sd.query_devices(self.stream.device, "output")["name"]

    @property
    def latency(self) -> float:
        """PortAudio's output latency, seconds."""
        return float(self.stream.latency)

    def start(self) -> None:
        if not self.stream.active:
            self.stream.start()

    def _callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio's audio thread: the next block from the buffer; never waits."""
        now = time.monotonic()
        if status:
            self.status_flags += 1
        samples, at = self.buffer.read(frames)
        outdata[:, 0] = samples
        pos = self._position
        self._position += frames
        self.clock.observe(now + self.latency, pos)          # this block's first sample reaches the DAC then
        self.history.write(pos, samples)
        if at is not None:
            self.blocks.append((pos, at, frames))

    def played_at(self, voice_pos: int) -> float | None:
        """When voice position ``voice_pos`` reached the DAC (None: not played, or too long ago)."""
        for out_pos, at, n in reversed(list(self.blocks)):      # a copy: the audio thread appends meanwhile
            if at <= voice_pos < at + n:
                return self.clock.time_of(out_pos + voice_pos - at)
            if at + n <= voice_pos:
                return None                 # newer than everything played
        return None

    def stop(self) -> None:
        try:
            self.stream.stop()
            self.stream.close()
        except Exception:  # noqa: BLE001 - a device gone away must not keep the client from ending
            logger.debug("closing the speaker failed", exc_info=True)


def frame_samples(frame: av.AudioFrame) -> np.ndarray:
    """A received audio frame as float32 mono ``[N]`` in [-1, 1] (channels averaged)."""
    x = frame.to_ndarray()
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    if frame.format.is_planar:
        return np.asarray(x, np.float32).mean(axis=0)
    return np.asarray(x, np.float32).reshape(frame.samples, -1).mean(axis=1)
