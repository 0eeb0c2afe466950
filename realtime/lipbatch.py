"""One Audio2Lip call for the mouths of all sessions.

Each session's :class:`~edtalk_live.avatar.lipsync.StreamingLipSync` makes one ``audio_to_lip`` call per
``pop``. With many sessions those small calls (one or two mel windows each) dominate the render
thread. :func:`pop_many` pops several lip-syncs with a single ``audio_to_lip`` call, in two passes:
the first pass runs every ``pop`` until it asks for coefficients and records its windows (nothing
in a lip-sync changes before that call), one batched call computes them all, and the second pass
runs the same ``pop``\\ s again, answering each with its rows. The result is what separate ``pop``
calls give, up to the float rounding of one batched call instead of several. :class:`LipBatcher`
gathers the pops of all sessions that tick together and runs them as one :func:`pop_many` on the
render thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import torch

from edtalk_live.avatar.lipsync import LipFrame, StreamingLipSync

logger = logging.getLogger(__name__)


class _Deferred(Exception):
    """Raised by a recording ``audio_to_lip`` to stop a ``pop`` before it changes any state."""


class SessionAudioToLip:
    """The ``audio_to_lip`` of one session's lip-sync: direct, or recording/replaying inside :func:`pop_many`."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.mode = "direct"
        self.windows: torch.Tensor | None = None
        self.result: torch.Tensor | None = None

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        if self.mode == "record":
            self.windows = windows
            raise _Deferred
        if self.mode == "replay":
            out, self.result = self.result, None
            if out is None or out.shape[0] != windows.shape[0]:
                raise RuntimeError("lip-sync asked for other windows than it recorded")
            return out
        return self.fn(windows)


def pop_many(items: Sequence[tuple[StreamingLipSync, SessionAudioToLip]],
             audio_to_lip: Callable[[torch.Tensor], torch.Tensor]) -> list[list[LipFrame]]:
    """``[lips.pop() for lips in items]`` with one ``audio_to_lip`` call for all of them (same results, up to
    float rounding of the batched call)."""
    results: list[list[LipFrame]] = [[] for _ in items]
    pending: list[int] = []
    try:
        for k, (lips, hook) in enumerate(items):
            hook.mode, hook.windows = "record", None
            try:
                results[k] = lips.pop()                  # nothing new: returned without asking
            except _Deferred:
                pending.append(k)
        if not pending:
            return results
        windows = [items[k][1].windows for k in pending]
        raw = audio_to_lip(torch.cat(windows))
        raw = torch.as_tensor(raw).detach().to("cpu", torch.float32)
        start = 0
        for k, w in zip(pending, windows, strict=True):
            lips, hook = items[k]
            hook.mode, hook.result = "replay", raw[start:start + w.shape[0]]
            start += w.shape[0]
            results[k] = lips.pop()
        return results
    finally:
        for _, hook in items:
            hook.mode, hook.windows, hook.result = "direct", None, None


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
        self._pending: list[tuple[StreamingLipSync, SessionAudioToLip, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self.calls = 0
        self.pops = 0

    def hook(self) -> SessionAudioToLip:
        """The ``audio_to_lip`` to give a session's :class:`StreamingLipSync`."""
        return SessionAudioToLip(self.audio_to_lip)

    async def pop(self, lips: StreamingLipSync, hook: SessionAudioToLip) -> list[LipFrame]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((lips, hook, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="lip-batcher")
        return await future

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(self.window)
            batch, self._pending = self._pending, []
            live = [(lips, hook, f) for lips, hook, f in batch if not f.done()]
            if not live:
                continue
            try:
                results = await self._run(pop_many, [(lips, hook) for lips, hook, _ in live], self.audio_to_lip)
            except asyncio.CancelledError:
                for _, _, f in live:
                    f.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - every waiting session learns about it
                for _, _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.calls += 1
            self.pops += len(live)
            for (_, _, f), frames in zip(live, results, strict=True):
                if not f.done():
                    f.set_result(frames)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        for _, _, f in self._pending:
            f.cancel()
        self._pending.clear()
