"""The frame scheduler: batching across sessions, routing, a free event loop, drops, errors, stop, metrics.

A fake renderer records the batch size of every call and paints each frame with the request's own
values (red = lip[0], green = the avatar's id, blue = pose[0]) so every caller can check it got ITS row.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edtalk_live.edtalk.errors import InputError
from edtalk_live.realtime.scheduler import FrameDropped, FrameScheduler, RenderFailed, SchedulerClosed, SchedulerStats

SIZE = 4


class FakeRenderer:
    """Stands in for a Renderer: ``render(avatars, lip [B,20], pose [B,6]) -> uint8 [B,S,S,3]``."""

    name = "fake"

    def __init__(self, delay: float = 0.0, fail_on: float | None = None, gate: threading.Event | None = None):
        self.delay = delay
        self.fail_on = fail_on
        self.gate = gate
        self.calls: list[list[int]] = []          # lip[:,0] of each call, in order
        self.threads: set[str] = set()

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.calls]

    def render(self, avatars, lip: torch.Tensor, pose: torch.Tensor) -> np.ndarray:
        assert isinstance(avatars, list) and len(avatars) == lip.shape[0] == pose.shape[0]
        assert lip.shape[1:] == (20,) and pose.shape[1:] == (6,)
        self.threads.add(threading.current_thread().name)
        self.calls.append([int(v) for v in lip[:, 0]])
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.delay:
            time.sleep(self.delay)                   # blocks the render thread, as a GPU call would
        if self.fail_on is not None and bool((lip[:, 0] == self.fail_on).any()):
            raise RuntimeError("simulated renderer failure")
        out = np.zeros((lip.shape[0], SIZE, SIZE, 3), np.uint8)
        out[..., 0] = lip[:, 0].numpy().astype(np.uint8)[:, None, None]
        out[..., 1] = np.array([a.ident for a in avatars], np.uint8)[:, None, None]
        out[..., 2] = pose[:, 0].numpy().astype(np.uint8)[:, None, None]
        return out


def avatar(ident: int) -> SimpleNamespace:
    return SimpleNamespace(ident=ident, backend="fake")


def coeffs(value: float) -> tuple[torch.Tensor, torch.Tensor]:
    lip = torch.zeros(20)
    lip[0] = value
    pose = torch.zeros(6)
    pose[0] = value + 1
    return lip, pose


def assert_frame(frame: np.ndarray, value: int, ident: int) -> None:
    assert frame.dtype == np.uint8 and frame.shape == (SIZE, SIZE, 3)
    assert (frame[..., 0] == value).all() and (frame[..., 1] == ident).all() and (frame[..., 2] == value + 1).all()


def run(main, timeout: float = 30.0):
    """``asyncio.run(main())`` that fails instead of hanging when a request is never answered."""

    async def guarded():
        async with asyncio.timeout(timeout):                     # no extra task: all_tasks() checks stay exact
            return await main()

    return asyncio.run(guarded())


async def wait_until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.001)


# ------------------------------------------------------------------------------------------ batching


def test_sessions_are_batched_and_each_gets_its_row():
    fake = FakeRenderer(delay=0.005)
    n_sessions, n_frames = 12, 8

    async def session(s: FrameScheduler, k: int) -> None:
        for i in range(n_frames):
            value = k * 20 + i                                   # unique per (session, frame), < 256
            lip, pose = coeffs(value)
            frame = await s.render(avatar(k), lip, pose, session=f"s{k}")
            assert_frame(frame, value, k)

    async def main() -> SchedulerStats:
        async with FrameScheduler(fake, max_batch=4, max_wait_ms=2.0) as s:
            await asyncio.gather(*(session(s, k) for k in range(n_sessions)))
            return s.stats

    stats = run(main)
    assert max(fake.sizes) <= 4 and max(fake.sizes) > 1
    assert sum(fake.sizes) == n_sessions * n_frames == stats.frames_rendered
    assert stats.batches == len(fake.calls) and sum(stats.batch_sizes.values()) == stats.batches
    assert stats.batch_sizes == {n: fake.sizes.count(n) for n in set(fake.sizes)}
    assert sum(stats.dropped.values()) == 0 and stats.queue_depth == 0 and stats.in_flight == 0
    assert len(stats.render_seconds_recent) == stats.batches and stats.render_seconds_last >= 0.005
    assert stats.render_seconds_ewma >= 0.005
    assert fake.threads and all(t.startswith("edtalk-render") for t in fake.threads)


def test_waits_for_company_at_most_max_wait():
    fake = FakeRenderer()

    async def main() -> float:
        async with FrameScheduler(fake, max_batch=8, max_wait_ms=60.0) as s:
            t0 = time.monotonic()
            await s.render(avatar(1), *coeffs(1))                # alone: dispatched after ~max_wait
            alone = time.monotonic() - t0
            # max_batch requests at once go without waiting for the timer
            t0 = time.monotonic()
            await asyncio.gather(*(s.render(avatar(1), *coeffs(v)) for v in range(8)))
            full = time.monotonic() - t0
            return alone, full

    alone, full = run(main)
    assert 0.055 <= alone < 1.0
    assert full < 0.05
    assert fake.sizes == [1, 8]


def test_event_loop_stays_responsive_while_rendering():
    fake = FakeRenderer(delay=0.1)
    gaps: list[float] = []

    async def heartbeat(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def main() -> None:
        async with FrameScheduler(fake, max_batch=4) as s:
            stop = asyncio.Event()
            beat = asyncio.create_task(heartbeat(stop))
            for _ in range(3):
                await asyncio.gather(*(s.render(avatar(k), *coeffs(k), session=str(k)) for k in range(4)))
            stop.set()
            await beat

    run(main)
    assert fake.sizes == [4, 4, 4]
    assert len(gaps) > 30 and max(gaps) < 0.05, f"event loop stalled for {max(gaps) * 1e3:.0f} ms"


# ------------------------------------------------------------------------------------------ drops


def test_deadline_drops_are_counted():
    fake = FakeRenderer(delay=0.05)

    async def main() -> SchedulerStats:
        async with FrameScheduler(fake, max_batch=4, max_wait_ms=1.0) as s:
            loop = asyncio.get_running_loop()
            with pytest.raises(FrameDropped) as already:         # deadline passed before it was even queued
                await s.render(avatar(1), *coeffs(1), deadline=loop.time() - 0.001)
            assert already.value.reason == "deadline"
            first = asyncio.create_task(s.render(avatar(1), *coeffs(2), session="a"))
            await wait_until(lambda: fake.calls)                 # batch 1 is rendering (50 ms)
            late = asyncio.create_task(s.render(avatar(2), *coeffs(3), session="b", deadline=loop.time() + 0.01))
            fine = asyncio.create_task(s.render(avatar(3), *coeffs(4), session="c", deadline=loop.time() + 5))
            assert_frame(await first, 2, 1)
            with pytest.raises(FrameDropped, match="deadline") as missed:
                await late
            assert missed.value.reason == "deadline"
            assert_frame(await fine, 4, 3)
            return s.stats

    stats = run(main)
    assert fake.calls == [[2], [4]]                              # the stale frame never reached the renderer
    assert stats.dropped["deadline"] == 2 and stats.frames_rendered == 2


def test_queue_full_rejects_at_once():
    gate = threading.Event()
    fake = FakeRenderer(gate=gate)

    async def main() -> SchedulerStats:
        try:
            async with FrameScheduler(fake, max_batch=2, max_wait_ms=1.0, max_queue=3) as s:
                busy = asyncio.create_task(s.render(avatar(1), *coeffs(0)))
                await wait_until(lambda: fake.calls)             # in flight, not queued
                queued = [asyncio.create_task(s.render(avatar(1), *coeffs(v))) for v in (1, 2, 3)]
                await wait_until(lambda: s.queue_depth == 3)
                t0 = time.monotonic()
                with pytest.raises(FrameDropped, match="queue full") as full:
                    await s.render(avatar(1), *coeffs(9))
                assert full.value.reason == "queue_full" and time.monotonic() - t0 < 0.1
                gate.set()
                frames = await asyncio.gather(busy, *queued)
                for v, frame in enumerate(frames):
                    assert_frame(frame, v, 1)
                return s.stats
        finally:
            gate.set()

    stats = run(main)
    assert stats.dropped["queue_full"] == 1 and stats.frames_rendered == 4
    assert 9 not in [v for call in fake.calls for v in call]


def test_backlog_does_not_starve_other_sessions():
    fake = FakeRenderer(delay=0.02)

    async def main() -> SchedulerStats:
        async with FrameScheduler(fake, max_batch=4, max_wait_ms=1.0) as s:
            loop = asyncio.get_running_loop()
            # session "hog" queues 40 frames (no deadline) before "b" asks for one: b is in the first batch
            hog = [asyncio.create_task(s.render(avatar(1), *coeffs(100 + i), session="hog")) for i in range(40)]
            b = asyncio.create_task(s.render(avatar(2), *coeffs(7), session="b"))
            assert_frame(await b, 7, 2)
            assert 7 in fake.calls[0] and fake.calls[0][0] == 100
            await asyncio.gather(*hog)
            # a deadline-missed backlog: 40 stale frames are dropped, b's frames keep flowing
            fake.calls.clear()
            stale = [asyncio.create_task(s.render(avatar(1), *coeffs(i), session="hog", deadline=loop.time() + 0.01))
                     for i in range(40)]
            for i in range(5):
                assert_frame(await s.render(avatar(2), *coeffs(200 + i), session="b"), 200 + i, 2)
            results = await asyncio.gather(*stale, return_exceptions=True)
            assert all(isinstance(r, np.ndarray | FrameDropped) for r in results)
            assert sum(isinstance(r, FrameDropped) for r in results) == s.stats.dropped["deadline"] > 0
            return s.stats

    stats = run(main)
    assert stats.dropped["deadline"] >= 30                      # most of the backlog went stale while rendering
    assert max(fake.sizes) <= 4


def test_cancelled_request_is_not_rendered():
    gate = threading.Event()
    fake = FakeRenderer(gate=gate)

    async def main() -> None:
        try:
            async with FrameScheduler(fake, max_batch=4, max_wait_ms=1.0) as s:
                busy = asyncio.create_task(s.render(avatar(1), *coeffs(0)))
                await wait_until(lambda: fake.calls)
                gone = asyncio.create_task(s.render(avatar(1), *coeffs(1), session="gone"))
                kept = asyncio.create_task(s.render(avatar(2), *coeffs(2), session="kept"))
                await asyncio.sleep(0.005)
                gone.cancel()
                gate.set()
                assert_frame(await busy, 0, 1)
                assert_frame(await kept, 2, 2)
                with pytest.raises(asyncio.CancelledError):
                    await gone
        finally:
            gate.set()

    run(main)
    assert fake.calls == [[0], [2]]


# ------------------------------------------------------------------------------------------ failures


def test_renderer_error_fails_only_its_frame():
    """The failing batch is split: its good frame renders, the bad one fails its own caller; the next batch is
    untouched, and the failing session's next good frame ends its streak."""
    fake = FakeRenderer(delay=0.03, fail_on=13)

    async def main() -> tuple[SchedulerStats, SchedulerStats]:
        async with FrameScheduler(fake, max_batch=4, max_wait_ms=2.0) as s:
            bad = asyncio.create_task(s.render(avatar(1), *coeffs(13), session="a"))
            same_batch = asyncio.create_task(s.render(avatar(2), *coeffs(14), session="b"))
            await wait_until(lambda: fake.calls)                 # the failing batch is rendering
            nxt = asyncio.create_task(s.render(avatar(3), *coeffs(15), session="c"))
            with pytest.raises(RenderFailed, match="session 'a' \\(error\\): RuntimeError: simulated") as failed:
                await bad
            assert isinstance(failed.value.__cause__, RuntimeError) and failed.value.reason == "error"
            assert_frame(await same_batch, 14, 2)
            assert_frame(await nxt, 15, 3)
            during = s.stats
            assert_frame(await s.render(avatar(1), *coeffs(16), session="a"), 16, 1)
            return during, s.stats

    during, stats = run(main)
    assert fake.calls == [[13, 14], [13], [14], [15], [16]]
    assert during.failing == {"a": 1} and stats.failing == {}
    assert stats.dropped["error"] == 1 and stats.render_failures == {"out_of_memory": 0, "bad_output": 0, "error": 2}
    assert stats.frames_rendered == 3 and stats.batches == 3


