"""One Audio2Lip call for the mouths of all sessions.

Each session's :class:`~edtalk_live.avatar.lipsync.StreamingLipSync` makes one ``audio_to_lip`` call per
``pop``. With many sessions those small calls (one or two mel windows each) dominate the render
thread. :func:`pop_many` pops several lip syncs with a single ``audio_to_lip`` call: each pop is begun
(:meth:`~edtalk_live.avatar.lipsync.StreamingLipSync.begin_pop`: the windows it needs, nothing changed
yet), one batched call computes every window, and each pop completes with its rows. The result is
what separate ``pop`` calls give, up to the float rounding of one batched call instead of several.
:class:`LipBatcher` gathers the pops of the sessions and runs them as one :func:`pop_many` on the
render thread: a pop waits (at most ``hold``) until every session that takes part has asked, so sessions
whose frames become final at different moments of the 40 ms frame period still share one call.

Why wait: on a CPU a network's first call after a pause costs about a third more than the next one
(its weights left the caches meanwhile), and two windows in one call cost less than two calls. With
sessions popping at their own phase, two sessions made two Audio2Lip calls and two decoder batches per
frame; held together they make one of each.
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
    """Gathers the lip-sync pops of the sessions and runs them as one :func:`pop_many`.

    ``run(fn, *args)`` executes on the render thread (e.g. ``FrameScheduler.run``). Sessions that take
    part :meth:`join` (and :meth:`leave` at their end); a pop is computed once every member has asked,
    or ``hold`` seconds after the oldest waiting pop, whichever comes first (each member pops once a
    frame, so with two sessions whose frames become final up to ``hold`` apart every call serves both).
    Pops of lip syncs that did not join wait for the members too. ``hold=0`` computes each gathering at
    once (the pops that asked in the same event-loop turn).
    """

    def __init__(self, audio_to_lip: Callable[[torch.Tensor], torch.Tensor],
                 run: Callable[..., object], hold: float = 0.02):
        if not hold >= 0:
            raise ValueError(f"hold must be >= 0 seconds, got {hold}")
        self.audio_to_lip = audio_to_lip
        self._run = run
        self.hold = hold
        self._members: set[int] = set()
        self._pending: list[tuple[StreamingLipSync, asyncio.Future]] = []
        self._asked = asyncio.Event()
        self._flusher: asyncio.Task | None = None
        self.calls = 0
        self.pops = 0

    def join(self, lips: StreamingLipSync) -> None:
        """``lips`` pops once a frame from now on: gatherings wait for it (at most ``hold``)."""
        self._members.add(id(lips))

    def leave(self, lips: StreamingLipSync) -> None:
        self._members.discard(id(lips))
        self._asked.set()                       # the others may be complete without it

    def _complete(self) -> bool:
        asked = {id(lips) for lips, _ in self._pending}
        return self._members <= asked

    async def pop(self, lips: StreamingLipSync) -> list[LipFrame]:
        """``lips.pop()``, computed together with the pops of the other sessions (see the class)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((lips, future))
        self._asked.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="lip-batcher")
        return await future

    async def _gather(self) -> None:
        """Until every member has asked, or ``hold`` after the first pop waiting now."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.hold
        while not self._complete() and (left := until - loop.time()) > 0:
            self._asked.clear()
            try:
                async with asyncio.timeout(left):
                    await self._asked.wait()
            except TimeoutError:
                return

    async def _flush(self) -> None:
        while self._pending:
            await self._gather()
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
