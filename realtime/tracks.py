"""The WebRTC sink: the avatar video at 25 fps and the delayed voice, as the session's pacer hands them over.

The tracks are thin (STYLE: "thin media tracks"): ``recv()`` takes the chunk the pacer
(:mod:`edtalk_live.realtime.pacer`) handed over at its due time, stamps it and returns it.
Generation and pacing happen elsewhere.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from edtalk_live.edtalk.timing import FPS
from edtalk_live.realtime.pacer import AUDIO_PTIME, AUDIO_RATE, AUDIO_SAMPLES, TICKS_PER_FRAME, VIDEO_TIME_BASE
from edtalk_live.realtime.sinks import DropOldest, MediaChunk, Sink, split_voice

logger = logging.getLogger(__name__)


class WebRTCSink(Sink):
    """A WebRTC peer as an output sink: its video and voice tracks (add both to the peer connection) send the
    chunks the session's pacer hands over, as they come.

    The pacer hands chunk ``i`` over at frame ``i``'s due time: the video track returns frame ``i`` with pts
    ``i * 3600`` (90 kHz) at once; the voice track returns the chunk's 40 ms of voice as two 20 ms frames (as Opus
    sends them), the second 20 ms after the first, pts in samples. aiortc's sender encodes in the codec threads
    after ``recv()`` returns: a sender that falls behind finds its queue full and the oldest chunk dropped
    (video: more than :attr:`VIDEO_QUEUE` frames behind; voice: more than :attr:`VOICE_QUEUE`, 400 ms, so a
    short stall of the loop sends the voice late rather than losing it), so its lag stays bounded.

    ``on_av_offset(ms)``: for each video frame sent, how much later than its voice it left, relative to their
    media times (0 when in sync).
    """

    kind = "webrtc"
    VIDEO_QUEUE = 2
    VOICE_QUEUE = 10

    def __init__(self, name: str | None = None, on_count: Callable[[str, str, int], None] | None = None,
                 on_av_offset: Callable[[float], None] | None = None, time_fn: Callable[[], float] | None = None):
        super().__init__(name, on_count)
        self._time = time_fn or asyncio.get_running_loop().time
        self.video_queue = DropOldest(self.VIDEO_QUEUE, on_drop=lambda: self.counters.add("drops"))
        self.voice_queue = DropOldest(self.VOICE_QUEUE)
        self.video = SinkVideoTrack(self)
        self.voice = SinkVoiceTrack(self)
        self._on_av_offset = on_av_offset
        self._voice_offset: float | None = None     # (time sent - media time) of the last voice frame

    def put(self, chunk: MediaChunk) -> None:
        self.video_queue.put(chunk)
        self.voice_queue.put(chunk)

    def queued(self) -> int:
        return max(len(self.video_queue), len(self.voice_queue))

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.video_queue.close()
        self.voice_queue.close()
        for track in (self.video, self.voice):
            track.stop()

    def _video_sent(self, index: int) -> None:
        self.counters.add("frames")
        if self._voice_offset is not None and self._on_av_offset is not None:
            self._on_av_offset(((self._time() - index / FPS) - self._voice_offset) * 1000)

    def _voice_sent(self, sample: int) -> None:
        self._voice_offset = self._time() - sample / AUDIO_RATE


class SinkVideoTrack(MediaStreamTrack):
    """The video track of a :class:`WebRTCSink`: each chunk's image, as it comes. ``recv()`` never raises but
    at the end (an image that fails to convert sends the last good one again)."""

    kind = "video"

    def __init__(self, sink: WebRTCSink):
        super().__init__()
        self._sink = sink
        self._last: av.VideoFrame | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        chunk = await self._sink.video_queue.get()
        if chunk is None or self.readyState != "live":
            raise MediaStreamError
        try:
            frame = av.VideoFrame.from_ndarray(chunk.image, format="rgb24")
            self._last = frame
        except Exception:  # noqa: BLE001 - never let recv() raise: it would end the track
            logger.exception("video frame %d failed; resending the last good frame", chunk.index)
            if self._last is None:
                raise MediaStreamError from None
            frame = self._last
        frame.pts = chunk.index * TICKS_PER_FRAME
        frame.time_base = VIDEO_TIME_BASE
        self._sink._video_sent(chunk.index)
        return frame


class SinkVoiceTrack(MediaStreamTrack):
    """The voice track of a :class:`WebRTCSink`: each chunk's 40 ms as two 20 ms frames, 16 kHz mono."""

    kind = "audio"

    def __init__(self, sink: WebRTCSink):
        super().__init__()
        self._sink = sink
        self._pending: tuple[np.ndarray, int, float] | None = None    # the second half: samples, first sample, due

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._pending is not None:
            samples, start, due = self._pending
            self._pending = None
            wait = due - self._sink._time()
            if wait > 0:
                await asyncio.sleep(wait)
        else:
            chunk = await self._sink.voice_queue.get()
            if chunk is None or self.readyState != "live":
                raise MediaStreamError
            first, second = split_voice(chunk, 2)
            samples, start = first, chunk.first_sample
            self._pending = (second, start + AUDIO_SAMPLES, chunk.due + AUDIO_PTIME)
        if self.readyState != "live":
            raise MediaStreamError
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1),
                                           format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._sink._voice_sent(start)
        return frame
