"""One Audio2Lip call for the mouths of all sessions.

Each session's :class:`~edtalk_live.avatar.lipsync.StreamingLipSync` makes one ``audio_to_lip`` call per
``pop``. With many sessions those small calls (one or two mel windows each) dominate the render
thread. :func:`pop_many` pops several lip syncs with a single ``audio_to_lip`` call: each pop is begun
(:meth:`~edtalk_live.avatar.lipsync.StreamingLipSync.begin_pop`: the windows it needs, nothing changed
yet), one batched call computes every window, and each pop completes with its rows. The result is
what separate ``pop`` calls give, up to the float rounding of one batched call instead of several.
:class:`LipBatcher` gathers the pops of all sessions that tick together and runs them as one
:func:`pop_many` on the render thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import torch

from edtalk_live.avatar.lipsync import LipFrame, StreamingLipSync

logger = logging.getLogger(__name__)


def pop_many(items: Sequence[StreamingLipSync],
             audio_to_lip: Callable[[torch.Tensor], torch.Tensor]) -> list[list[LipFrame]]:
    """``[lips.pop() for lips in items]`` with one ``audio_to_lip`` call for all of them (same results, up to
    float rounding of the batched call). When the call fails, no lip sync has changed."""
    pending = [lips.begin_pop() for lips in items]
    windows = [p.windows for p in pending if p is not None and p.windows is not None]
    raw = None
    if windows:
        with torch.inference_mode():
            raw = audio_to_lip(torch.cat(windows))
        raw = torch.as_tensor(raw).detach().to("cpu", torch.float32)
    results: list[list[LipFrame]] = []
    start = 0
    for p in pending:
        if p is None:
            results.append([])
        elif p.windows is None:
            results.append(p.complete(None))
        else:
            n = p.windows.shape[0]
            results.append(p.complete(raw[start:start + n]))
            start += n
    return results


class LipBatcher:
    """Gathers the lip-sync pops of sessions that tick together and runs them as one :func:`pop_many`.

    ``run(fn, *args)`` executes on the render thread (e.g. ``FrameScheduler.run``); ``window`` is
    how long the first request waits for others (sessions tick on a shared 20 ms grid, so the others
    arrive within a millisecond or two).
    """

    def __init__(self, audio_to_lip: Callable[[torch.Tensor], torch.Tensor],
                 run: Callable[..., object], window: float = 0.003):
        self.audio_to_lip = audio_to_lip
        self._run = run
        self.window = window
        self._pending: list[tuple[StreamingLipSync, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self.calls = 0
        self.pops = 0

    async def pop(self, lips: StreamingLipSync) -> list[LipFrame]:
        """``lips.pop()``, computed together with the pops of the other sessions that tick now."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((lips, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="lip-batcher")
        return await future

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(self.window)
            batch, self._pending = self._pending, []
            live = [(lips, f) for lips, f in batch if not f.done()]
            if not live:
                continue
            try:
                results = await self._run(pop_many, [lips for lips, _ in live], self.audio_to_lip)
            except asyncio.CancelledError:
                for _, f in live:
                    f.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - every waiting session learns about it
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.calls += 1
            self.pops += len(live)
            for (_, f), frames in zip(live, results, strict=True):
                if not f.done():
                    f.set_result(frames)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        for _, f in self._pending:
            f.cancel()
        self._pending.clear()