def test_one_bad_frame_of_eight_costs_a_bisection():
    """A batch of 8 with one poisoned row: 7 frames render, 1 fails, in at most 2 log2(8) + 1 renderer calls;
    the poisoned session's next frames render in calls of their own, after the others'."""
    gate = threading.Event()
    fake = FakeRenderer(fail_on=5, gate=gate)

    async def main() -> tuple[list, list, SchedulerStats]:
        async with FrameScheduler(fake, max_batch=8, max_wait_ms=50.0) as s:
            first = [asyncio.create_task(s.render(avatar(k), *coeffs(k), session=f"s{k}")) for k in range(8)]
            await wait_until(lambda: fake.calls)
            gate.set()
            results = await asyncio.gather(*first, return_exceptions=True)
            calls = len(fake.calls)
            # the next tick: the poisoned session (now rendering alone) and three healthy ones
            nxt = await asyncio.gather(*(s.render(avatar(k), *coeffs(v), session=f"s{k}")
                                         for k, v in ((5, 5), (1, 21), (2, 22), (3, 23))), return_exceptions=True)
            return results, [calls, fake.calls[calls:]], nxt, s.stats

    results, (calls, later), nxt, stats = run(main)
    assert calls <= 2 * 3 + 1, fake.calls
    for k, r in enumerate(results):
        if k == 5:
            assert isinstance(r, RenderFailed) and r.session == "s5"
        else:
            assert_frame(r, k, k)
    assert later == [[21, 22, 23], [5]], "the failing session renders alone, after the others"
    assert isinstance(nxt[0], RenderFailed) and all(not isinstance(r, BaseException) for r in nxt[1:])
    assert stats.dropped["error"] == 2 and stats.failing == {"s5": 2}
    assert stats.frames_rendered == 10


