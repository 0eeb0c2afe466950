"""Outgoing media tracks: the avatar video at exactly 25 fps and the delayed voice, on one session clock.

Both tracks are thin (STYLE: "thin media tracks"): ``recv()`` waits for the frame's due time,
takes what the session has ready, stamps it and returns it. Generation happens elsewhere.

The clock: session time ``t`` runs from the session's start (``loop.time() - t0``). Incoming audio
sample ``n`` (16 kHz) is placed at session time ``n / 16000`` by its RTP timestamps (see
``realtime.session``). Video frame ``i`` shows the mouth of audio ``[640 i, 640 (i+1))`` and is
due at ``i * 40 ms + delay``; outgoing voice sample ``n`` is due at ``n / 16000 + delay``. With
one ``delay`` for both, lips and voice leave the server together and cannot drift apart, however
long the session: every timestamp derives from the audio sample clock, never from a frame count
that could slip. ``delay`` covers the mel look-ahead and smoothing (~170 ms) plus a render budget.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE

logger = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
TICKS_PER_FRAME = VIDEO_CLOCK // FPS          # 3600
AUDIO_RATE = SAMPLE_RATE
AUDIO_PTIME = 0.020                           # 20 ms audio frames, as Opus sends them
AUDIO_SAMPLES = int(AUDIO_RATE * AUDIO_PTIME)  # 320


@dataclass
class TrackStats:
    """Counters of one outgoing track (read by the session's stats and /metrics)."""

    sent: int = 0
    repeated: int = 0     # video: frame not ready at its due time, the last one was sent again
    skipped: int = 0      # video: frames jumped over because the track fell behind the clock
    late_ms: list[float] = field(default_factory=list)   # how late each recv() returned (bounded)

    def note_late(self, seconds: float) -> None:
        self.late_ms.append(seconds * 1000)
        if len(self.late_ms) > 512:
            del self.late_ms[:256]


class SessionClock:
    """Session time: ``now() = loop.time() - t0``; ``delay`` is the fixed output delay (seconds)."""

    def __init__(self, delay: float, time_fn: Callable[[], float] | None = None):
        self.delay = delay
        self._time = time_fn or asyncio.get_running_loop().time
        self.t0 = self._time()

    def now(self) -> float:
        return self._time() - self.t0

    def restart(self) -> None:
        """Start session time now (before any frame was sent: when the peer connects)."""
        self.t0 = self._time()

    def shift(self, seconds: float) -> None:
        """Move session time back by ``seconds`` (once, before the first speech: see ``Session.push_audio``).

        What is due later is sent later by as much: a one-time pause of both tracks.
        """
        self.t0 += seconds

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of session time (overridable for simulated clocks in tests)."""
        await asyncio.sleep(seconds)

    def video_due(self, index: int) -> float:
        """Session time at which video frame ``index`` is shown."""
        return index / FPS + self.delay

    def audio_due(self, sample: int) -> float:
        return sample / AUDIO_RATE + self.delay


class AvatarVideoTrack(MediaStreamTrack):
    """25 fps video: frame ``i`` at session time ``i/25 + delay`` with pts ``i * 3600`` (90 kHz).

    ``frame_source(i)`` returns the uint8 RGB frame ``[H,W,3]`` rendered for index ``i``, or
    ``None`` when it is not ready: the previous frame is then repeated (counted). When the track
    falls more than one frame behind the clock (a slow consumer), it skips ahead to the current
    frame instead of letting a backlog grow, so the lag stays bounded. Exceptions inside
    ``recv()`` would stop the track for good (aiortc): they are caught and the last good frame is
    sent.
    """

    kind = "video"

    def __init__(self, clock: SessionClock, frame_source: Callable[[int], np.ndarray | None],
                 idle_frame: np.ndarray, on_index: Callable[[int], None] | None = None):
        super().__init__()
        self.clock = clock
        self._source = frame_source
        self._last = idle_frame
        self._next = 0
        self._on_index = on_index
        self.stats = TrackStats()

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        index = self._next
        wait = self.clock.video_due(index) - self.clock.now()
        if wait > 0:
            await self.clock.sleep(wait)
        else:
            behind = math.floor(-wait * FPS)
            if behind >= 1:                                  # more than a frame late: jump to the present
                index += behind
                self.stats.skipped += behind
        self.stats.note_late(max(0.0, self.clock.now() - self.clock.video_due(index)))
        self._next = index + 1
        try:
            image = self._source(index)
            if image is None:
                self.stats.repeated += 1
                image = self._last
            else:
                self._last = image
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        except Exception:  # noqa: BLE001 - never let recv() raise: it would end the track
            logger.exception("video frame %d failed; resending the last good frame", index)
            frame = av.VideoFrame.from_ndarray(self._last, format="rgb24")
        if self._on_index is not None:
            self._on_index(index)
        frame.pts = index * TICKS_PER_FRAME
        frame.time_base = VIDEO_TIME_BASE
        self.stats.sent += 1
        return frame


class DelayedVoiceTrack(MediaStreamTrack):
    """The caller's own voice, 16 kHz mono, delayed by the session's ``delay`` to line up with the lips.

    ``sample_source(start, count)`` returns ``count`` int16 samples of the incoming audio from
    sample ``start`` (silence where nothing arrived). Frames of 20 ms, pts in samples.
    """

    kind = "audio"

    def __init__(self, clock: SessionClock, sample_source: Callable[[int, int], np.ndarray]):
        super().__init__()
        self.clock = clock
        self._source = sample_source
        self._next = 0
        self.stats = TrackStats()

    @property
    def next_sample(self) -> int:
        """First sample of the next frame ``recv()`` will return (unless it has to skip)."""
        return self._next

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        start = self._next
        wait = self.clock.audio_due(start) - self.clock.now()
        if wait > 0:
            await self.clock.sleep(wait)
        elif -wait > 0.2:                                    # far behind: realign, never queue up
            skip = int(-wait * AUDIO_RATE) // AUDIO_SAMPLES * AUDIO_SAMPLES
            start += skip
            self.stats.skipped += skip // AUDIO_SAMPLES
        self._next = start + AUDIO_SAMPLES
        try:
            samples = np.asarray(self._source(start, AUDIO_SAMPLES), dtype=np.int16).reshape(1, -1)
        except Exception:  # noqa: BLE001 - a failed read must not end the track
            logger.exception("voice samples at %d failed; sending silence", start)
            samples = np.zeros((1, AUDIO_SAMPLES), np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self.stats.sent += 1
        return frame
