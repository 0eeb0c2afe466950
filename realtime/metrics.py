"""Every Prometheus metric of the server, defined once: names, help texts, buckets.

Each :class:`~edtalk_live.realtime.server.AvatarServer` has its own :class:`ServerMetrics` with its own
``CollectorRegistry`` (never the process-wide default one), exposed at ``GET /metrics`` by
:meth:`ServerMetrics.exposition`. Each :class:`~edtalk_live.realtime.scheduler.FrameScheduler` owns a
:class:`SchedulerMetrics` (incremented as frames render or drop), which the server registers in
its registry.

Counters only grow. The scheduler's grow at the event. A session's frame counts and latencies
live on the session while it runs; :class:`SessionTotals` reports the final counts of the
sessions that ended (kept when each ends, :meth:`SessionTotals.retire`) plus the current counts
of the live ones, so a session that ends never takes anything away from a total.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

#: upper bounds (seconds) of the audio-in to frame-out latency histogram (+Inf is implied)
LATENCY_BUCKETS_S: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0)
#: upper bounds (seconds) of the render-time histogram (+Inf is implied)
RENDER_SECONDS_BUCKETS: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
                                             5.12)
#: why the frame scheduler did not render a frame: the ``reason`` label of ``edtalk_frames_dropped_total``
DROP_REASONS: tuple[str, ...] = ("deadline", "queue_full", "error", "stopped")
#: why a renderer call raised: the ``reason`` label of ``edtalk_render_failures_total`` (see
#: :func:`edtalk_live.realtime.scheduler.failure_reason`)
RENDER_FAILURE_REASONS: tuple[str, ...] = ("out_of_memory", "bad_output", "error")
#: what the render thread spends its CPU time on: the ``stage`` label of ``edtalk_render_thread_cpu_seconds_total``
#: (``render``: decoder batches; ``lipsync``: mel, Audio2Lip and smoothing; ``other``: expressions, paste-back)
CPU_STAGES: tuple[str, ...] = ("render", "lipsync", "other")
#: upper bounds (seconds) of the event-loop lag histogram: fine around the 1-50 ms that decide whether media is on
#: time (a 25 fps frame is 40 ms), then coarse up to stalls of a second
LOOP_LAG_BUCKETS_S: tuple[float, ...] = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04,
                                         0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
#: how often the event-loop lag is sampled (seconds)
LOOP_LAG_PERIOD_S = 0.1
#: what a sink counts: the ``edtalk_sink_<what>_total`` counters (see :class:`edtalk_live.realtime.sinks.SinkStats`)
SINK_COUNTS: tuple[str, ...] = ("frames", "drops", "reconnects", "errors")
#: the kinds of output sink, exported from 0 (``kind`` label)
SINK_KINDS: tuple[str, ...] = ("webrtc", "whep", "rtmp", "stream")
#: why an offer was refused: the ``reason`` label of ``edtalk_sessions_rejected_total``
REJECT_REASONS: tuple[str, ...] = ("full", "bad_request", "too_large", "rate_limited", "unauthorized")


def batch_size_buckets(max_batch: int) -> tuple[float, ...]:
    """Bucket bounds of the batch-size histogram: the powers of two up to ``max_batch``, and ``max_batch``."""
    top = max(int(max_batch), 1)
    return tuple(sorted({2 ** i for i in range(top.bit_length()) if 2 ** i <= top} | {top}))


def latency_bucket(seconds: float) -> int:
    """Index of the :data:`LATENCY_BUCKETS_S` bucket of a latency (``len(LATENCY_BUCKETS_S)``: +Inf)."""
    return bisect.bisect_left(LATENCY_BUCKETS_S, seconds)


# ------------------------------------------------------------------------------------------ scheduler


class SchedulerMetrics:
    """The frame scheduler's metrics (a collector: register it in a registry to expose them).

    ``queue_depth`` and ``in_flight`` are read when the metrics are collected.
    """

    def __init__(self, max_batch: int, queue_depth: Callable[[], float], in_flight: Callable[[], float]):
        self.frames_rendered = Counter("edtalk_frames_rendered", "Frames rendered by the frame scheduler.",
                                       registry=None)
        self.batches = Counter("edtalk_render_batches", "Renderer calls made by the frame scheduler.", registry=None)
        self.frames_dropped = Counter("edtalk_frames_dropped", "Frames the frame scheduler did not render, by reason.",
                                      ["reason"], registry=None)
        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason)             # every reason is exported, from 0
        # every failed call counts, the split halves retried after it included: a batch of B with one bad frame
        # adds about 1 + log2(B); the frames that failed alone are frames_dropped{reason="error"}
        self.render_failures = Counter("edtalk_render_failures", "Renderer calls that raised, by reason.", ["reason"],
                                       registry=None)
        for reason in RENDER_FAILURE_REASONS:
            self.render_failures.labels(reason)
        self.batch_size = Histogram("edtalk_render_batch_size", "Frames per renderer call.",
                                    buckets=batch_size_buckets(max_batch), registry=None)
        self.batch_seconds = Histogram("edtalk_render_batch_seconds", "Time per renderer call, in seconds.",
                                       buckets=RENDER_SECONDS_BUCKETS, registry=None)
        self.batch_seconds_ewma = Gauge("edtalk_render_batch_seconds_ewma",
                                        "Moving average of the time per renderer call, seconds.", registry=None)
        self.cpu_seconds = Counter("edtalk_render_thread_cpu_seconds",
                                   "CPU time of the render thread, seconds, by stage.", ["stage"], registry=None)
        self._cpu = {stage: self.cpu_seconds.labels(stage) for stage in CPU_STAGES}
        self.queue_depth = Gauge("edtalk_scheduler_queue_depth", "Frame requests waiting for dispatch.",
                                 registry=None)
        self.queue_depth.set_function(queue_depth)
        self.in_flight = Gauge("edtalk_scheduler_in_flight", "Frames in the renderer call running now.",
                               registry=None)
        self.in_flight.set_function(in_flight)
        self._all = (self.frames_rendered, self.batches, self.frames_dropped, self.render_failures,
                     self.batch_size, self.batch_seconds, self.batch_seconds_ewma, self.cpu_seconds,
                     self.queue_depth, self.in_flight)

    def batch(self, size: int, seconds: float, ewma: float) -> None:
        """One renderer call of ``size`` frames took ``seconds``."""
        self.frames_rendered.inc(size)
        self.batches.inc()
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.batch_seconds_ewma.set(ewma)

    def cpu(self, stage: str, seconds: float) -> None:
        """The render thread spent ``seconds`` of CPU time on ``stage`` (:data:`CPU_STAGES`)."""
        self._cpu[stage].inc(max(seconds, 0.0))

    def dropped(self, reason: str, n: int = 1) -> None:
        self.frames_dropped.labels(reason).inc(n)

    def render_failure(self, reason: str) -> None:
        """A renderer call raised (:data:`RENDER_FAILURE_REASONS`)."""
        self.render_failures.labels(reason).inc()

    def describe(self) -> Iterator[Metric]:
        for m in self._all:
            yield from m.describe()

    def collect(self) -> Iterator[Metric]:
        for m in self._all:
            yield from m.collect()


# ------------------------------------------------------------------------------------------ sessions


@dataclass(frozen=True)
class SessionCounts:
    """The counters of one session (or a sum over sessions); each only grows while a session runs."""

    frames_sent: int = 0
    frames_repeated: int = 0     # the previous frame sent again: the due one was not ready
    frames_skipped: int = 0      # frame indices jumped over: the video track fell behind the clock
    frames_late: int = 0         # frames rendered after the track had passed them, discarded
    #: latencies per :data:`LATENCY_BUCKETS_S` bucket (not cumulative), then +Inf
    latency_buckets: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS_S) + 1)
    latency_sum: float = 0.0     # seconds

    def __add__(self, other: SessionCounts) -> SessionCounts:
        return SessionCounts(
            frames_sent=self.frames_sent + other.frames_sent,
            frames_repeated=self.frames_repeated + other.frames_repeated,
            frames_skipped=self.frames_skipped + other.frames_skipped,
            frames_late=self.frames_late + other.frames_late,
            latency_buckets=tuple(a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)),
            latency_sum=self.latency_sum + other.latency_sum,
        )


class SessionTotals:
    """Frame counters and the latency histogram over every session of a server (a collector).

    ``live()`` gives the counts of the sessions running now; :meth:`retire` keeps a session's final
    counts when it ends (call it once, when the session no longer appears in ``live()``).
    """

    def __init__(self, live: Callable[[], Iterable[SessionCounts]]):
        self._live = live
        self._retired = SessionCounts()

    def retire(self, counts: SessionCounts) -> None:
        self._retired = self._retired + counts

    def total(self) -> SessionCounts:
        total = self._retired
        for counts in self._live():
            total = total + counts
        return total

    def describe(self) -> Iterator[Metric]:
        return self._families(SessionCounts())

    def collect(self) -> Iterator[Metric]:
        return self._families(self.total())

    @staticmethod
    def _families(c: SessionCounts) -> Iterator[Metric]:
        yield CounterMetricFamily("edtalk_frames_sent", "Video frames sent.", value=c.frames_sent)
        yield CounterMetricFamily("edtalk_frames_repeated", "Video frames repeated because the next was not ready.",
                                  value=c.frames_repeated)
        yield CounterMetricFamily("edtalk_frames_skipped",
                                  "Video frames jumped over because the track fell behind the clock.",
                                  value=c.frames_skipped)
        yield CounterMetricFamily("edtalk_frames_late", "Frames rendered after their send time, discarded.",
                                  value=c.frames_late)
        cumulative, buckets = 0, []
        for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), c.latency_buckets, strict=True):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily("edtalk_latency_seconds", "Audio in to frame out latency, seconds.",
                                    buckets=buckets, sum_value=c.latency_sum)


# ------------------------------------------------------------------------------------------ sinks


class SinkMetrics:
    """Per-sink-kind counters of the sessions' output sinks (:mod:`edtalk_live.realtime.sinks`), counted as the
    sinks work (from their own threads too: prometheus_client's counters are thread-safe)."""

    HELP = {"frames": "Frames delivered by output sinks, by sink kind.",
            "drops": "Frames output sinks dropped because they fell behind, by sink kind.",
            "reconnects": "Reconnections of output sinks after a failure, by sink kind.",
            "errors": "Failures of output sinks (refused connections, failed sends), by sink kind."}

    def __init__(self, registry: CollectorRegistry):
        self.counters = {what: Counter(f"edtalk_sink_{what}", self.HELP[what], ["kind"], registry=registry)
                         for what in SINK_COUNTS}
        for counter in self.counters.values():
            for kind in SINK_KINDS:
                counter.labels(kind)
        self.active = Gauge("edtalk_sinks", "Output sinks running now, by sink kind.", ["kind"], registry=registry)

    def count(self, kind: str, what: str, n: int = 1) -> None:
        self.counters[what].labels(kind).inc(n)


# ------------------------------------------------------------------------------------------ server


class ServerMetrics:
    """All metrics of one server, in :attr:`registry`.

    ``live_counts()`` gives the counts of the sessions running now (see :class:`SessionTotals`);
    ``scheduler`` is the server's frame scheduler's metrics. The gauges about live sessions are
    bound by the server (``Gauge.set_function``).
    """

    def __init__(self, max_sessions: int, live_counts: Callable[[], Iterable[SessionCounts]],
                 scheduler: SchedulerMetrics | None = None):
        self.registry = r = CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ... (Linux /proc)
        ProcessCollector(registry=r)
        self.sessions = Gauge("edtalk_sessions", "Live sessions.", registry=r)
        self.sessions_max = Gauge("edtalk_sessions_max", "Session limit.", registry=r)
        self.sessions_max.set(max_sessions)
        self.sessions_started = Counter("edtalk_sessions_started", "Sessions started.", registry=r)
        self.sessions_rejected = Counter("edtalk_sessions_rejected", "Offers refused, by reason.", ["reason"],
                                         registry=r)
        for reason in REJECT_REASONS:
            self.sessions_rejected.labels(reason)
        self.session_fps = Gauge("edtalk_session_fps", "Mean video frames per second over live sessions.",
                                 registry=r)
        self.av_offset = Gauge("edtalk_av_offset_seconds",
                               "Largest recent |video - voice| offset over live sessions, seconds.", registry=r)
        # what a session holds while it lives, to check from outside that an ended one gave it all back (the
        # process collector gives the open file descriptors and the memory)
        self.peer_connections = Gauge("edtalk_peer_connections", "WebRTC peer connections not closed.", registry=r)
        self.asyncio_tasks = Gauge("edtalk_asyncio_tasks", "asyncio tasks not done in the server's event loop.",
                                   registry=r)
        self.threads = Gauge("edtalk_threads", "Threads of the server process, native codec threads included.",
                             registry=r)
        self.threads.set_function(process_threads)
        self.sinks = SinkMetrics(r)
        self.session_totals = SessionTotals(live_counts)
        r.register(self.session_totals)
        if scheduler is not None:
            r.register(scheduler)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------------------------ health over time


class EventLoopLag:
    """``edtalk_event_loop_lag_seconds``: how late a task asking to sleep :data:`LOOP_LAG_PERIOD_S` wakes.

    Every session's media runs on the one event loop: a callback that holds it (a slow handler, the garbage
    collector, the GIL held by another thread) delays every track's frames by as much. A small task sleeps
    ``period`` again and again and records by how much each wake-up came late (:meth:`start` with the
    server, :meth:`stop` at its end). A histogram, so ``serve --workers N`` sums it over the workers.
    """

    def __init__(self, registry: CollectorRegistry, period: float = LOOP_LAG_PERIOD_S):
        self.period = period
        self.histogram = Histogram("edtalk_event_loop_lag_seconds",
                                   f"How late the event loop woke a task sleeping {period:g} s, seconds.",
                                   buckets=LOOP_LAG_BUCKETS_S, registry=registry)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="event-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.period)
            self.histogram.observe(max(loop.time() - t0 - self.period, 0.0))


class BufferSizes:
    """``edtalk_session_buffer_max{buffer=...}``: the largest size of each per-session buffer over the live
    sessions, read when the metrics are collected (a collector). ``sizes()`` gives one ``{buffer: size}`` per
    live session (:meth:`edtalk_live.realtime.session.Session.buffer_sizes`). Every buffer a session holds must
    stay bounded however long it lasts; a soak (``benchmarks/soak.py``) watches these."""

    NAME = "edtalk_session_buffer_max"

    def __init__(self, sizes: Callable[[], Iterable[Mapping[str, float]]]):
        self._sizes = sizes

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, "Largest size of each per-session buffer over live sessions.",
                                labels=["buffer"])

    def collect(self) -> Iterator[Metric]:
        largest: dict[str, float] = {}
        for sizes in self._sizes():
            for name, value in sizes.items():
                largest[name] = max(largest.get(name, 0.0), float(value))
        family = GaugeMetricFamily(self.NAME, "Largest size of each per-session buffer over live sessions.",
                                   labels=["buffer"])
        for name in sorted(largest):
            family.add_metric([name], largest[name])
        yield family


