"""Incoming speech: resampled to 16 kHz mono and placed on the session clock by its timestamps.

aiortc's audio receiver can deliver fewer samples than were sent under packet loss, while the
RTP timestamps stay right (DESIGN.md). So samples are placed by timestamp, not appended: a gap
becomes silence and the lips stay on the voice. Storage is a bounded ring indexed by absolute
sample position; reads outside what was written return silence.
"""

from __future__ import annotations

import logging
from fractions import Fraction

import av
import numpy as np

from edtalk_live.edtalk.timing import SAMPLE_RATE

logger = logging.getLogger(__name__)

RATE = SAMPLE_RATE            # the session clock counts 16 kHz samples


#: new frames landing too late for this long (seconds of arrival time) re-anchor the clock on their timestamps
RESYNC_S = 0.2


class SampleRing:
    """The last ``capacity`` samples of an endless float32 stream, addressed by absolute position."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._buf = np.zeros(capacity, np.float32)
        self.end = 0          # one past the last written position
        self.start = 0        # first position still held (and not cleared)

    def write(self, pos: int, samples: np.ndarray) -> None:
        """Write ``samples`` at ``pos`` (``pos >= start``); positions between ``end`` and ``pos`` become silence."""
        samples = np.asarray(samples, np.float32).reshape(-1)
        if pos > self.end:
            self._fill(self.end, pos - self.end)
        if pos < self.start:                        # too old: what is still writable
            samples = samples[self.start - pos:]
            pos = self.start
        n = len(samples)
        if n == 0:
            return
        if n > self.capacity:
            samples, pos, n = samples[-self.capacity:], pos + n - self.capacity, self.capacity
        self._put(pos, samples)
        self.end = max(self.end, pos + n)
        self.start = max(self.start, self.end - self.capacity)

    def _spans(self, pos: int, n: int) -> tuple[tuple[int, int, int], ...]:
        """Where ``n`` (<= capacity) samples from ``pos`` lie in the buffer: (buffer start, buffer end, offset)."""
        a = pos % self.capacity
        first = min(n, self.capacity - a)
        return ((a, a + first, 0),) if first == n else ((a, self.capacity, 0), (0, n - first, first))

    def _put(self, pos: int, samples: np.ndarray) -> None:
        for lo, hi, off in self._spans(pos, len(samples)):
            self._buf[lo:hi] = samples[off: off + hi - lo]

    def _fill(self, pos: int, n: int) -> None:
        n = min(n, self.capacity)
        for lo, hi, _ in self._spans(max(pos, self.end - self.capacity), n):
            self._buf[lo:hi] = 0.0

    def read(self, pos: int, n: int) -> np.ndarray:
        """Samples ``[pos, pos+n)``; silence where nothing is held."""
        out = np.zeros(n, np.float32)
        lo, hi = max(pos, self.start), min(pos + n, self.end)
        if hi > lo:
            for blo, bhi, off in self._spans(lo, hi - lo):
                out[lo - pos + off: lo - pos + off + bhi - blo] = self._buf[blo:bhi]
        return out

    def clear_from(self, pos: int) -> None:
        """Forget everything from ``pos`` on (interrupt): later reads there give silence."""
        if pos < self.end:
            self._fill(max(pos, self.start), self.end - max(pos, self.start))
            self.end = max(pos, self.start)


class AudioInput:
    """Turns incoming ``av.AudioFrame``s of any rate/layout into 16 kHz mono samples on the session clock.

    The first frame is anchored at ``anchor_pos``: the session-time sample position of its arrival,
    rounded to the nearest multiple of ``grid`` not before what is already written (with ``grid`` =
    640, speech starts on a video frame, so frame ``i`` of the speech is a frame of the session and
    the session shows the frames ``render`` writes for it); every later frame lands at
    ``anchor + (pts - pts0) * 16000 * time_base``. A frame
    landing past the write cursor leaves a gap (lost packets) that reads as silence; one landing
    before it (duplicate or reordered) only writes its new part.

    A sender whose timestamps fall behind for good (it stopped sending for a while and went on with
    contiguous timestamps, as aiortc does after a pause: every later frame lands before the cursor, where
    the silence fill already is) is re-anchored: once new frames have landed too late for
    :data:`RESYNC_S` of arrival time, the next one is placed at the cursor and the clock follows the new
    timestamps from there (``resyncs`` counts it). A burst of late frames catching up (all arriving at
    once, the next on time again) is not a resync: those frames are dropped, their time being past.
    """

    def __init__(self, capacity_s: float = 30.0, tolerance: int = 160, grid: int = 1):
        self.ring = SampleRing(int(capacity_s * RATE))
        self.grid = grid
        self.tolerance = tolerance                 # jitter (samples) absorbed without inserting silence
        self._resampler: av.AudioResampler | None = None
        self._anchor: tuple[int, Fraction] | None = None   # (anchor sample position, pts0 in seconds)
        self.cursor = 0                            # where the next contiguous sample goes
        self.frames = 0
        self.gap_samples = 0
        self.resyncs = 0                           # times the clock re-anchored on a sender that fell behind
        self._newest: Fraction | None = None       # the newest timestamp seen (seconds)
        self._late_since: int | None = None        # arrival position of the first of a run of late new frames
        self.last_pts_seconds: float | None = None

    @property
    def anchored(self) -> bool:
        return self._anchor is not None

    @property
    def anchor_pos(self) -> int | None:
        """Session sample position of the first received sample (None before any audio)."""
        return None if self._anchor is None else self._anchor[0]

    def push(self, frame: av.AudioFrame, arrival_pos: int) -> None:
        """Add one received frame; ``arrival_pos`` is ``session.now() * 16000`` at its arrival."""
        if self._resampler is None:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        pts_s = None
        if frame.pts is not None and frame.time_base is not None:
            pts_s = Fraction(frame.pts) * frame.time_base
        if self._anchor is None:
            g = self.grid
            pos = max(round(arrival_pos / g) * g, -(-self.cursor // g) * g)
            self._anchor = (pos, pts_s if pts_s is not None else Fraction(0))
            self.cursor = pos
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)] or
                                 [np.zeros(0, np.float32)])
        self.frames += 1
        if pts_s is not None:
            self.last_pts_seconds = float(pts_s)
            anchor_pos, pts0 = self._anchor
            pos = anchor_pos + round((pts_s - pts0) * RATE)
            newer = self._newest is None or pts_s > self._newest
            self._newest = pts_s if newer else self._newest
            if pos > self.cursor + self.tolerance:            # lost packets: leave silence
                self.gap_samples += pos - self.cursor
                self.cursor = pos
                self._late_since = None
            elif pos < self.cursor - max(self.tolerance, len(samples)):   # a duplicate, or too late
                if not newer:
                    return
                if self._late_since is None:
                    self._late_since = arrival_pos
                if arrival_pos - self._late_since < RESYNC_S * RATE:
                    return
                self._anchor = (self.cursor, pts_s)           # the sender fell behind for good: follow it
                self.resyncs += 1
                self._late_since = None
            else:
                self._late_since = None
                if pos < self.cursor:
                    # partly behind the cursor (the silence fill ran ahead of late audio, or a duplicate): only
                    # the part past it is new, and it goes where its timestamp says, so the clock does not slip
                    samples = samples[self.cursor - pos:]
        self.ring.write(self.cursor, samples)
        self.cursor += len(samples)

    def release(self) -> None:
        """Free the resampler now: its FFmpeg filter graph holds native threads until it is freed, and the session
        owning this input may wait for the garbage collector (reference cycles through its peer connection)."""
        self._resampler = None

    def fill_silence_until(self, pos: int) -> None:
        """Advance the cursor to ``pos`` with silence (no audio arriving: the mouth must rest)."""
        if pos > self.cursor:
            self.ring.write(pos, np.zeros(0, np.float32))
            self.cursor = pos

    def read(self, pos: int, n: int) -> np.ndarray:
        return self.ring.read(pos, n)

    def read_int16(self, pos: int, n: int) -> np.ndarray:
        x = np.clip(self.ring.read(pos, n), -1.0, 1.0)
        return (x * 32767.0).astype(np.int16)

    def clear_from(self, pos: int) -> None:
        self.ring.clear_from(pos)


def shorten_audio_buffer(pc, track, prefetch: int) -> bool:
    """Give ``track``'s receiver on ``pc`` an audio jitter buffer that hands a frame over once ``prefetch`` more
    have arrived (aiortc: 4), and holds as few packets as that needs (aiortc: 16). Returns False, with a
    warning, when this aiortc has no such buffer to replace.

    aiortc's buffer stops at a lost packet until it is full, then hands over one frame per packet that
    arrives: after the first loss it stays full, 16 packets (300 ms) behind, for the rest of the call.
    Audio here is placed by its timestamps, so a lost or reordered packet only needs to become silence:
    with room for ``prefetch`` + 1 packets (a power of two) a loss costs one packet's wait. aiortc has no
    setting for it: the buffer is a private attribute of ``RTCRtpReceiver``, set before any packet arrives.
    """
    from aiortc.jitterbuffer import JitterBuffer

    capacity = 2
    while capacity < prefetch + 1:
        capacity *= 2
    return replace_jitter_buffer(pc, track, lambda: JitterBuffer(capacity=capacity, prefetch=prefetch),
                                 "its default (80 ms, 300 ms after a loss) stays")


def replace_jitter_buffer(pc, track, make, otherwise: str) -> bool:
    """Give ``track``'s receiver on ``pc`` the jitter buffer ``make()`` returns. aiortc has no setting for it: the
    buffer is a private attribute of ``RTCRtpReceiver``, set before any packet arrives. Returns False, with a
    warning ending in ``otherwise``, when this aiortc has none to replace (or ``track`` is not ``pc``'s)."""
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if receiver is not None and receiver.track is track:
            if not hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
                logger.warning("aiortc's %s jitter buffer not found: %s", track.kind, otherwise)
                return False
            receiver._RTCRtpReceiver__jitter_buffer = make()
            return True
    return False
