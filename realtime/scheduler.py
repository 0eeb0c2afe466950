"""One frame scheduler for every session: frames are batched into single Renderer calls.

    scheduler = FrameScheduler(renderer, max_batch=16, max_wait_ms=4.0)
    await scheduler.start()
    frame = await scheduler.render(avatar, lip, pose, session="abc", deadline=loop.time() + 0.04)  # uint8 [S,S,3]
    lip = await scheduler.run(renderer.audio_to_lip, mel)     # other device work, in the same render thread
    ...
    await scheduler.stop()

A single dispatcher task gathers requests: when the first one arrives it waits at most ``max_wait_ms``
for more (or until ``max_batch`` are queued), then submits one ``renderer.render(avatars, lip [B,L],
pose [B,P])`` call to a dedicated one-thread executor, so device calls are serialized and the event loop
never runs inference. While a batch renders, new requests accumulate for the next one (one batch in
flight per renderer, the next gathered meanwhile). Requests whose deadline passed before dispatch are
dropped with :class:`FrameDropped` and counted, so a slow session drops stale frames instead of growing
a queue. Batches are not padded here: a CUDA-graph backend pads to its own captured sizes.

Faults stay with the frames that cause them: when a renderer call raises (any exception, out of memory
included) the batch is split in halves and each is rendered again, so every frame that can render
does, and a frame that fails alone fails only its own caller, with :class:`RenderFailed`. A session whose
frames fail is rendered in its own calls, after the others', until one of its frames renders again, so
a session that keeps failing costs the others no retries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.engines.base import Avatar, Renderer
from edtalk_live.realtime.metrics import DROP_REASONS, RENDER_FAILURE_REASONS, SchedulerMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: how many recent per-batch render times :attr:`SchedulerStats.render_seconds_recent` keeps
RECENT_SAMPLES = 128
#: weight of the newest sample in the render-time moving average
EWMA_ALPHA = 0.1
#: drops and render failures are logged at most once per this many seconds (always counted)
LOG_INTERVAL_S = 5.0


class FrameDropped(EDTalkError):
    """A frame was not rendered: its deadline passed before dispatch (``reason="deadline"``) or the
    queue was full (``reason="queue_full"``). Sessions skip the frame and carry on."""

    def __init__(self, reason: str, message: str | None = None):
        super().__init__(message or f"frame dropped: {reason.replace('_', ' ')}")
        self.reason = reason


class RenderFailed(EDTalkError):
    """The renderer failed on this frame even when it was rendered alone (its batch was split and the other
    frames rendered). ``reason`` is one of :data:`~edtalk_live.realtime.metrics.RENDER_FAILURE_REASONS`;
    the renderer's own exception is the ``__cause__``."""

    def __init__(self, session: str, reason: str, cause: BaseException):
        super().__init__(f"rendering failed for session {session!r} ({reason.replace('_', ' ')}): "
                         f"{type(cause).__name__}: {str(cause)[:200]}")
        self.session = session
        self.reason = reason


def failure_reason(exc: BaseException) -> str:
    """The ``reason`` label of a renderer failure: ``out_of_memory`` (host or device: torch's, and ONNX
    Runtime's and TensorRT's, which say it only in their message), ``bad_output`` (the renderer returned the
    wrong shape) or ``error``."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "out_of_memory"
    if isinstance(exc, _BadOutput):
        return "bad_output"
    text = str(exc).lower()
    if "out of memory" in text or "failed to allocate" in text:
        return "out_of_memory"
    return "error"


class _BadOutput(EDTalkError):
    """The renderer returned something other than ``uint8 [B,S,S,3]`` for a batch of ``B``."""


class SchedulerClosed(EDTalkError):
    """The frame scheduler is not running: not started yet, or stopped while the frame waited."""


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of a :class:`FrameScheduler`'s counters (render times in seconds)."""

    frames_rendered: int = 0
    batches: int = 0
    #: renderer calls per batch size, ``{size: count}``
    batch_sizes: dict[int, int] = field(default_factory=dict)
    #: frames dropped per reason (:data:`~edtalk_live.realtime.metrics.DROP_REASONS`)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    #: renderer calls that raised, per reason (:data:`~edtalk_live.realtime.metrics.RENDER_FAILURE_REASONS`)
    render_failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RENDER_FAILURE_REASONS, 0))
    #: sessions whose frames fail now, with the frames failed since their last good one
    failing: dict[str, int] = field(default_factory=dict)
    render_seconds_last: float = 0.0
    render_seconds_ewma: float = 0.0
    render_seconds_sum: float = 0.0
    #: the last :data:`RECENT_SAMPLES` per-batch render times, oldest first
    render_seconds_recent: list[float] = field(default_factory=list)
    #: requests waiting for dispatch
    queue_depth: int = 0
    #: frames in the batch being rendered now (0 when idle)
    in_flight: int = 0
    max_batch: int = 1

    @property
    def mean_batch_size(self) -> float:
        return self.frames_rendered / self.batches if self.batches else 0.0