def test_out_of_memory_is_told_apart_and_the_batch_still_splits():
    class OOM(FakeRenderer):
        def render(self, avatars, lip, pose):
            if len(avatars) > 2:                      # too large a batch for the device: halves fit
                self.calls.append([int(v) for v in lip[:, 0]])
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().render(avatars, lip, pose)

    async def main() -> tuple[list, SchedulerStats]:
        async with FrameScheduler(OOM(), max_batch=4, max_wait_ms=20.0) as s:
            frames = await asyncio.gather(*(s.render(avatar(k), *coeffs(k), session=f"s{k}") for k in range(4)))
            return frames, s.stats

    frames, stats = run(main)
    for k, f in enumerate(frames):
        assert_frame(f, k, k)
    assert stats.render_failures["out_of_memory"] == 1 and stats.dropped["error"] == 0 and stats.failing == {}


def test_wrong_frame_count_from_renderer_fails_that_call():
    """A wrong shape is a failed call like a raise: the batch splits, and a frame that still comes back wrong
    alone fails its caller."""
    class Short(FakeRenderer):
        def render(self, avatars, lip, pose):
            return super().render(avatars, lip, pose)[:1]

    class Empty(FakeRenderer):
        def render(self, avatars, lip, pose):
            return super().render(avatars, lip, pose)[:0]

    async def main() -> None:
        async with FrameScheduler(Short(), max_batch=4, max_wait_ms=5.0) as s:
            results = await asyncio.gather(*(s.render(avatar(1), *coeffs(v), session=str(v)) for v in range(2)))
            for v, r in enumerate(results):                      # a batch of one comes back right
                assert_frame(r, v, 1)
            assert s.stats.render_failures["bad_output"] == 1 and s.stats.dropped["error"] == 0
        async with FrameScheduler(Empty(), max_batch=4, max_wait_ms=1.0) as s:
            with pytest.raises(RenderFailed, match=r"\(bad output\): _BadOutput: renderer returned \[0, 4, 4, 3\] "
                                                   r"for a batch of 1"):
                await s.render(avatar(1), *coeffs(1))

    run(main)


