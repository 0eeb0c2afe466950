"""The avatar side of LiveKit Agents on the avatar engine: a ``VideoGenerator`` over an engine stream, and the
``AvatarRunner`` that publishes it.

LiveKit's avatar protocol: the agent streams its TTS audio to the avatar participant, one byte stream (topic
``lk.audio_stream``) per utterance (``DataStreamAudioOutput``); it cuts it short with the ``lk.clear_buffer`` RPC;
the avatar tells it what was heard with the ``lk.playback_started`` and ``lk.playback_finished`` RPCs (position:
seconds played, interrupted). On the avatar's side a ``DataStreamAudioReceiver`` reads the streams and an
``AvatarRunner`` feeds each audio frame to a ``VideoGenerator`` (``push_audio``, ``clear_buffer``) and publishes
what the generator yields (video frames, audio frames, an ``AudioSegmentEnd`` after an utterance) through an
``AVSynchronizer``.

:class:`EngineVideoGenerator` is that generator on an :class:`~edtalk_live.realtime.engine.AvatarStream`: the TTS
audio is pushed to the stream as it comes (downmixed to mono, at its own rate: the engine resamples), ``clear_buffer``
interrupts it (the mouth closes on the next frame), and the generator yields every frame the engine's pacer hands
over at 25 fps, each video frame (``RGB24``) followed by its own 40 ms of voice (16 kHz mono), idle motion and a
resting mouth between utterances, and an ``AudioSegmentEnd`` after the frame that ends an utterance.

Playback is reported by the engine, not by the runner. ``AvatarRunner`` counts the audio it forwarded since its
last report, which here includes the avatar's silent frames between utterances (they are published too: the
voice track is continuous), and it reports one end at most while the next utterance is already being read. So
:func:`start_avatar_runner` hands the runner the receiver behind :class:`EngineReportedReceiver`, which drops the
runner's own reports, and the generator reports each utterance from the engine's events instead:
``playback_started`` as its first frame is handed over, ``playback_finished`` after its last one, with the seconds
actually played and ``interrupted`` False, or at once when it is cleared, with the seconds played before the
interruption and ``interrupted`` True.

Latency: speech is heard ``stream.delay_s`` after it is pushed (the lip sync's look-ahead and the render budget,
about 0.2 s); the synchronizer adds at most one video frame of queue and the audio source at most 100 ms. A frame
the runner takes more than :data:`STALE_S` after its due time (the job's loop stalled, or the runner waited for a
first subscriber) is dropped rather than published late: the synchronizer paces what it gets at 25 fps, so a
backlog would otherwise stay as delay for the rest of the call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import (
    AudioReceiver,
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    VideoGenerator,
)

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from edtalk_live.realtime.engine import AvatarStream
from edtalk_live.realtime.sinks import MediaChunk
from edtalk_live.realtime.speech import PLAYBACK_FINISHED, PLAYBACK_STARTED

__all__ = ["AGENT_NAME", "CONTROL_RPC", "AvatarJob", "EngineReportedReceiver", "EngineVideoGenerator",
           "GeneratorStats", "STALE_S", "start_avatar_runner"]

logger = logging.getLogger(__name__)

#: the agent name the avatar worker registers with, and the agent side dispatches
AGENT_NAME = "edtalk-avatar"
#: the RPC method of the avatar participant that takes a control message (emotion, pose, ...) from its agent
CONTROL_RPC = "edtalk.control"

#: a frame handed to the runner this long after its due time is dropped, not published late (seconds)
STALE_S = 0.2
#: how long the generator waits for the engine's first frame (seconds)
FIRST_FRAME_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class AvatarJob:
    """What the agent side tells the avatar worker in the dispatch's metadata (JSON): the avatar participant's
    identity and name, the agent it speaks for (``lk.publish_on_behalf``), and the stream's options (as an
    offer's: ``avatar``, ``emotion``, ``intensity``, ``pose``, ...)."""

    avatar_identity: str = ""
    agent_identity: str = ""
    avatar_name: str = "avatar"
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"avatar_identity": self.avatar_identity, "agent_identity": self.agent_identity,
                           "avatar_name": self.avatar_name, "options": self.options})

    @classmethod
    def from_json(cls, text: str) -> AvatarJob:
        """The job of a dispatch's metadata (empty: every field's default); :class:`InputError` when it is not
        such a JSON object."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"the avatar dispatch metadata is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InputError("the avatar dispatch metadata must be a JSON object")
        names = {"avatar_identity", "agent_identity", "avatar_name"}
        for name in names:
            if not isinstance(data.get(name, ""), str):
                raise InputError(f"the avatar dispatch's {name} must be a string")
        options = data.get("options") or {}
        if not isinstance(options, dict):
            raise InputError("the avatar dispatch's options must be a JSON object")
        return cls(**{k: data[k] for k in names if data.get(k)}, options=options)


@dataclass
class GeneratorStats:
    frames: int = 0            # video frames yielded (each with its audio)
    stale: int = 0             # frames dropped: handed over more than STALE_S after their due time
    utterances: int = 0        # utterances that played to their end
    interrupted: int = 0       # utterances cut by clear_buffer
    pushed_s: float = 0.0      # seconds of audio pushed to the engine
    late_max_s: float = 0.0    # the latest a published frame was taken after its due time


class EngineVideoGenerator(VideoGenerator):
    """A LiveKit ``VideoGenerator`` on an avatar engine stream (see the module).

    ``reports``: where playback is reported (the ``AudioReceiver`` the audio comes from: its
    ``notify_playback_started`` / ``notify_playback_finished``), or None. ``audio_sample_rate``: the rate of the
    audio frames yielded (16 kHz, the engine's own, unless the runner publishes another).
    """

    def __init__(self, stream: AvatarStream, *, reports: AudioReceiver | None = None,
                 audio_sample_rate: int = SAMPLE_RATE):
        self.stream = stream
        self.stats = GeneratorStats()
        self._reports = reports
        self._rate = int(audio_sample_rate)
        self._resampler = (None if self._rate == SAMPLE_RATE else
                           rtc.AudioResampler(SAMPLE_RATE, self._rate, num_channels=1))
        self._chunks: AsyncIterator[MediaChunk] | None = None
        self._first: MediaChunk | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._push_failed = False

    # ------------------------------------------------------------ VideoGenerator: input
    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        """TTS audio (any rate, mono or interleaved channels, downmixed) to the engine; ``AudioSegmentEnd``: the
        utterance is complete. Never waits for the engine."""
        try:
            if isinstance(frame, AudioSegmentEnd):
                self.stream.end()
                return
            samples = np.frombuffer(frame.data, dtype=np.int16)
            if frame.num_channels > 1:
                samples = samples.reshape(-1, frame.num_channels).mean(axis=1).round().astype(np.int16)
            if samples.size:
                self.stream.push(samples, frame.sample_rate)
                self.stats.pushed_s += samples.size / frame.sample_rate
        except EDTalkError as exc:           # the stream has ended (the job is closing): say it once
            if not self._push_failed:
                logger.warning("avatar stream %s: audio dropped: %s", self.stream.id[:8], exc)
                self._push_failed = True

    def clear_buffer(self) -> None:
        """Interrupt: the engine drops the queued speech and closes the mouth; the utterance is reported
        ``interrupted`` with the seconds played."""
        try:
            self.stream.clear()
        except EDTalkError as exc:
            logger.warning("avatar stream %s: clear failed: %s", self.stream.id[:8], exc)

    # ------------------------------------------------------------ VideoGenerator: output
    async def frame_size(self) -> tuple[int, int]:
        """``(width, height)`` of the frames, from the engine's first one (kept and yielded first)."""
        if self._first is None:
            try:
                self._first = await asyncio.wait_for(anext(self._source()), FIRST_FRAME_TIMEOUT_S)
            except (TimeoutError, StopAsyncIteration):
                raise EDTalkError(f"the avatar engine gave no frame within {FIRST_FRAME_TIMEOUT_S:g} s") from None
        height, width = self._first.image.shape[:2]
        return width, height

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        while True:
            if self._first is not None:
                chunk, self._first = self._first, None
            else:
                try:
                    chunk = await anext(self._source())
                except StopAsyncIteration:
                    return
            # the events of this frame were queued before it (the pacer reports, then hands the frame over): a
            # reader behind by several frames may also see a later frame's, and reports them a little early
            events = self._drain_events()
            for event in events:
                if event["type"] == PLAYBACK_STARTED:
                    self._report_started()
            late = time.monotonic() - chunk.due
            if late > STALE_S:
                self.stats.stale += 1
            else:
                self.stats.frames += 1
                self.stats.late_max_s = max(self.stats.late_max_s, late)
                yield _video_frame(chunk.image)
                audio = self._audio_frame(chunk.voice)
                if audio is not None:
                    yield audio
            for event in events:
                if event["type"] != PLAYBACK_FINISHED:
                    continue
                if event["interrupted"]:
                    self.stats.interrupted += 1
                else:
                    self.stats.utterances += 1
                    yield AudioSegmentEnd()
                self._report_finished(float(event["position"]), bool(event["interrupted"]))

    def _source(self) -> AsyncIterator[MediaChunk]:
        if self._chunks is None:
            self._chunks = self.stream.chunks()
        return self._chunks

    def _drain_events(self) -> list[dict[str, Any]]:
        events = []
        while (event := self.stream.event_queue.get_nowait()) is not None:
            events.append(event)
        return events

    def _audio_frame(self, voice: np.ndarray) -> rtc.AudioFrame | None:
        frame = rtc.AudioFrame(np.ascontiguousarray(voice, np.int16).tobytes(), SAMPLE_RATE, 1, SAMPLES_PER_FRAME)
        if self._resampler is None:
            return frame
        out = self._resampler.push(frame)
        if not out:
            return None
        data = b"".join(bytes(f.data) for f in out)
        return rtc.AudioFrame(data, self._rate, 1, len(data) // 2)

    # ------------------------------------------------------------ playback reports
    def _report_started(self) -> None:
        if self._reports is not None:
            self._call(self._reports.notify_playback_started())

    def _report_finished(self, position: float, interrupted: bool) -> None:
        logger.debug("avatar stream %s: playback finished at %.3f s%s", self.stream.id[:8], position,
                     " (interrupted)" if interrupted else "")
        if self._reports is not None:
            self._call(self._reports.notify_playback_finished(playback_position=position, interrupted=interrupted))

    def _call(self, result: Any) -> None:
        if asyncio.iscoroutine(result):         # an async notifier: never hold the frames up for it
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _video_frame(image: np.ndarray) -> rtc.VideoFrame:
    """An ``RGB24`` video frame of a uint8 RGB image ``[H, W, 3]``."""
    height, width = image.shape[:2]
    return rtc.VideoFrame(width, height, rtc.VideoBufferType.RGB24, np.ascontiguousarray(image).tobytes())


class EngineReportedReceiver(AudioReceiver):
    """An ``AudioReceiver`` as the runner sees it: ``inner``'s audio and ``clear_buffer``, but the runner's own
    playback reports dropped, since the :class:`EngineVideoGenerator` sends the engine's to ``inner``."""

    def __init__(self, inner: AudioReceiver):
        super().__init__()
        self.inner = inner

    async def start(self) -> None:
        await self.inner.start()
        self.inner.on("clear_buffer", self._forward_clear)

    def _forward_clear(self, *_: Any) -> None:
        self.emit("clear_buffer")

    def notify_playback_started(self) -> None:
        return None

    def notify_playback_finished(self, playback_position: float, interrupted: bool) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[rtc.AudioFrame | AudioSegmentEnd]:
        return self.inner.__aiter__()

    async def aclose(self) -> None:
        self.inner.off("clear_buffer", self._forward_clear)
        await self.inner.aclose()


async def start_avatar_runner(room: rtc.Room, stream: AvatarStream, audio_recv: AudioReceiver,
                              **runner_options: Any) -> tuple[AvatarRunner, EngineVideoGenerator]:
    """Start an ``AvatarRunner`` that publishes ``stream`` in ``room`` as the avatar speaks what ``audio_recv``
    receives (a ``DataStreamAudioReceiver`` in an avatar worker, a ``QueueAudioOutput`` in one process). Waits for
    the engine's first frame (its size) and for the receiver to start (a ``DataStreamAudioReceiver`` waits for its
    sender). ``runner_options`` go to ``AvatarRunner``."""
    generator = EngineVideoGenerator(stream, reports=audio_recv)
    width, height = await generator.frame_size()
    options = AvatarOptions(video_width=width, video_height=height, video_fps=FPS,
                            audio_sample_rate=SAMPLE_RATE, audio_channels=1)
    runner = AvatarRunner(room, audio_recv=EngineReportedReceiver(audio_recv), video_gen=generator, options=options,
                          **runner_options)
    await runner.start()
    return runner, generator
