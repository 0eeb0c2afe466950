"""Lip-sync pops of several sessions with one Audio2Lip call: same frames as separate pops."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from edtalk_live.avatar.lipsync import LipSyncConfig, StreamingLipSync
from edtalk_live.realtime.lipbatch import LipBatcher, pop_many


class CountingA2L:
    """A deterministic stand-in for Audio2Lip that counts its calls."""

    def __init__(self):
        torch.manual_seed(0)
        self.proj = torch.randn(80 * 16, 20) / 40
        self.calls = 0
        self.fail = False

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail:
            raise RuntimeError("device lost")
        return windows.flatten(1) @ self.proj


def _streams(n: int, seconds: float = 2.0) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [(rng.standard_normal(int(16000 * seconds)) * 0.1 * (k + 1)).astype(np.float32) for k in range(n)]


def _frames_equal(a, b) -> None:
    assert [f.index for f in a] == [f.index for f in b]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.lip, y.lip, atol=1e-5, rtol=0)   # batched matmuls round differently
        assert x.voiced == y.voiced


def test_pop_many_equals_separate_pops_with_one_call():
    a2l = CountingA2L()
    streams = _streams(3)
    batched = [StreamingLipSync(a2l, LipSyncConfig(cut_to_frames=False)) for _ in streams]
    alone = [StreamingLipSync(a2l, LipSyncConfig(cut_to_frames=False)) for _ in streams]
    rng = np.random.default_rng(1)
    pos = [0, 0, 0]
    out_b = [[], [], []]
    out_a = [[], [], []]
    while min(pos) < len(streams[0]):
        for k, wav in enumerate(streams):
            n = int(rng.integers(0, 1500))
            chunk = wav[pos[k]:pos[k] + n]
            pos[k] += n
            batched[k].push(chunk)
            alone[k].push(chunk)
            out_a[k] += alone[k].pop()
        before = a2l.calls
        results = pop_many(batched, a2l)
        assert a2l.calls - before <= 1, "one Audio2Lip call for all sessions"
        for k in range(3):
            out_b[k] += results[k]
    for k in range(3):
        assert len(out_a[k]) > 40
        _frames_equal(out_b[k], out_a[k])


def test_failed_call_changes_nothing():
    a2l = CountingA2L()
    lips = StreamingLipSync(a2l, LipSyncConfig(cut_to_frames=False))
    ref = StreamingLipSync(a2l, LipSyncConfig(cut_to_frames=False))
    wav = _streams(1)[0]
    lips.push(wav)
    ref.push(wav)
    a2l.fail = True
    with pytest.raises(RuntimeError, match="device lost"):
        pop_many([lips], a2l)
    a2l.fail = False
    _frames_equal(pop_many([lips], a2l)[0], ref.pop())


def test_batcher_gathers_sessions_that_tick_together():
    a2l = CountingA2L()
    streams = _streams(4, seconds=1.0)

    async def main():
        async def run(fn, *args):                 # stands in for FrameScheduler.run (a worker thread)
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

        batcher = LipBatcher(a2l, run=run)
        lips = [StreamingLipSync(a2l, LipSyncConfig(cut_to_frames=False)) for _ in streams]
        got = [[] for _ in streams]

        async def session(k):
            for start in range(0, len(streams[k]), 320):
                lips[k].push(streams[k][start:start + 320])
                if lips[k].ready():
                    got[k] += await batcher.pop(lips[k])
                await asyncio.sleep(0)

        await asyncio.gather(*(session(k) for k in range(len(streams))))
        await batcher.close()
        return got, batcher

    got, batcher = asyncio.run(main())
    for k, wav in enumerate(streams):
        ref = StreamingLipSync(CountingA2L(), LipSyncConfig(cut_to_frames=False))
        frames = []
        for start in range(0, len(wav), 320):
            ref.push(wav[start:start + 320])
            frames += ref.pop()
        _frames_equal(got[k], frames)
    assert batcher.pops > batcher.calls, "pops of several sessions were not merged"


def test_members_out_of_phase_share_every_call_and_nobody_waits_longer_than_hold():
    """Two sessions whose frames become final 15 ms apart (in a 40 ms period): each gathering waits for
    the other member, so every Audio2Lip call serves both; no pop waits longer than ``hold``; a member
    that stops asking holds the other back at most ``hold``, and none once it leaves."""
    a2l = CountingA2L()
    hold = 0.02
    streams = _streams(2, seconds=1.2)

    async def main():
        async def run(fn, *args):
            return fn(*args)

        batcher = LipBatcher(a2l, run=run, hold=hold)
        lips = [StreamingLipSync(a2l, LipSyncConfig(cut_to_frames=False)) for _ in streams]
        for x in lips:
            batcher.join(x)
        waits: list[float] = []
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def session(k, phase):
            for i, start in enumerate(range(0, len(streams[k]), 640)):
                await asyncio.sleep(max(0.0, t0 + phase + 0.04 * i - loop.time()))
                lips[k].push(streams[k][start:start + 640])
                if lips[k].ready():
                    asked = loop.time()
                    await batcher.pop(lips[k])
                    waits.append(loop.time() - asked)

        await asyncio.gather(session(0, 0.0), session(1, 0.015))
        shared = (batcher.calls, batcher.pops)
        # one member stops asking: the other's pop is held at most `hold`, then not at all once it left
        lips[0].push(streams[0][:640 * 8])
        asked = loop.time()
        await batcher.pop(lips[0])
        held = loop.time() - asked
        batcher.leave(lips[1])
        lips[0].push(streams[0][:640 * 2])
        asked = loop.time()
        await batcher.pop(lips[0])
        alone = loop.time() - asked
        await batcher.close()
        return shared, waits, held, alone

    (calls, pops), waits, held, alone = asyncio.run(main())
    assert pops >= 40
    assert calls <= pops / 2 + 2, f"{calls} Audio2Lip calls for {pops} pops: the members were not held together"
    assert max(waits) < hold + 0.015, f"a pop waited {max(waits) * 1000:.0f} ms (hold {hold * 1000:.0f} ms)"
    assert hold * 0.9 <= held < hold + 0.015
    assert alone < hold / 2