def test_render_validates_before_queueing():
    fake = FakeRenderer()

    async def main() -> None:
        s = FrameScheduler(fake)
        with pytest.raises(SchedulerClosed, match="not running"):
            await s.render(avatar(1), *coeffs(1))
        async with s:
            with pytest.raises(InputError, match=r"mouth coefficients of session 'x' must be \[20\], got \[19\]"):
                await s.render(avatar(1), torch.zeros(19), torch.zeros(6), session="x")
            with pytest.raises(InputError, match="pose"):
                await s.render(avatar(1), torch.zeros(20), torch.zeros(2, 6))
            with pytest.raises(InputError, match="backend 'onnxruntime'"):
                await s.render(SimpleNamespace(ident=1, backend="onnxruntime"), *coeffs(1))
            lip, pose = coeffs(5)
            frame = await s.render(avatar(1), lip[None].numpy(), pose.tolist())   # [1,20] and plain lists pass
            assert_frame(frame, 5, 1)
        assert fake.sizes == [1]
        with pytest.raises(SchedulerClosed):
            await s.render(avatar(1), *coeffs(1))

    run(main)
    for kwargs in ({"max_batch": 0}, {"max_wait_ms": -1.0}, {"max_queue": 0}, {"max_batch": 2.5}):
        with pytest.raises(InputError):
            FrameScheduler(fake, **kwargs)


