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
