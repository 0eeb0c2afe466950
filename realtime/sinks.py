"""Output sinks: where a session's paced, lip-synced stream goes (a WebRTC peer, a WHEP viewer, RTMP, a camera).

A session's pacer (:meth:`edtalk_live.realtime.session.Session._pace`) makes one :class:`MediaChunk` per video
frame at the frame's due time: the image, the frame's own 40 ms of voice, and its media time on the session's
audio clock. It hands the chunk to every sink of the session with :meth:`Sink.put`, which never waits: each
sink keeps a small bounded queue that drops its oldest chunk when the sink falls behind, and encodes or sends
from there, off the pacer's path (a WebRTC sink in aiortc's track loop and codec threads, the others in a
thread of their own, :class:`ThreadSink`). So a slow or stuck sink loses its own frames and nothing else: the
event loop, the frame scheduler and the other sinks never wait on it.

Every sink counts the frames it delivered, the chunks it dropped and its reconnects (:class:`SinkStats`), in
the server's ``/metrics`` by sink kind (:class:`edtalk_live.realtime.metrics.SinkMetrics`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edtalk_live.edtalk.timing import FPS, SAMPLES_PER_FRAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaChunk:
    """One video frame of a session's output and the voice that goes with it.

    ``index`` is the frame's number on the session clock: it shows the mouth of voice samples
    ``[640 index, 640 (index + 1))`` (16 kHz), which ``voice`` holds. ``due`` is the event-loop time
    (``loop.time()``) at which the pacer meant it to leave; a sink sending in real time sends the
    second half of the voice 20 ms after it. The arrays are shared by every sink: read-only.
    """

    index: int
    image: np.ndarray          # uint8 [H, W, 3] RGB
    voice: np.ndarray          # int16 [SAMPLES_PER_FRAME], mono 16 kHz
    due: float

    @property
    def media_time(self) -> float:
        """Seconds of the session's audio clock at which this frame starts (its voice's first sample)."""
        return self.index / FPS

    @property
    def first_sample(self) -> int:
        return self.index * SAMPLES_PER_FRAME


@dataclass
class SinkStats:
    frames: int = 0            # chunks delivered (encoded and sent, written)
    drops: int = 0             # chunks dropped: the sink fell behind and its queue dropped the oldest
    reconnects: int = 0        # the sink's connection was made again after a failure
    errors: int = 0            # failures of the sink's own work (a failed send, a refused connection)


class SinkCounters:
    """Where a sink reports its counts: its own :class:`SinkStats`, and the server's metrics when it has them
    (``on_count(kind, what, n)``; see :class:`edtalk_live.realtime.metrics.SinkMetrics`)."""

    def __init__(self, kind: str, on_count: Callable[[str, str, int], None] | None = None):
        self.kind = kind
        self.stats = SinkStats()
        self._on_count = on_count
        self._lock = threading.Lock()      # counted from the loop (drops) and from the sink's thread (frames)

    def add(self, what: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + n)
        if self._on_count is not None:
            self._on_count(self.kind, what, n)


class DropOldest:
    """A bounded FIFO whose :meth:`put` never waits: when full, the oldest item is dropped (counted).

    Thread-safe: items are put on the event loop and taken on the loop (:meth:`get`) or in a sink's thread
    (:meth:`get_blocking`). :meth:`close` wakes every taker, which then gets ``None``.
    """

    def __init__(self, capacity: int, on_drop: Callable[[], None] | None = None):
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._on_drop = on_drop
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Any) -> bool:
        """Queue ``item``; returns False when an older item was dropped to make room (or the queue is closed)."""
        dropped = False
        with self._cond:
            if self.closed:
                return False
            if len(self._items) >= self.capacity:
                self._items.popleft()
                dropped = True
            self._items.append(item)
            self._cond.notify()
            waiters, self._waiters = self._waiters, []
        _wake(waiters)
        if dropped and self._on_drop is not None:
            self._on_drop()
        return not dropped

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        _wake(waiters)

    def get_nowait(self) -> Any | None:
        with self._cond:
            return self._items.popleft() if self._items else None

    def get_blocking(self, timeout: float | None = None) -> Any | None:
        """The oldest item, waiting up to ``timeout`` seconds (None: nothing came, or the queue closed)."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    async def get(self) -> Any | None:
        """The oldest item, waiting for one on the running loop (None once the queue is closed)."""
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                if self.closed:
                    return None
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            try:
                await fut
            finally:
                with self._cond:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove((loop, fut))