def test_caller_buffer_reuse_does_not_change_a_queued_frame():
    fake = FakeRenderer()

    async def main() -> None:
        async with FrameScheduler(fake, max_wait_ms=5.0) as s:
            lip, pose = coeffs(3)
            task = asyncio.create_task(s.render(avatar(1), lip, pose))
            await asyncio.sleep(0)
            lip[0] = 99                                          # the session reuses its buffer
            assert_frame(await task, 3, 1)

    run(main)


# ------------------------------------------------------------------------------------------ run()


def test_run_uses_the_render_thread_between_batches():
    fake = FakeRenderer(delay=0.03)
    log: list[str] = []

    def job(tag: str) -> str:
        log.append(f"{tag}@{threading.current_thread().name}")
        return tag.upper()

    def failing() -> None:
        raise ValueError("bad mel")

    async def main() -> None:
        async with FrameScheduler(fake, max_batch=4, max_wait_ms=1.0) as s:
            frame = asyncio.create_task(s.render(avatar(1), *coeffs(1)))
            await wait_until(lambda: fake.calls)                 # the batch holds the thread for 30 ms
            t0 = time.monotonic()
            assert await s.run(job, "eem") == "EEM"
            assert time.monotonic() - t0 >= 0.02                 # it waited for the batch: calls are serialized
            assert_frame(await frame, 1, 1)
            with pytest.raises(ValueError, match="bad mel"):
                await s.run(failing)
            assert_frame(await s.render(avatar(1), *coeffs(2)), 2, 1)   # still serving
        with pytest.raises(SchedulerClosed):
            await s.run(job, "late")

    run(main)
    assert len(log) == 1 and log[0].startswith("eem@edtalk-render")


