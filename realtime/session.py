"""One avatar session: speech in, mouth coefficients in sliding windows, frames through the shared scheduler.

The session owns the per-peer state and two tasks (audio consumer, frame producer); media tracks
read from it. Nothing here knows about networks: the server wires a session to a peer connection.

Timeline (all on the session clock, 16 kHz samples): incoming audio is placed by timestamp
(:mod:`edtalk_live.realtime.audio_in`); the producer feeds it to :class:`edtalk_live.avatar.lipsync.StreamingLipSync`
every tick; when no audio arrives, silence is fed a little behind real time so the mouth rests;
every final mouth frame gets a head pose and an expression and is rendered by the scheduler with
a deadline at its due time; the pacer hands frame ``i`` and its 40 ms of voice to every output sink
(:mod:`edtalk_live.realtime.sinks`) at ``i/25 + delay``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import torch

from edtalk_live.avatar.lipsync import LipFrame, StreamingLipSync
from edtalk_live.avatar.motion import ExpressionState, PoseSource
from edtalk_live.avatar.prepare import PreparedAvatar
from edtalk_live.avatar.speech import SILENCE_DB, lipsync_config
from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.timing import FPS, SAMPLES_PER_FRAME
from edtalk_live.engines.base import Renderer
from edtalk_live.realtime.audio_in import RATE, AudioInput
from edtalk_live.realtime.lipbatch import LipBatcher
from edtalk_live.realtime.metrics import LATENCY_BUCKETS_S, SessionCounts, latency_bucket
from edtalk_live.realtime.pacer import Pacer, SessionClock, TrackStats
from edtalk_live.realtime.probe import paint_index
from edtalk_live.realtime.protocol import (
    Bye,
    Choices,
    ControlMessage,
    Emotion,
    Intensity,
    Interrupt,
    Pause,
    Pose,
    Resume,
    SessionOptions,
    Stats,
    render_failed_event,
)
from edtalk_live.realtime.scheduler import FrameDropped, FrameScheduler, RenderFailed, SchedulerClosed, failure_reason
from edtalk_live.realtime.sinks import Sink
from edtalk_live.realtime.speech import SPEECH_AHEAD_S, SpeechQueue

logger = logging.getLogger(__name__)

#: the longest a final frame waits before its mouth is computed: a session's producer wakes when audio
#: arrives (and at least this often, for the silence fill when none does), and the lip batcher holds a pop
#: at most this long for the other sessions' pops (one Audio2Lip call and one render batch for all of them)
PRODUCER_TICK_S = 0.02
#: a session judges its render budget over this many recent frames (4 s), and changes it at most this often
BUDGET_WINDOW_FRAMES = 100
#: more late frames than this in the window raise it (a frame or two late at a start or a hiccup do not)
BUDGET_LATE_FRAMES = 2
#: the most a session's render budget rises to
BUDGET_MAX_S = 1.0
#: audio is fed to the lip sync at most this far ahead of real time (pushed speech comes seconds early): its frames
#: are rendered at most this plus the render budget before they are due, so few wait, finished, in memory
FEED_AHEAD_S = 0.2




@dataclass
class SessionStats:
    frames_rendered: int = 0
    frames_dropped: int = 0      # not rendered in time, or rendered too late (the per-session stats reply)
    frames_late: int = 0         # rendered, but the video track had passed them: discarded
    audio_frames: int = 0
    latency_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=500))
    av_offset_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=500))
    #: latencies per :data:`~edtalk_live.realtime.metrics.LATENCY_BUCKETS_S` bucket (not cumulative), then +Inf
    latency_hist: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_ms: float = 0.0
    latency_count: int = 0
    budget_changes: int = 0      # the render budget (and the output delay) changed mid-session
    frames_failed: int = 0       # frames the renderer failed on (their slots show the last good frame)
    render_failures: int = 0     # streaks of failed frames (one error event each)
    first_audio_wall: float | None = None   # time.time() at which the first audio sample's slot on the clock came

    def note_latency(self, ms: float) -> None:
        self.latency_ms.append(ms)
        self.latency_sum_ms += ms
        self.latency_count += 1
        self.latency_hist[latency_bucket(ms / 1000)] += 1


def _percentile(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


class Session:
    """State and tasks of one connected peer.

    ``delay`` (seconds) is the fixed output delay of video and voice: the lip-sync look-ahead plus
    ``render_budget``. Call :meth:`start`, feed :meth:`consume` the peer's audio track (or call
    :meth:`push_audio` directly), send the output where it goes with :meth:`add_sink` (a
    :class:`~edtalk_live.realtime.tracks.WebRTCSink` for a peer), and :meth:`close` at the end.
    """

    def __init__(self, sid: str, renderer: Renderer, scheduler: FrameScheduler, assets: PreparedAvatar,
                 options: SessionOptions, presets: dict[str, torch.Tensor], render_budget: float = 0.1,
                 jitter_margin: float = 0.05, time_fn: Callable[[], float] | None = None,
                 silence_db: float | None = SILENCE_DB, paste: Callable[[np.ndarray], np.ndarray] | None = None,
                 lip_batcher: LipBatcher | None = None, clip_poses: torch.Tensor | None = None,
                 on_lag: Callable[[float], None] | None = None, budget_fn: Callable[[], float] | None = None):
        self.id = sid
        self.renderer = renderer
        self.scheduler = scheduler
        self.assets = assets
        self.options = options
        self.presets = presets
        self.created = time.time()
        lip_cfg = lipsync_config(low_latency=options.low_latency, silence_db=silence_db)   # as render's
        self.lip_batcher = lip_batcher     # shared by all sessions: one Audio2Lip call per tick for everyone
        self.lips = StreamingLipSync(renderer.audio_to_lip, lip_cfg, rest_lip=assets.rest_lip)
        self.render_budget = render_budget
        self.delay = self.lips.latency_s + render_budget
        self.on_lag = on_lag               # each rendered frame's lag (see realtime.budget), or None
        self.budget_fn = budget_fn         # the server's measured budget at the current load (None: fixed budget)
        self._late = collections.deque(maxlen=BUDGET_WINDOW_FRAMES)   # recent frames: True = not ready in time
        self._budget_changed = -math.inf   # session time of the last budget change
        self._last_voiced = -1             # index of the last voiced frame rendered
        self.jitter_margin = jitter_margin
        self.clock = SessionClock(self.delay, time_fn=time_fn)
        self.audio = AudioInput(grid=SAMPLES_PER_FRAME)   # speech starts on a frame boundary
        self.clip_poses = clip_poses       # [N,6] of the server's pose clip, if any
        self.pose = PoseSource(assets.rest_pose, clip_poses=clip_poses, mode=options.pose,
                               seed=int(sid[:8], 16) if sid[:8].isalnum() else 0)
        self.expression = (ExpressionState(assets.rest_exp, emotion=self._preset(options.emotion),
                                           intensity=options.intensity)
                           if assets.rest_exp is not None else None)
        self.frames: dict[int, np.ndarray] = {}
        self.stats = SessionStats()
        self.paused = False
        self.closed = False
        self.started = False
        self._fed = 0                      # samples pushed into the lip-sync so far
        self._filled_to = 0                # the silence fill (no audio arriving) reached this sample
        self._speech_started = False       # the lip-sync stream was restarted where the speech begins
        self._interrupt = False            # set by interrupt(), applied by the producer between pops
        self._avatar_key: bytes | None = None
        self._avatar = None
        self._generation = 0               # bumped by interrupt: renders started before are discarded
        self._arrivals: collections.deque[tuple[int, float]] = collections.deque(maxlen=400)
        self._audio_arrived = asyncio.Event()      # wakes the producer (with the lip batcher)
        self._tasks: set[asyncio.Task] = set()
        self._last_audio = self.clock.now()
        self._failing = False              # the renderer fails on this session's frames now (one event per streak)
        self._send_event: Callable[[dict[str, Any]], None] | None = None
        #: speech pushed by a bot instead of a microphone (:mod:`edtalk_live.realtime.speech`); its playback events
        #: go to the control channel and to each listener (a pushed-speech stream)
        self.speech = SpeechQueue(on_event=self._speech_event)
        self.speech_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.speech_sources = 0            # open pushed-speech streams: the session is in use while one is open
        self._unsent: collections.deque[dict[str, Any]] = collections.deque(maxlen=4)   # before the channel opened
        self.paste = paste                 # uint8 [B,S,S,3] -> uint8 [B,H,W,3] (paste-back), or None
        idle = assets.idle_frame if paste is None else paste(assets.idle_frame[None])[0]
        self.idle_frame = idle
        self._probe_last = idle            # the last rendered image (probe mode's stand-in for a late frame)
        # the output: every frame with its voice at its due time, to each sink (a WebRTC peer, WHEP viewers, RTMP)
        self.pacer = Pacer(self.clock, self._frame_for, self._voice_for, idle, on_sent=self._sent,
                           name=f"session {sid[:8]}")

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start session time and the frame producer (call when the peer connects)."""
        if self.started:
            return
        self.started = True
        self.clock.restart()
        self._last_audio = 0.0
        if self.lip_batcher is not None:
            self.lip_batcher.join(self.lips)
        self._spawn(self._produce(), "producer")
        self._spawn(self.pacer.run(), "pacer")

    def _spawn(self, coro, name: str) -> asyncio.Task | None:
        if self.closed:                    # never start work for a closed session
            coro.close()
            return None
        task = asyncio.create_task(coro, name=f"session-{self.id[:8]}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self.closed:
            logger.error("session %s: task %s failed", self.id, task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """Stop every task and track; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.lip_batcher is not None:
            self.lip_batcher.leave(self.lips)
        sinks, self.pacer.sinks = self.pacer.sinks, []
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *(self._stop_sink(s) for s in sinks), return_exceptions=True)
        self.frames.clear()
        self.scheduler.forget(self.id)
        self.audio.release()

    # ------------------------------------------------------------ output
    def add_sink(self, sink: Sink) -> None:
        """Send this session's output to ``sink`` too (from the next frame on); started here."""
        if self.closed:
            raise InputError("the session has ended")
        sink.start()
        self.sinks.append(sink)

    async def remove_sink(self, sink: Sink) -> None:
        """Stop sending to ``sink`` and stop it (the session goes on)."""
        if sink in self.sinks:
            self.sinks.remove(sink)
        await self._stop_sink(sink)

    async def _stop_sink(self, sink: Sink) -> None:
        try:
            await sink.stop()
        except Exception:  # noqa: BLE001 - one sink failing to stop must not keep the others
            logger.warning("session %s: sink %s/%s failed to stop", self.id[:8], sink.kind, sink.name, exc_info=True)

    @property
    def sinks(self) -> list[Sink]:
        return self.pacer.sinks

    @property
    def out(self) -> TrackStats:
        """The output's counts: frames handed to the sinks, repeated (not ready in time), skipped."""
        return self.pacer.stats

    @property
    def next_sample(self) -> int:
        """First voice sample of the next chunk the pacer hands over: what is before it has left."""
        return self.pacer.next_sample

    def note_av_offset(self, ms: float) -> None:
        """A WebRTC sink sent a video frame ``ms`` later than its voice, relative to their media times."""
        self.stats.av_offset_ms.append(ms)

    def consume(self, track) -> asyncio.Task | None:
        """Read the peer's audio track until it ends (frames placed by their timestamps)."""
        return self._spawn(self._consume(track), "audio-in")

    def drain(self, track) -> asyncio.Task | None:
        """Receive ``track`` and drop its frames (a track nobody reads grows aiortc's queue without bound)."""
        async def drain() -> None:
            from aiortc.mediastreams import MediaStreamError

            with contextlib.suppress(MediaStreamError):
                while not self.closed:
                    await track.recv()

        return self._spawn(drain(), "drain")

    async def _consume(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        while not self.closed:
            try:
                frame = await track.recv()
            except MediaStreamError:
                logger.info("session %s: audio track ended", self.id)
                return
            self.push_audio(frame)

    # ------------------------------------------------------------ audio in
    def push_audio(self, frame: av.AudioFrame) -> None:
        """One received audio frame (any rate and layout)."""
        if not self.started:               # media can flow before the "connected" event: time starts now
            self.start()
        if not self.audio.anchored:
            # the first speech starts a video frame: the session's frame grid is moved (once, by less than a
            # frame, while only silence is shown) to pass through its arrival, so its frames are render's
            phase = int(self.clock.now() * RATE) % SAMPLES_PER_FRAME
            if phase:
                self.clock.shift(phase / RATE)
        now = self.clock.now()
        self._last_audio = now
        self.stats.audio_frames += 1
        first = not self.audio.anchored
        self.audio.push(frame, arrival_pos=int(now * RATE))
        if first and self.audio.anchored:   # the wall-clock moment of the first sample's place on the clock
            self.stats.first_audio_wall = time.time() + self.audio.anchor_pos / RATE - now
        self._arrivals.append((self.audio.cursor, now))
        self._audio_arrived.set()

    def push_samples(self, samples: np.ndarray, pos: int | None = None) -> None:
        """16 kHz mono float samples at session sample ``pos`` (default: where the last audio ended)."""
        now = self.clock.now()
        self._last_audio = now
        start = self.audio.cursor if pos is None else pos
        self.audio.ring.write(start, samples)
        self.audio.cursor = max(self.audio.cursor, start + len(samples))
        self._arrivals.append((self.audio.cursor, now))
        self._audio_arrived.set()

    # ------------------------------------------------------------ pushed speech (bots: TTS instead of a microphone)
    def push_speech(self, samples: np.ndarray, rate: int = RATE) -> int:
        """Queue mono speech (float or int16) at ``rate`` Hz, as fast as it comes; returns its utterance's id. It
        plays from the earliest frame the lip sync has not consumed, at 25 fps, lips in sync
        (:mod:`edtalk_live.realtime.speech`)."""
        if not self.started:
            self.start()
        utt = self.speech.push(samples, rate)
        self._last_audio = self.clock.now()
        self._audio_arrived.set()
        return utt

    def end_speech(self) -> int | None:
        """The current pushed utterance is complete (``playback_finished`` follows once it has played)."""
        self._last_audio = self.clock.now()
        self._audio_arrived.set()
        return self.speech.end()

    def clear_speech(self) -> None:
        """Stop speaking now: queued speech and frames are dropped, the utterance ends ``interrupted``."""
        if self.speech.active:
            self.interrupt()

    def note_audio(self) -> None:
        """Count the session as in use from now (the inactivity timeout starts again)."""
        self._last_audio = self.clock.now()

    def _speech_event(self, event: dict[str, Any]) -> None:
        self.send_event(event)
        for listener in list(self.speech_listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a closed stream must not stop the playout
                logger.warning("session %s: a speech listener failed", self.id[:8], exc_info=True)

    @property
    def idle_seconds(self) -> float:
        """Session time since the last audio frame arrived (0 while a pushed-speech stream is open: a bot is
        silent while it listens)."""
        if self.speech_sources:
            return 0.0
        return self.clock.now() - self._last_audio

    def _arrival_time(self, pos: int) -> float | None:
        """Session time at which sample ``pos`` had arrived (None when it never arrived as audio)."""
        found = None
        for end, t in reversed(self._arrivals):      # the sample asked for arrived lately: scan from the newest
            if end < pos:
                break
            found = t
        return found

    # ------------------------------------------------------------ production
    async def _produce(self, tick: float = PRODUCER_TICK_S) -> None:
        while not self.closed:
            if self.lip_batcher is not None:
                # a frame is popped as soon as its audio is here; the lip batcher then gathers the sessions
                await self._audio_or(tick)
            else:
                await self.clock.sleep(tick)
            rest = []
            if self._interrupt:                # the lip-sync is only touched here, never during a pop
                self._interrupt = False
                self.lips.reset()
                self._fed = max(self.lips.position, 0)
                rest = self._resting_frames(self.pacer.next_index, self.lips.first_index)
            now_pos = int(self.clock.now() * RATE)
            if self.speech.place(self.audio, earliest=self._fed, horizon=now_pos + int(SPEECH_AHEAD_S * RATE)):
                self._last_audio = self.clock.now()
            # no audio arriving (not started, muted, lost): silence, a little behind real time
            fill_to = now_pos - int(self.jitter_margin * RATE)
            if not self.audio.anchored:        # up to a frame boundary: the first speech can start on the next one
                fill_to -= fill_to % SAMPLES_PER_FRAME
            if self.audio.cursor < fill_to:
                self._filled_to = fill_to      # frames reading audio up to here were (partly) silence fill
            self.audio.fill_silence_until(fill_to)
            restart = []
            anchor = self.audio.anchor_pos
            if anchor is not None and not self._speech_started:
                self._speech_started = True
                restart = await self._restart_at(anchor)
            end = min(self.audio.cursor, now_pos + int(FEED_AHEAD_S * RATE))
            # the audio waits in the ring until the lip sync's next frame can be complete with it: one mel
            # update per frame rather than one per packet
            lips = self.lips
            stream_end = lips.position - SAMPLES_PER_FRAME * lips.first_index + end - self._fed
            if end > self._fed and stream_end >= lips.samples_needed(lips.next_index - lips.first_index):
                chunk = self.audio.read(self._fed, end - self._fed)
                if self.paused:
                    chunk = np.zeros_like(chunk)
                self.lips.push(chunk)
                self._fed = end
            frames = []
            if self.lips.ready():
                try:
                    if self.lip_batcher is not None:
                        frames = await self.lip_batcher.pop(self.lips)
                    else:
                        frames = await self.scheduler.run(self.lips.pop, stage="lipsync")
                except SchedulerClosed:         # the server is stopping: this session closes with it
                    return
                except Exception as exc:  # noqa: BLE001 - Audio2Lip failed: a failed pop changed nothing, retry
                    self._render_failed(self.lips.next_index, exc)
                    await asyncio.sleep(PRODUCER_TICK_S)
            for f in rest + restart + frames:
                self._spawn(self._render(f, self._generation), f"frame-{f.index}")

    def _resting_frames(self, first: int, end: int) -> list[LipFrame]:
        """Frames ``first .. end-1`` with a resting mouth: after an interrupt, those the dropped audio had covered
        (the lip sync's new stream starts at ``end``), so the mouth closes at once instead of freezing."""
        if end <= first or end - first > 4 * FPS:
            return []
        rest = self.assets.rest_lip
        return [LipFrame(i, rest, SAMPLES_PER_FRAME * i, voiced=False) for i in range(first, end)]

    async def _audio_or(self, timeout: float) -> None:
        """Until audio arrives or ``timeout`` seconds pass."""
        if not self._audio_arrived.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._audio_arrived.wait()
        self._audio_arrived.clear()

    async def _restart_at(self, anchor: int) -> list[LipFrame]:
        """Start the lip-sync's stream where the speech starts (sample ``anchor``, on a frame boundary).

        The silence before it is finished first (its last frames come out now, resting mouths), so the
        speech's mel frames and windows line up with those of a file that starts with it: the session
        streams the frames ``render`` writes for the same audio.
        """
        if anchor < self._fed or anchor % SAMPLES_PER_FRAME:
            logger.warning("session %s: speech at sample %d cannot start a stream (lip-sync at %d)",
                           self.id[:8], anchor, self._fed)
            return []
        if anchor > self._fed:
            self.lips.push(self.audio.read(self._fed, anchor - self._fed))
            self._fed = anchor
        frames = await self.scheduler.run(self.lips.flush, stage="lipsync")
        if self.lips.position != anchor:
            logger.warning("session %s: lip-sync restarted at %d, not %d", self.id[:8], self.lips.position, anchor)
        return frames

    async def _render(self, f: LipFrame, generation: int) -> None:
        pose = self.pose.next(voiced=f.voiced)
        exp = self.expression.next() if self.expression is not None else None
        try:
            key = None if exp is None else exp.numpy().tobytes()
            avatar = self._avatar
            if avatar is None or key != self._avatar_key:            # EEM only when the expression changes
                avatar = await self.scheduler.run(self.renderer.prepare_expression, self.assets.source, exp)
                self._avatar, self._avatar_key = avatar, key
            deadline = self.clock.t0 + self.clock.video_due(f.index)
            image = await self.scheduler.render(avatar, f.lip, pose, session=self.id, deadline=deadline)
            if self.paste is not None:
                image = (await self.scheduler.run(self.paste, image[None]))[0]
        except FrameDropped:
            self.stats.frames_dropped += 1
            logger.debug("session %s: frame %d dropped (%.0f ms past due)", self.id[:8], f.index,
                         (self.clock.now() - self.clock.video_due(f.index)) * 1000)
            return
        except SchedulerClosed:            # the server is stopping: this session closes with it
            return
        except Exception as exc:  # noqa: BLE001 - any failure of this frame's device work, OOM included
            self._render_failed(f.index, exc)
            return
        if self._failing:
            self._failing = False
            logger.info("session %s: rendering works again from frame %d (%d frames failed)", self.id[:8], f.index,
                        self.stats.frames_failed)
        if generation != self._generation or self.closed:
            return
        self.frames[f.index] = image
        self.stats.frames_rendered += 1
        if f.voiced:
            self._last_voiced = max(self._last_voiced, f.index)
        # ready this long after its audio window was complete; only frames of audio that arrived count (a
        # frame of silence fill is late by the jitter margin by design: the budget's floor covers it)
        if self.on_lag is not None and f.sample_start + self.lips.latency_samples > self._filled_to:
            self.on_lag(self.clock.now() - (self.clock.video_due(f.index) - self.render_budget))

    def _render_failed(self, index: int, exc: BaseException) -> None:
        """Frame ``index`` failed: its slot shows the last good frame (the video track repeats it, counted); the
        first failure of a streak is logged and sent as one error event, the rest only counted."""
        self.stats.frames_failed += 1
        if self._failing or self.closed:
            return
        self._failing = True
        self.stats.render_failures += 1
        reason = exc.reason if isinstance(exc, RenderFailed) else failure_reason(exc)
        # the scheduler logged a renderer failure with its traceback; anything else is logged here
        logger.warning("session %s: frame %d failed (%s); showing the last frame until rendering works again",
                       self.id[:8], index, exc, exc_info=None if isinstance(exc, RenderFailed) else exc)
        self.send_event(render_failed_event(reason, index))

    def attach_events(self, send: Callable[[dict[str, Any]], None]) -> None:
        """Send this session's events with ``send`` (the control channel, once open); events raised before
        are sent now."""
        self._send_event = send
        while self._unsent:
            self.send_event(self._unsent.popleft())

    def send_event(self, event: dict[str, Any]) -> None:
        """Send an event to the peer, or keep it (the last few) until :meth:`attach_events`."""
        if self._send_event is None:
            self._unsent.append(event)
            return
        try:
            self._send_event(event)
        except Exception:  # noqa: BLE001 - a closed channel must not fail the frame that raised the event
            logger.warning("session %s: could not send event %s", self.id[:8], event.get("code"), exc_info=True)

    # ------------------------------------------------------------ track sources
    def _frame_for(self, index: int) -> np.ndarray | None:
        image = self.frames.pop(index, None)
        self._adapt_budget(index, late=image is None)
        for k in [k for k in self.frames if k < index]:
            del self.frames[k]
            self.stats.frames_dropped += 1
            self.stats.frames_late += 1
        if self.options.probe:
            # every frame carries its own index, also the stand-in for one not ready in time (the previous
            # image, counted as repeated), so a client measures the pipeline's timing frame by frame
            if image is None:
                self.pacer.stats.repeated += 1
                image = self._probe_last
            else:
                self._probe_last = image
            image = paint_index(image, index)
        return image

    def set_render_budget(self, budget: float) -> None:
        """Change the render budget, and the output delay with it, by ``budget - render_budget``: both tracks
        pause (a rise) or jump ahead (a cut) by as much together, so lips and voice stay in sync."""
        change = budget - self.render_budget
        self.render_budget = budget
        self.delay += change
        self.clock.delay = self.delay
        self._budget_changed = self.clock.now()
        self._late.clear()
        self.stats.budget_changes += 1

    def _adapt_budget(self, index: int, late: bool) -> None:
        """A session keeps the budget it started with while its frames are on time. When more than
        :data:`BUDGET_LATE_FRAMES` of its last :data:`BUDGET_WINDOW_FRAMES` were not ready in time (the load
        grew), it rises by a frame; when the server's
        measured budget at the current load is a frame or more below its own (the load fell) and the
        avatar is silent (a jump is not seen), it comes down to it. At most once per window."""
        if self.budget_fn is None or not self.started:
            return
        self._late.append(late)
        now = self.clock.now()
        if now - self._budget_changed < BUDGET_WINDOW_FRAMES / FPS:
            return
        if len(self._late) == self._late.maxlen and sum(self._late) > BUDGET_LATE_FRAMES:
            self.set_render_budget(min(self.render_budget + 1 / FPS, BUDGET_MAX_S))
            logger.info("session %s: frames late, render budget raised to %.0f ms", self.id[:8],
                        self.render_budget * 1000)
        elif (len(self._late) == self._late.maxlen and not any(self._late)
              and index - self._last_voiced > BUDGET_WINDOW_FRAMES):
            target = self.budget_fn()
            if target <= self.render_budget - 1 / FPS:
                self.set_render_budget(max(target, self.render_budget - 2 / FPS))
                logger.info("session %s: render budget lowered to %.0f ms", self.id[:8], self.render_budget * 1000)

    def _sent(self, index: int) -> None:
        """Frame ``index`` leaves now (to the sinks): record its audio-in -> frame-out latency; report pushed
        speech that started or finished playing."""
        if self.speech.utterances:
            self.speech.played(SAMPLES_PER_FRAME * (index + 1))
        now = self.clock.now()
        arrived = self._arrival_time(SAMPLES_PER_FRAME * (index + 1))
        if arrived is not None and self.audio.frames:
            self.stats.note_latency((now - arrived) * 1000)

    def _voice_for(self, start: int, n: int) -> np.ndarray:
        if self.paused:
            return np.zeros(n, np.int16)
        return self.audio.read_int16(start, n)

    # ------------------------------------------------------------ control
    def _preset(self, name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        if name not in self.presets:
            raise InputError(f"unknown emotion {name!r}; available: {', '.join(sorted(self.presets)) or 'none'}")
        return self.presets[name]

    @property
    def choices(self) -> Choices:
        """What this session's control messages may choose (for
        :func:`~edtalk_live.realtime.protocol.parse_control`)."""
        return Choices(emotions=tuple(sorted(self.presets)), has_clip=self.clip_poses is not None,
                       has_expression=self.expression is not None)

    def control(self, msg: ControlMessage) -> dict[str, Any]:
        """Apply one control message, parsed by :func:`~edtalk_live.realtime.protocol.parse_control` with
        :attr:`choices`;
        returns the reply."""
        match msg:
            case Emotion(name=name, intensity=intensity):
                assert self.expression is not None
                self.expression.set_emotion(self._preset(name), intensity=(
                    self.expression.intensity if intensity is None else intensity))
            case Intensity(value=value):
                assert self.expression is not None
                self.expression.set_intensity(value)
            case Pose(mode=mode):
                self.pose.set_mode(mode)
            case Pause():
                self.paused = True
            case Resume():
                self.paused = False
            case Interrupt():
                self.interrupt()
            case Stats() | Bye():            # bye: the server ends the session once the reply is sent
                pass
            case _:
                raise InputError(f"not a control message: {msg!r}")
        return {"type": "stats" if isinstance(msg, Stats) else "ok", "for": msg.type, "stats": self.snapshot()}

    def interrupt(self) -> None:
        """Drop queued audio and frames at once (an agent cutting its own speech); pushed speech ends
        ``interrupted`` and the next utterance starts as early as the lip sync allows."""
        self._generation += 1
        self.frames.clear()
        if self.speech.active:
            self.speech.clear(self.next_sample)
            self.audio.cursor = min(self.audio.cursor, self.next_sample)
        self.audio.clear_from(self.next_sample)
        self._interrupt = True

    def snapshot(self) -> dict[str, Any]:
        lat = self.stats.latency_ms
        off = self.stats.av_offset_ms
        v = self.out
        return {
            "session": self.id,
            "avatar": self.assets.name,
            "uptime_s": round(self.clock.now(), 3),
            "delay_ms": round(self.delay * 1000, 1),
            "lookahead_ms": round(self.lips.latency_s * 1000, 1),
            "render_budget_ms": round(self.render_budget * 1000, 1),
            "budget_changes": self.stats.budget_changes,
            # wall clock (Unix seconds) of the first audio sample's place on the session clock: a client on the
            # same host subtracts the moment it sent that sample to get the incoming-audio delay
            "first_audio_wall_s": self.stats.first_audio_wall,
            "frames_sent": v.sent,
            "frames_rendered": self.stats.frames_rendered,
            "frames_repeated": v.repeated,
            "frames_skipped": v.skipped,
            "frames_dropped": self.stats.frames_dropped,
            "frames_failed": self.stats.frames_failed,
            "render_failures": self.stats.render_failures,
            "render_failing": self._failing,
            "audio_frames_in": self.stats.audio_frames,
            "audio_gap_ms": round(self.audio.gap_samples / RATE * 1000, 1),
            "audio_resyncs": self.audio.resyncs,
            "latency_ms_p50": _round(_percentile(lat, 50)),
            "latency_ms_p95": _round(_percentile(lat, 95)),
            "av_offset_ms": _round(_percentile(off, 50)),
            "av_offset_ms_max": _round(max((abs(x) for x in off), default=None)),
            "audio_anchor": self.audio.anchor_pos,
            "paused": self.paused,
            "pose": self.pose.mode,
            "buffers": self.buffer_sizes(),
            "sinks": [sink.snapshot() for sink in self.sinks],
        }

    def buffer_sizes(self) -> dict[str, int]:
        """What this session holds now that a long session could let grow: rendered frames not sent yet, incoming
        audio not yet played back (samples), the lip sync's buffers, its frames waiting in the scheduler, audio
        arrivals kept for the latency, its tasks (renders in flight), its track's timing log. Each must stay
        bounded whatever the session's length (``stats`` reply, ``edtalk_session_buffer_max``, the soak)."""
        lips = self.lips.buffer_sizes
        return {"frames": len(self.frames), "audio_unplayed": max(self.audio.cursor - self.next_sample, 0),
                "lip_samples": lips["samples"], "lip_mel_frames": lips["mel_frames"], "lip_frames": lips["lip_frames"],
                "scheduler_queue": self.scheduler.queued(self.id), "arrivals": len(self._arrivals),
                "tasks": len(self._tasks), "video_late_log": len(self.out.late_ms),
                "sink_queue": max((s.queued() for s in self.sinks), default=0)}

    def counts(self) -> SessionCounts:
        """The counters of this session for the server's Prometheus totals (each only grows)."""
        v = self.out
        return SessionCounts(frames_sent=v.sent, frames_repeated=v.repeated, frames_skipped=v.skipped,
                             frames_late=self.stats.frames_late, latency_buckets=tuple(self.stats.latency_hist),
                             latency_sum=self.stats.latency_sum_ms / 1000)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