def process_threads() -> int:
    """Threads of this process as the OS counts them (``/proc/self/status``: native threads of codecs and
    thread pools included); Python's own threads where there is no ``/proc``."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return threading.active_count()


# ------------------------------------------------------------------------------------------ workers

#: how the supervisor of ``serve --workers N`` merges a gauge over its live workers; any other gauge is
#: summed (live sessions, queue depth, frames in flight, peer connections, asyncio tasks, threads, open
#: fds); ``own``: the supervisor's value (the whole server's session limit); ``session_mean``: the mean
#: weighted by each worker's live sessions
GAUGE_MERGE: dict[str, str] = {
    "edtalk_sessions_max": "own",
    "edtalk_session_fps": "session_mean",
    "edtalk_av_offset_seconds": "max",
    "edtalk_render_batch_seconds_ewma": "max",
    "process_start_time_seconds": "min",
    "process_max_fds": "max",
    BufferSizes.NAME: "max",
}
#: metric types whose samples are cumulative (counters, histogram buckets, counts and sums): summed over
#: every worker process that ever ran, the dead ones with the last values read from them
CUMULATIVE_TYPES: frozenset[str] = frozenset({"counter", "histogram", "summary"})

_Key = tuple[str, tuple[tuple[str, str], ...]]      # (sample name, sorted labels)


class MergedMetrics:
    """The metrics of ``serve --workers N``: every worker's ``/metrics`` merged into one exposition (a collector).

    The supervisor reads each worker's Prometheus text (:meth:`update`) and exposes the merged samples
    under the same names: counters and histograms add up over the workers, gauges merge by
    :data:`GAUGE_MERGE`. When a worker process ends, :meth:`retire` keeps the last cumulative values
    read from it, so no counter goes down when a worker dies and its replacement starts from zero.
    Gauges count only the workers that are up (0 when none is). ``*_created`` samples (creation
    timestamps, one per process) are left out. The supervisor's own metrics live in :attr:`own`
    (offers it refused itself, the workers' state) and merge the same way.
    """

    def __init__(self, max_sessions: int, workers: int):
        self.own = r = CollectorRegistry()
        self.sessions_max = Gauge("edtalk_sessions_max", "Session limit.", registry=r)
        self.sessions_max.set(max_sessions)
        self.sessions_rejected = Counter("edtalk_sessions_rejected", "Offers refused, by reason.", ["reason"],
                                         registry=r)
        for reason in REJECT_REASONS:
            self.sessions_rejected.labels(reason)
        self.workers = Gauge("edtalk_workers", "Worker processes configured.", registry=r)
        self.workers.set(workers)
        self.workers_up = Gauge("edtalk_workers_up", "Worker processes up and healthy.", registry=r)
        self.worker_restarts = Counter("edtalk_worker_restarts", "Worker processes restarted after they ended.",
                                       registry=r)
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self._current: dict[int, list[Metric]] = {}       # worker -> the families last read from it
        self._families: dict[str, tuple[str, str]] = {}   # family -> (type, help), in the workers' order
        self._keys: dict[str, dict[_Key, None]] = {}      # family -> every sample it ever had
        #: family -> its cumulative samples summed over the worker processes that ended
        self._retired: dict[str, dict[_Key, float]] = {}

    def update(self, worker: int, exposition: str) -> None:
        """``exposition`` is what worker ``worker``'s ``/metrics`` answered just now."""
        from prometheus_client.parser import text_string_to_metric_families

        families = [f for f in text_string_to_metric_families(exposition) if not f.name.endswith("_created")]
        self._current[worker] = families
        self._learn(families)

    def retire(self, worker: int) -> None:
        """Worker ``worker``'s process ended: its last counts join the totals, its gauges leave."""
        for family in self._current.pop(worker, []):
            if family.type in CUMULATIVE_TYPES:
                retired = self._retired.setdefault(family.name, {})
                for key, value in _samples(family):
                    retired[key] = retired.get(key, 0.0) + value

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of the merged metrics, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        own = list(self.own.collect())
        self._learn(own)
        sources: list[tuple[int | None, Metric]] = [(w, f) for w, fs in self._current.items() for f in fs]
        sources += [(None, f) for f in own]
        sessions = {w: sum(v for _, v in _samples(f)) for w, f in sources
                    if w is not None and f.name == "edtalk_sessions"}
        for name, (kind, doc) in self._families.items():
            per_source = [(w, f) for w, f in sources if f.name == name]
            merged = Metric(name, doc, kind)
            values: dict[_Key, float] = dict.fromkeys(self._keys[name], 0.0)
            if kind in CUMULATIVE_TYPES:
                values.update(self._retired.get(name, {}))
                for _, f in per_source:
                    for key, value in _samples(f):
                        values[key] += value
            else:
                values.update(_merge_gauge(GAUGE_MERGE.get(name, "sum"), per_source, sessions))
            for (sample, labels), value in values.items():
                merged.add_sample(sample, dict(labels), value)
            yield merged

    def _learn(self, families: Iterable[Metric]) -> None:
        for f in families:
            self._families.setdefault(f.name, (f.type, f.documentation))
            keys = self._keys.setdefault(f.name, {})
            for key, _ in _samples(f):
                keys.setdefault(key)


def _samples(family: Metric) -> Iterator[tuple[_Key, float]]:
    for s in family.samples:
        if not s.name.endswith("_created"):
            yield (s.name, tuple(sorted(s.labels.items()))), s.value


def _merge_gauge(how: str, per_source: list[tuple[int | None, Metric]],
                 sessions: dict[int, float]) -> dict[_Key, float]:
    """One gauge family over the sources that have it (``None``: the supervisor itself)."""
    if how == "own":
        per_source = [(w, f) for w, f in per_source if w is None]
    values: dict[_Key, list[tuple[int | None, float]]] = {}
    for w, f in per_source:
        for key, value in _samples(f):
            values.setdefault(key, []).append((w, value))
    merged = {}
    for key, vs in values.items():
        if how == "max":
            merged[key] = max(v for _, v in vs)
        elif how == "min":
            merged[key] = min(v for _, v in vs)
        elif how == "session_mean":
            weight = sum(sessions.get(w, 0.0) for w, _ in vs if w is not None)
            merged[key] = sum(sessions.get(w, 0.0) * v for w, v in vs if w is not None) / weight if weight else 0.0
        else:
            merged[key] = sum(v for _, v in vs)
    return merged