# ------------------------------------------------------------------------------------------ stop


def test_stop_fails_pending_requests_and_leaves_nothing_behind():
    gate = threading.Event()
    fake = FakeRenderer(gate=gate)

    async def main() -> None:
        try:
            s = FrameScheduler(fake, max_batch=2, max_wait_ms=1.0)
            await s.start()
            rendering = [asyncio.create_task(s.render(avatar(1), *coeffs(v), session=str(v))) for v in (0, 1)]
            await wait_until(lambda: fake.calls)
            queued = [asyncio.create_task(s.render(avatar(1), *coeffs(v), session=str(v))) for v in (2, 3, 4)]
            ran: list[int] = []
            job = asyncio.create_task(s.run(ran.append, 1))       # queued behind the blocked batch
            await wait_until(lambda: s.queue_depth == 3)
            asyncio.get_running_loop().call_later(0.05, gate.set)  # the running call ends during stop()
            t0 = time.monotonic()
            await s.stop()
            assert time.monotonic() - t0 >= 0.04                  # stop() waited for the renderer call
            results = await asyncio.gather(*rendering, *queued, return_exceptions=True)
            assert all(isinstance(r, SchedulerClosed) for r in results), results
            with pytest.raises(SchedulerClosed):
                await job
            assert ran == []                                       # stopped before it ran: it never runs
            assert asyncio.all_tasks() == {asyncio.current_task()}
            assert not any(t.name.startswith("edtalk-render") for t in threading.enumerate())
            assert not s.running and s.stats.dropped["stopped"] == 5 and s.stats.queue_depth == 0
            await s.stop()                                         # idempotent
            # a stopped scheduler can be started again
            async with s:
                assert_frame(await s.render(avatar(1), *coeffs(8)), 8, 1)
            assert asyncio.all_tasks() == {asyncio.current_task()}
        finally:
            gate.set()

    run(main, timeout=10)
    assert fake.calls == [[0, 1], [8]]


# ------------------------------------------------------------------------------------------ metrics