def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]) -> None:
    """Wake the loops' takers: directly on their own loop's thread (the pacer's case: no self-pipe write, which
    ``call_soon_threadsafe`` costs), through the loop's thread-safe call from any other."""
    running = asyncio._get_running_loop()
    for loop, fut in waiters:
        if loop is running:
            _resolve(fut)
        else:
            loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Sink(ABC):
    """Where a session's output goes. :meth:`put` is called on the event loop at each frame's due time and must
    return at once; :meth:`start` before the first chunk, :meth:`stop` at the end (idempotent).

    ``kind`` names the sink type in ``/metrics`` (``webrtc``, ``whep``, ``rtmp``, ``stream``); ``name`` says which
    one in logs.
    """

    kind: ClassVar[str] = "sink"

    def __init__(self, name: str | None = None, on_count: Callable[[str, str, int], None] | None = None):
        self.name = name or self.kind
        self.counters = SinkCounters(self.kind, on_count)
        self.started = False
        self.stopped = False

    @property
    def stats(self) -> SinkStats:
        return self.counters.stats

    def start(self) -> None:
        self.started = True

    @abstractmethod
    def put(self, chunk: MediaChunk) -> None:
        """Take one chunk; never waits (drop the oldest queued chunk when behind)."""

    async def stop(self) -> None:
        self.stopped = True

    def queued(self) -> int:
        """Chunks waiting in this sink now (bounded by its queues' capacity)."""
        return 0

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {"kind": self.kind, "name": self.name, "frames": s.frames, "drops": s.drops,
                "reconnects": s.reconnects, "errors": s.errors}


class ThreadSink(Sink):
    """A sink whose work (encoding, network writes) runs in a thread of its own, fed by a :class:`DropOldest`
    queue of ``capacity`` chunks: subclasses implement :meth:`write` (one chunk), and may implement
    :meth:`open` (before the first chunk, and again after a failure) and :meth:`close`.

    A failing :meth:`open` or :meth:`write` closes the sink's connection, waits (``backoff``: 0.5 s doubling to
    ``max_backoff``) and opens it again, counting a reconnect; chunks queued meanwhile are dropped by the queue
    as new ones come, so the sink resumes at the live edge.
    """

    #: seconds between a failure and the next try, doubling up to :attr:`max_backoff`
    backoff: float = 0.5
    max_backoff: float = 8.0

    def __init__(self, name: str | None = None, on_count: Callable[[str, str, int], None] | None = None,
                 capacity: int = 2 * FPS):
        super().__init__(name, on_count)
        self.queue = DropOldest(capacity, on_drop=lambda: self.counters.add("drops"))
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.connected = False

    def start(self) -> None:
        if self.started:
            return
        super().start()
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.kind}-{self.name}", daemon=True)
        self._thread.start()

    def put(self, chunk: MediaChunk) -> None:
        self.queue.put(chunk)

    def queued(self) -> int:
        return len(self.queue)

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._stopping.set()
        self.queue.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            if self._thread.is_alive():
                logger.warning("sink %s/%s did not stop within 10 s", self.kind, self.name)

    # ------------------------------------------------------------ the sink's thread
    def open(self) -> None:  # noqa: B027 - optional hook
        """Connect (called in the sink's thread before the first chunk and after each failure)."""

    @abstractmethod
    def write(self, chunk: MediaChunk) -> None:
        """Encode and send one chunk (in the sink's thread)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect (in the sink's thread; also after a failure, before the next :meth:`open`)."""

    def _run(self) -> None:
        delay = self.backoff
        ever_connected = False
        while not self._stopping.is_set():
            if not self.connected:
                try:
                    self.open()
                except Exception as e:  # noqa: BLE001 - any connection failure: back off and try again
                    self.counters.add("errors")
                    logger.warning("sink %s/%s: could not connect (%s); again in %.1f s", self.kind, self.name, e,
                                   delay)
                    self._close_quietly()
                    self._stopping.wait(delay)
                    delay = min(delay * 2, self.max_backoff)
                    continue
                self.connected = True
                if ever_connected:
                    self.counters.add("reconnects")
                    logger.info("sink %s/%s: reconnected", self.kind, self.name)
                ever_connected = True
            chunk = self.queue.get_blocking(0.25)
            if chunk is None:
                continue
            try:
                self.write(chunk)
            except Exception as e:  # noqa: BLE001 - a dropped connection: reconnect with backoff
                self.counters.add("errors")
                logger.warning("sink %s/%s: send failed (%s); reconnecting in %.1f s", self.kind, self.name, e, delay)
                self.connected = False
                self._close_quietly()
                self._stopping.wait(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            self.counters.add("frames")
            delay = self.backoff
        if self.connected:
            self.connected = False
            self._close_quietly()

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail too
            logger.debug("sink %s/%s: close failed", self.kind, self.name, exc_info=True)


def split_voice(chunk: MediaChunk, parts: int) -> list[np.ndarray]:
    """The chunk's voice in ``parts`` equal pieces (2: the 20 ms frames Opus sends)."""
    return np.split(chunk.voice, parts)
