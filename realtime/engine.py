"""The avatar engine: the server's core, without HTTP, for callers on other threads and event loops.

A voice-agent framework runs the avatar inside its own process: a LiveKit worker runs each room's job in a
thread of its own with its own event loop, a Pipecat pipeline runs on its loop. Rooms on one GPU should share one
frame scheduler (one batch for all of them), so the engine runs an :class:`~edtalk_live.realtime.server.
AvatarServer`'s renderer, scheduler, lip batcher and avatars on an event loop of its own thread, and hands each
caller an :class:`AvatarStream`: a session driven by pushed speech (:mod:`edtalk_live.realtime.speech`) whose
every method may be called from any thread, and whose output (one :class:`~edtalk_live.realtime.sinks.MediaChunk`
per video frame: the image and its 40 ms of voice, at 25 fps, idle motion and a resting mouth between
utterances) and playback events are read on the caller's own loop.

    engine = AvatarEngine.build(weights_dir, "photo.jpg")       # loads the model; start() warms it up
    engine.start()
    stream = engine.open({"emotion": "happy"})                 # from any thread
    stream.push(pcm_int16, 24000); stream.end()                 # a TTS utterance
    async for chunk in stream.chunks(): ...                     # on the caller's loop
    stream.close(); engine.stop()
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from edtalk_live.edtalk.errors import EDTalkError
from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE
from edtalk_live.realtime.sinks import DropOldest, MediaChunk, Sink
from edtalk_live.realtime.speech import check_speech

logger = logging.getLogger(__name__)

#: chunks an engine stream keeps for a reader that falls behind (2 s); older ones are dropped (counted)
STREAM_QUEUE = 2 * FPS
#: the engine's load is measured over this many seconds (:meth:`AvatarEngine.load`)
LOAD_WINDOW_S = 5.0


class StreamSink(Sink):
    """An in-process reader's sink: chunks into a :class:`DropOldest` read on the reader's own loop."""

    kind = "stream"

    def __init__(self, name: str | None = None, on_count=None, capacity: int = STREAM_QUEUE):
        super().__init__(name, on_count)
        self.queue = DropOldest(capacity, on_drop=lambda: self.counters.add("drops"))

    def put(self, chunk: MediaChunk) -> None:
        self.queue.put(chunk)

    def queued(self) -> int:
        return len(self.queue)

    async def stop(self) -> None:
        self.stopped = True
        self.queue.close()


class AvatarStream:
    """One avatar session driven by pushed speech (see the module); every method but the readers is thread-safe.

    ``delay_s``: how long after it is pushed speech is heard (about). Read the output with :meth:`chunks` and the
    playback events (``playback_started``, ``playback_finished`` with ``position`` and ``interrupted``) with
    :meth:`events`, on any one loop each.
    """

    def __init__(self, engine: AvatarEngine, sid: str, sink: StreamSink, delay_s: float):
        self.engine = engine
        self.id = sid
        self.delay_s = delay_s
        self._sink = sink
        self.event_queue = DropOldest(1024)
        self.closed = False

    # ------------------------------------------------------------ input (any thread)
    def push(self, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
        """Queue mono speech (int16, or float in [-1, 1]) at ``rate`` Hz; never waits for the engine (bad input
        raises :class:`InputError` here)."""
        x = np.array(check_speech(samples, rate), copy=True)
        self._call(lambda s: s.push_speech(x, rate))

    def end(self) -> None:
        """The current utterance is complete: ``playback_finished`` comes once it has played."""
        self._call(lambda s: s.end_speech())

    def clear(self) -> None:
        """Stop speaking now (an interruption): queued speech and frames are dropped, the mouth closes."""
        self._call(lambda s: s.clear_speech())

    def control(self, message: dict[str, Any]) -> dict[str, Any]:
        """A control message, as on a WebRTC session's channel (emotion, intensity, pose, pause, resume, stats)."""
        return self._call(lambda s: self.engine.server._control(s, json.dumps(message)), wait=True)

    def close(self) -> None:
        """End the stream (idempotent); its readers end."""
        if self.closed:
            return
        self.closed = True
        self.engine._run(self.engine.server.close_peer(self.id, "stream closed"), wait=False)
        self.event_queue.close()

    # ------------------------------------------------------------ output (the reader's loop)
    async def chunks(self) -> AsyncIterator[MediaChunk]:
        """Every chunk from now on, as the pacer hands it over (a reader more than 2 s behind loses the oldest)."""
        while True:
            chunk = await self._sink.queue.get()
            if chunk is None:
                return
            yield chunk

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Playback events as they happen."""
        while True:
            event = await self.event_queue.get()
            if event is None:
                return
            yield event

    @property
    def stats(self) -> dict[str, Any]:
        return self._call(lambda s: s.snapshot(), wait=True)

    def _call(self, fn, wait: bool = False):
        if self.closed:
            raise EDTalkError("the avatar stream is closed")

        async def call():
            peer = self.engine.server.peers.get(self.id)
            if peer is None:
                raise EDTalkError("the avatar stream's session has ended")
            return fn(peer.session)

        return self.engine._run(call(), wait=wait)


class AvatarEngine:
    """An :class:`~edtalk_live.realtime.server.AvatarServer`'s core on an event loop of its own thread (see the
    module). :meth:`start` before :meth:`open`; :meth:`stop` at the end."""

    def __init__(self, server):
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._busy: collections.deque[tuple[float, float]] = collections.deque()

    @classmethod
    def build(cls, weights_dir: str | Path | None, avatar: str | Path | None = None, **kwargs) -> AvatarEngine:
        """Load the model and prepare the avatar(s) as ``serve`` does (:func:`edtalk_live.realtime.serve.build_server`
        arguments: ``backend``, ``device``, ``settings``, ``avatars_dir``, ...)."""
        from edtalk_live.realtime.serve import build_server

        return cls(build_server(weights_dir, avatar, **kwargs))

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start the engine's loop and thread, the scheduler, and time the renderer (blocks until ready)."""
        if self._thread is not None:
            return
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="avatar-engine", daemon=True)
        self._thread.start()
        ready.wait()
        self._run(self.server._startup(None), wait=True, timeout=600)
        logger.info("avatar engine started: %s", self.server.renderer.describe())

    def stop(self) -> None:
        """Close every stream and stop (idempotent)."""
        if self._thread is None or self._loop is None:
            return
        try:
            self._run(self.server._shutdown(None), wait=True, timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._thread = None

    def __enter__(self) -> AvatarEngine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ streams
    def open(self, options: dict[str, Any] | None = None) -> AvatarStream:
        """A new stream with session ``options`` (as an offer's: ``avatar``, ``emotion``, ``pose``, ...; its speech
        is pushed); :class:`InputError` for a bad option, :class:`EDTalkError` when the engine is full."""
        async def make() -> AvatarStream:
            server = self.server
            if len(server.peers) >= server.settings.max_sessions:
                raise EDTalkError(f"the avatar engine is full: {len(server.peers)} of "
                                  f"{server.settings.max_sessions} streams")
            opts = server.options_from({**(options or {}), "input": "push"})
            peer = server.new_session(opts)
            session = peer.session
            sink = StreamSink(session.id[:8], on_count=server.prometheus.sinks.count)
            session.add_sink(sink)
            stream = AvatarStream(self, session.id, sink, delay_s=session.delay - server.settings.jitter_margin)
            session.speech_sources += 1             # in use until closed: never reclaimed for silence
            session.speech_listeners.append(stream.event_queue.put)
            session.start()
            return stream

        return self._run(make(), wait=True)

    def load(self) -> float:
        """The render thread's load: the fraction of the last few seconds it spent working (0 idle, 1 full)."""
        busy = self.server.scheduler.busy_seconds
        now = time.monotonic()
        self._busy.append((now, busy))
        while len(self._busy) > 2 and now - self._busy[1][0] >= LOAD_WINDOW_S:
            self._busy.popleft()
        t0, b0 = self._busy[0]
        if now - t0 < 0.5:                     # too short a window: what the streams ask for at 25 fps, estimated
            return min(1.0, len(self.server.peers) * self.frame_seconds() * FPS)
        return min(1.0, (busy - b0) / (now - t0))

    def frame_seconds(self) -> float:
        """One frame's device work (Audio2Lip and the decoder), seconds, as the server measured it at start-up."""
        return float(getattr(self.server, "frame_seconds", 0.0) or 0.0)

    @property
    def streams(self) -> int:
        return len(self.server.peers)

    def _run(self, coro, wait: bool, timeout: float = 30.0):
        if self._loop is None:
            coro.close()
            raise EDTalkError("the avatar engine is not started: call start() first")
        if asyncio._get_running_loop() is self._loop:
            coro.close()
            raise EDTalkError("call the avatar engine from another thread than its own")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        if not wait:
            return future
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise EDTalkError(f"the avatar engine did not answer within {timeout:g} s") from None