def scrape(*collectors) -> tuple[dict[tuple[str, tuple], float], dict[str, str]]:
    """Expose ``collectors`` in a fresh registry and parse the text back: samples and family types."""
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)
    samples: dict[tuple[str, tuple], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def test_metrics_agree_with_stats():
    fake = FakeRenderer(delay=0.002, fail_on=250)

    async def main() -> tuple[SchedulerStats, tuple]:
        async with FrameScheduler(fake, max_batch=4, max_wait_ms=2.0) as s:
            await asyncio.gather(*(s.render(avatar(1), *coeffs(v), session=str(v % 5)) for v in range(11)))
            with pytest.raises(RenderFailed):
                await s.render(avatar(1), *coeffs(250))
            with pytest.raises(FrameDropped):
                await s.render(avatar(1), *coeffs(1), deadline=0.0)
            return s.stats, scrape(s.metrics)

    stats, (samples, types) = run(main)
    assert types["edtalk_frames_rendered"] == "counter" and types["edtalk_render_batch_seconds"] == "histogram"
    assert types["edtalk_scheduler_queue_depth"] == "gauge"
    assert samples[("edtalk_frames_rendered_total", ())] == stats.frames_rendered == 11
    assert samples[("edtalk_render_batches_total", ())] == stats.batches
    assert samples[("edtalk_frames_dropped_total", (("reason", "error"),))] == 1
    assert samples[("edtalk_frames_dropped_total", (("reason", "deadline"),))] == 1
    assert samples[("edtalk_frames_dropped_total", (("reason", "queue_full"),))] == 0
    assert samples[("edtalk_frames_dropped_total", (("reason", "stopped"),))] == 0
    assert samples[("edtalk_render_failures_total", (("reason", "error"),))] == stats.render_failures["error"] == 1
    assert samples[("edtalk_render_failures_total", (("reason", "out_of_memory"),))] == 0
    assert samples[("edtalk_render_batch_seconds_ewma", ())] == pytest.approx(stats.render_seconds_ewma)
    assert samples[("edtalk_scheduler_queue_depth", ())] == 0 and samples[("edtalk_scheduler_in_flight", ())] == 0
    for hist, total in (("edtalk_render_batch_size", 11), ("edtalk_render_batch_seconds", stats.render_seconds_sum)):
        buckets = [(k[1][0][1], v) for k, v in samples.items() if k[0] == f"{hist}_bucket"]
        counts = [v for _, v in buckets]
        assert buckets[-1][0] == "+Inf" and counts == sorted(counts)   # cumulative
        assert counts[-1] == samples[(f"{hist}_count", ())] == stats.batches
        assert samples[(f"{hist}_sum", ())] == pytest.approx(total)
    sizes = {float(k[1][0][1]): v for k, v in samples.items() if k[0] == "edtalk_render_batch_size_bucket"}
    assert list(sizes) == [1, 2, 4, float("inf")]
    assert sizes[4] == stats.batches and sizes[1] == stats.batch_sizes.get(1, 0)


def test_metrics_of_two_schedulers_are_separate():
    """Each scheduler counts into its own metrics (no process-wide registry)."""

    async def main() -> tuple:
        async with FrameScheduler(FakeRenderer(), max_batch=2) as a, FrameScheduler(FakeRenderer(), max_batch=2) as b:
            await a.render(avatar(1), *coeffs(1))
            return scrape(a.metrics)[0], scrape(b.metrics)[0]

    first, second = run(main)
    assert first[("edtalk_frames_rendered_total", ())] == 1 and second[("edtalk_frames_rendered_total", ())] == 0


# ------------------------------------------------------------------------------------------ real renderer


def test_scheduled_frames_match_direct_torch_render():
    import edtalk_live.engines as engines
    from edtalk_live.edtalk import ModelConfig
    from edtalk_live.edtalk.model import EDTalkModel

    torch.manual_seed(0)
    config = ModelConfig(family="edtalk", size=32, widths=(16, 16, 8, 8), style_dim=64, eem_hidden=16)
    renderer = engines.create_renderer("torch", model=EDTalkModel(config).eval(), device="cpu")
    avatars = [renderer.prepare_expression(renderer.prepare_source(img), None)
               for img in (torch.zeros(1, 3, 32, 32), torch.rand(1, 3, 32, 32) * 2 - 1)]
    g = torch.Generator().manual_seed(1)
    lips, poses = torch.randn(6, 20, generator=g), torch.randn(6, 6, generator=g) * 0.3
    which = [0, 1, 0, 1, 1, 0]

    async def main() -> list[np.ndarray]:
        async with FrameScheduler(renderer, max_batch=4, max_wait_ms=5.0) as s:
            return await asyncio.gather(*(s.render(avatars[a], lips[i], poses[i], session=str(i))
                                          for i, a in enumerate(which)))

    frames = run(main)
    single = [renderer.render(avatars[a], lips[i:i + 1], poses[i:i + 1])[0] for i, a in enumerate(which)]
    batched = renderer.render([avatars[a] for a in which[:4]], lips[:4], poses[:4])
    for i, frame in enumerate(frames):
        assert frame.dtype == np.uint8 and frame.shape == (32, 32, 3)
        # batched and single convolutions may round differently by one level, never more
        assert np.abs(frame.astype(int) - single[i].astype(int)).max() <= 1
    np.testing.assert_array_equal(np.stack(frames[:4]), batched)   # the first batch is exactly these 4 frames
    assert not np.array_equal(frames[0], frames[1])