@dataclass(eq=False, slots=True)
class _Request:
    avatar: Any
    lip: torch.Tensor           # [lip_dim] float32, CPU
    pose: torch.Tensor          # [pose_dim] float32, CPU
    session: str
    deadline: float | None      # loop.time() by which it must be dispatched
    enqueued: float             # loop.time() at enqueue
    seq: int                    # global arrival order
    future: asyncio.Future


class FrameScheduler:
    """Batches single-frame requests from all sessions into one ``renderer.render`` call at a time.

    ``max_batch`` bounds the frames per call, ``max_wait_ms`` how long the first waiting request
    waits for company, ``max_queue`` how many requests may wait (beyond it :meth:`render` raises
    :class:`FrameDropped` at once). ``stop_timeout`` bounds how long :meth:`stop` waits for a
    renderer call already running. Requests are served oldest first; when several sessions have
    requests waiting, a batch takes one from each session in turn (oldest head first), so a
    session with a backlog cannot crowd the others out of a batch. :attr:`stats` is a snapshot of the
    counters; :attr:`metrics` the same as Prometheus metrics (see :mod:`edtalk_live.realtime.metrics`).
    """

    def __init__(self, renderer: Renderer, max_batch: int = 16, max_wait_ms: float = 4.0, max_queue: int = 256,
                 stop_timeout: float = 10.0):
        if int(max_batch) != max_batch or max_batch < 1:
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not max_wait_ms >= 0:
            raise InputError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        if int(max_queue) != max_queue or max_queue < 1:
            raise InputError(f"max_queue must be a positive integer, got {max_queue!r}")
        self.renderer = renderer
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        #: wall seconds the render thread has spent working (renders, lip sync, other device work): its load is the
        #: rate this grows at (one render thread: 1.0 is all it can do)
        self.busy_seconds = 0.0
        self.max_queue = int(max_queue)
        self.stop_timeout = float(stop_timeout)
        config = getattr(renderer, "config", None)
        self._lip_dim = int(getattr(config, "lip_dim", 20))
        self._pose_dim = int(getattr(config, "pose_dim", 6))
        self._backend = str(getattr(renderer, "name", "") or "")

        self._queues: dict[str, deque[_Request]] = {}     # per session, FIFO
        self._depth = 0                                    # queued requests (may include caller-cancelled ones)
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed: threading.Event | None = None      # set by stop(); read by calls still queued in the thread
        self._calls: set[concurrent.futures.Future] = set()   # submitted to the render thread, not yet done
        self._inflight_frames = 0

        self._frames = 0
        self._batches = 0
        self._batch_sizes: dict[int, int] = {}
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._failures = dict.fromkeys(RENDER_FAILURE_REASONS, 0)
        self._failing: dict[str, int] = {}                 # session -> frames failed alone since its last good one
        self._render_last = 0.0
        self._render_ewma = 0.0
        self._render_sum = 0.0
        self._render_recent: deque[float] = deque(maxlen=RECENT_SAMPLES)
        self._unlogged = dict.fromkeys(DROP_REASONS, 0)
        self._last_log = {"drop": -math.inf, "error": -math.inf}
        #: Prometheus metrics (a collector): register it in a registry to expose them
        self.metrics = SchedulerMetrics(self.max_batch, queue_depth=lambda: self.queue_depth,
                                        in_flight=lambda: self._inflight_frames)

    def __repr__(self) -> str:
        return (f"FrameScheduler({self._backend or type(self.renderer).__name__}, max_batch={self.max_batch}, "
                f"max_wait_ms={self.max_wait * 1000:g}, max_queue={self.max_queue})")

    # ------------------------------------------------------------ life cycle
    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the dispatcher task and the render thread (no-op when already running)."""
        if self.running:
            return
        if self._task is not None:                         # the dispatcher died: release what it left
            await self.stop()
        self._wake = asyncio.Event()
        self._closed = threading.Event()
        self._calls = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edtalk-render")
        self._task = asyncio.create_task(self._run(), name="edtalk-frame-scheduler")
        logger.info("frame scheduler started: %r", self)

    async def stop(self) -> None:
        """Stop: waiting requests, the batch being rendered and queued :meth:`run` calls fail with
        :class:`SchedulerClosed`.

        Waits (up to ``stop_timeout``) for a call already running in the render thread so the
        renderer can be closed safely afterwards; leaves no task or thread behind.
        """
        task, self._task = self._task, None
        if task is None:
            return
        if self._closed is not None:
            self._closed.set()                             # calls not started yet raise instead of running
        self._fail_queued()
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            logger.error("frame scheduler dispatcher had failed", exc_info=task.exception())
        executor, self._executor = self._executor, None
        calls, self._calls = [c for c in list(self._calls) if not c.done()], set()
        finished = True
        if calls:
            done, pending = await asyncio.wait([asyncio.wrap_future(c) for c in calls], timeout=self.stop_timeout)
            for w in done:
                if not w.cancelled():
                    w.exception()                          # retrieved here; their callers were told already
            for w in pending:
                w.cancel()
            if pending:
                finished = False
                logger.warning("a render-thread call is still running %.1f s after stop(); leaving its thread "
                               "behind", self.stop_timeout)
        if executor is not None:
            executor.shutdown(wait=finished, cancel_futures=True)
        logger.info("frame scheduler stopped (%d frames in %d batches, dropped %s)", self._frames, self._batches,
                    self._dropped)

    async def __aenter__(self) -> FrameScheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ requests
    async def render(self, avatar: Avatar, lip: torch.Tensor | np.ndarray | Sequence[float],
                     pose: torch.Tensor | np.ndarray | Sequence[float], session: str = "",
                     deadline: float | None = None) -> np.ndarray:
        """Render one frame: mouth ``lip [lip_dim]`` and ``pose [pose_dim]`` coefficients on ``avatar``.

        Returns ``uint8 [S,S,3]`` RGB (a row of the batch's array). ``deadline`` is a
        ``loop.time()`` by which the request must have been dispatched, else it raises
        :class:`FrameDropped` (``reason="deadline"``); a full queue raises ``FrameDropped``
        (``reason="queue_full"``) at once. A frame the renderer fails on even alone raises
        :class:`RenderFailed` (the other frames of its batch render). Raises :class:`SchedulerClosed`
        when the scheduler is not running and :class:`~edtalk.errors.InputError` for bad coefficients
        or an avatar of another backend.
        """
        if not self.running or self._wake is None:
            raise SchedulerClosed("the frame scheduler is not running (call start() first)")
        lip_t = self._coeffs(lip, self._lip_dim, "mouth", session)
        pose_t = self._coeffs(pose, self._pose_dim, "pose", session)
        backend = getattr(avatar, "backend", None)
        if self._backend and backend is not None and backend != self._backend:
            raise InputError(f"avatar of session {session!r} was prepared by backend {backend!r}, "
                             f"not {self._backend!r}")
        loop = asyncio.get_running_loop()
        now = loop.time()
        if deadline is not None and deadline <= now:
            self._drop("deadline")
            raise FrameDropped("deadline", f"frame for session {session!r} dropped: its deadline passed "
                                           f"{(now - deadline) * 1e3:.1f} ms before it was queued")
        if self._depth >= self.max_queue:
            self._purge(now)
            if self._depth >= self.max_queue:
                self._drop("queue_full")
                raise FrameDropped("queue_full", f"frame for session {session!r} dropped: queue full "
                                                 f"({self._depth} frames waiting, max_queue={self.max_queue})")
        future: asyncio.Future[np.ndarray] = loop.create_future()
        request = _Request(avatar, lip_t, pose_t, session, deadline, now, next(self._seq), future)
        self._queues.setdefault(session, deque()).append(request)
        self._depth += 1
        self._wake.set()
        return await future

    async def run(self, fn: Callable[..., T], /, *args: Any, stage: str = "other") -> T:
        """Run ``fn(*args)`` in the render thread, between batches, and return its result.

        For a session's other device work (Audio2Lip on new audio, the EEM blocks of a new
        expression): device calls stay serialized with rendering and the event loop never runs
        them. Its CPU time is counted under ``stage`` (:data:`~edtalk_live.realtime.metrics.CPU_STAGES`).
        Raises what ``fn`` raises, or :class:`SchedulerClosed` when the scheduler stops first.
        """
        if not self.running:
            raise SchedulerClosed("the frame scheduler is not running (call start() first)")
        return await asyncio.wrap_future(self._submit(fn, *args, stage=stage))

    def _submit(self, fn: Callable[..., T], *args: Any, stage: str = "other") -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)`` for the render thread; it raises :class:`SchedulerClosed` instead of running
        when :meth:`stop` came first."""
        assert self._executor is not None and self._closed is not None
        closed = self._closed
        metrics = self.metrics

        def call() -> T:
            if closed.is_set():
                raise SchedulerClosed("the frame scheduler stopped before this call ran")
            start, wall = time.thread_time(), time.perf_counter()
            try:
                return fn(*args)
            finally:
                metrics.cpu(stage, time.thread_time() - start)
                self.busy_seconds += time.perf_counter() - wall

        future = self._executor.submit(call)
        self._calls.add(future)
        future.add_done_callback(self._calls.discard)     # runs in the render thread; set.discard is atomic
        return future

    def forget(self, session: str) -> None:
        """``session`` ended: forget that its frames were failing (called by the session when it closes)."""
        self._failing.pop(session, None)

    @staticmethod
    def _coeffs(value: Any, dim: int, what: str, session: str) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float32).detach()
        if t.ndim > 2 or t.numel() != dim or (t.ndim == 2 and t.shape[0] != 1):
            raise InputError(f"{what} coefficients of session {session!r} must be [{dim}], got {list(t.shape)}")
        return t.reshape(dim).cpu().clone()              # the caller may reuse its buffer before the frame renders

    # ------------------------------------------------------------ stats
    @property
    def queue_depth(self) -> int:
        """Requests waiting for dispatch."""
        return sum(1 for q in self._queues.values() for r in q if not r.future.done())

    def queued(self, session: str) -> int:
        """Requests of ``session`` waiting for dispatch (cancelled ones included until purged)."""
        return len(self._queues.get(session, ()))

    @property
    def stats(self) -> SchedulerStats:
        """A snapshot of the counters (safe to keep; later frames do not change it)."""
        return SchedulerStats(
            frames_rendered=self._frames, batches=self._batches, batch_sizes=dict(sorted(self._batch_sizes.items())),
            dropped=dict(self._dropped), render_failures=dict(self._failures), failing=dict(self._failing),
            render_seconds_last=self._render_last,
            render_seconds_ewma=self._render_ewma, render_seconds_sum=self._render_sum,
            render_seconds_recent=list(self._render_recent),
            queue_depth=self.queue_depth, in_flight=self._inflight_frames, max_batch=self.max_batch,
        )

    def _record(self, size: int, seconds: float) -> None:
        self._frames += size
        self._batches += 1
        self._batch_sizes[size] = self._batch_sizes.get(size, 0) + 1
        self._render_last = seconds
        ewma = self._render_ewma
        self._render_ewma = seconds if self._batches == 1 else ewma + EWMA_ALPHA * (seconds - ewma)
        self._render_sum += seconds
        self._render_recent.append(seconds)
        self.metrics.batch(size, seconds, self._render_ewma)

    def _drop(self, reason: str, n: int = 1, exc: BaseException | None = None, log: bool = True) -> None:
        """Count ``n`` dropped frames; log drops (and, separately, render failures) at most once per
        :data:`LOG_INTERVAL_S` (``log=False``: the caller logs them itself)."""
        self._dropped[reason] += n
        self.metrics.dropped(reason, n)
        if reason == "stopped" or not log:
            return
        kind = "error" if reason == "error" else "drop"
        self._unlogged[reason] += n
        now = time.monotonic()
        if now - self._last_log[kind] < LOG_INTERVAL_S:
            return
        self._last_log[kind] = now
        if kind == "error":
            logger.error("renderer call failed: %d frames failed since the last report (%d in all); only the "
                         "frames of the failing batch fail, serving on", self._unlogged["error"],
                         self._dropped["error"], exc_info=exc)
            self._unlogged["error"] = 0
            return
        what = ", ".join(f"{k} {r.replace('_', ' ')}" for r, k in self._unlogged.items() if k and r != "error")
        logger.warning("frame scheduler dropped frames since the last report (%s); queue depth %d", what, self._depth)
        self._unlogged.update(deadline=0, queue_full=0)

    # ------------------------------------------------------------ queue
    def _purge(self, now: float) -> None:
        """Remove requests whose caller gave up and fail those whose deadline has passed."""
        expired = 0
        for session in list(self._queues):
            keep: deque[_Request] = deque()
            for r in self._queues[session]:
                if r.future.done():
                    continue
                if r.deadline is not None and r.deadline <= now:
                    r.future.set_exception(FrameDropped("deadline", (
                        f"frame for session {session!r} dropped: waited {(now - r.enqueued) * 1e3:.1f} ms, "
                        f"{(now - r.deadline) * 1e3:.1f} ms past its deadline")))
                    expired += 1
                    continue
                keep.append(r)
            if keep:
                self._queues[session] = keep
            else:
                del self._queues[session]
        self._depth = sum(len(q) for q in self._queues.values())
        if expired:
            self._drop("deadline", expired)

    def _take(self, now: float) -> list[_Request]:
        """Up to ``max_batch`` live requests: one per session in turn, sessions ordered by their oldest request."""
        self._purge(now)
        heads = sorted((q for q in self._queues.values()), key=lambda q: q[0].seq)
        batch: list[_Request] = []
        while heads and len(batch) < self.max_batch:
            rest = []
            for q in heads:
                batch.append(q.popleft())
                if len(batch) == self.max_batch:
                    break
                if q:
                    rest.append(q)
            heads = rest
        self._queues = {s: q for s, q in self._queues.items() if q}
        self._depth -= len(batch)
        return batch

    def _fail(self, batch: Sequence[_Request], exc: BaseException, reason: str, log: bool = True) -> None:
        live = [r for r in batch if not r.future.done()]
        for r in live:
            r.future.set_exception(exc)
        if live:
            self._drop(reason, len(live), exc, log=log)

    def _fail_queued(self) -> None:
        for q in self._queues.values():
            self._fail(q, SchedulerClosed("the frame scheduler stopped before this frame was rendered"), "stopped")
        self._queues.clear()
        self._depth = 0

    # ------------------------------------------------------------ dispatcher
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch: list[_Request] = []
            try:
                await self._gather(loop)
                batch = self._take(loop.time())
                if batch:
                    await self._dispatch(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:                       # a bug here must not leave every session hanging
                logger.exception("frame scheduler error; failing the %d frames of this batch", len(batch))
                self._fail(batch, exc, "error")
                await asyncio.sleep(max(self.max_wait, 0.001))   # never spin the loop on a repeating failure

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Return once ``max_batch`` requests wait or the oldest has waited ``max_wait``."""
        assert self._wake is not None
        while True:
            if self._depth == 0:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._depth >= self.max_batch:
                return
            oldest = min(q[0].enqueued for q in self._queues.values())
            remaining = oldest + self.max_wait - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return

    async def _dispatch(self, batch: list[_Request]) -> None:
        """Render ``batch``; the frames of sessions whose frames have been failing in calls of their own, after
        the others' (a poisoned session then never makes the others retry, nor wait for its failing call)."""
        groups: dict[str | None, list[_Request]] = {None: []}     # None: the sessions that render fine
        for r in batch:
            groups.setdefault(r.session if r.session in self._failing else None, []).append(r)
        pending = list(groups.values())
        for k, group in enumerate(pending):
            if not group:
                continue
            try:
                await self._render_split(group)
            except asyncio.CancelledError:                 # stop(): the groups not rendered yet fail too
                for g in pending[k + 1:]:
                    self._fail(g, SchedulerClosed("the frame scheduler stopped before this frame was rendered"),
                               "stopped")
                raise

    async def _render_split(self, batch: list[_Request]) -> None:
        """Render ``batch`` in one call and hand each caller its row. When the call raises, split the batch in
        halves and render each again (bisection: one bad frame in a batch of B costs at most 2 log2(B) more
        calls), until a frame that fails alone fails its own caller with :class:`RenderFailed`."""
        loop = asyncio.get_running_loop()
        stack = [batch]
        first = True
        while stack:
            group = stack.pop()
            if not first:                                  # a retry: leave out frames that are no longer wanted
                group = self._still_wanted(group, loop.time())
                if not group:
                    continue
            first = False
            n = len(group)
            call = self._submit(self._render_batch, [r.avatar for r in group], [r.lip for r in group],
                                [r.pose for r in group], stage="render")
            self._inflight_frames = n
            try:
                frames, seconds = await asyncio.wrap_future(call)
            except asyncio.CancelledError:                 # stop(): the call may still run; stop() waits for it
                self._inflight_frames = 0
                for g in (group, *stack):
                    self._fail(g, SchedulerClosed("the frame scheduler stopped while this frame was rendering"),
                               "stopped")
                raise
            except SchedulerClosed as exc:
                self._inflight_frames = 0
                for g in (group, *stack):
                    self._fail(g, exc, "stopped")
                return
            except Exception as exc:                       # noqa: BLE001 - any renderer failure, OOM included
                self._inflight_frames = 0
                reason = failure_reason(exc)
                self._failures[reason] += 1
                self.metrics.render_failure(reason)
                if n > 1:
                    stack += [group[n // 2:], group[:n // 2]]     # the first half renders first
                else:
                    self._failed_alone(group[0], reason, exc)
                continue
            self._inflight_frames = 0
            self._record(n, seconds)
            for i, r in enumerate(group):
                if not r.future.done():                   # its caller may have given up meanwhile
                    r.future.set_result(frames[i])
                streak = self._failing.pop(r.session, None)
                if streak is not None:
                    logger.info("session %s renders again after %d failed frames", r.session[:8], streak)

    def _still_wanted(self, group: list[_Request], now: float) -> list[_Request]:
        """The requests of ``group`` whose caller still waits and whose deadline has not passed; the others are
        dropped as stale frames are at dispatch."""
        live = [r for r in group if not r.future.done()]
        expired = [r for r in live if r.deadline is not None and r.deadline <= now]
        for r in expired:
            r.future.set_exception(FrameDropped("deadline", (
                f"frame for session {r.session!r} dropped: its deadline passed while its batch was split and "
                "rendered again after a renderer failure")))
        if expired:
            self._drop("deadline", len(expired))
        return [r for r in live if r not in expired]

    def _failed_alone(self, r: _Request, reason: str, exc: BaseException) -> None:
        """``r`` failed in a call of its own: its caller gets :class:`RenderFailed`; the first failure of a streak
        is logged (with the renderer's traceback), the rest only counted."""
        failure = RenderFailed(r.session, reason, exc)
        failure.__cause__ = exc
        self._fail([r], failure, "error", log=False)
        streak = self._failing.get(r.session)
        self._failing[r.session] = (streak or 0) + 1
        if streak is None:
            logger.error("rendering fails for session %s (%s): its frames render in calls of their own until one "
                         "renders again; the other sessions' frames render on", r.session[:8], reason, exc_info=exc)

    def _render_batch(self, avatars: list[Any], lips: list[torch.Tensor],
                      poses: list[torch.Tensor]) -> tuple[np.ndarray, float]:
        """Runs in the render thread: one renderer call, timed, its output checked."""
        lip, pose = torch.stack(lips), torch.stack(poses)
        start = time.perf_counter()
        frames = self.renderer.render(avatars, lip, pose)
        seconds = time.perf_counter() - start
        n = len(avatars)
        if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[0] != n:
            shape = list(frames.shape) if isinstance(frames, np.ndarray) else type(frames).__name__
            raise _BadOutput(f"renderer returned {shape} for a batch of {n} frames, expected [{n},S,S,3]")
        return frames, seconds
