"""The render budget, measured: how long after its audio is complete a frame is ready to leave.

A session's output delay is the lip-sync look-ahead plus a render budget. The budget has to cover,
for every frame, the wait for the producer's next tick, the lip-sync pop, the queue and the batch on
the render thread, and the silence that replaces audio not yet arrived (``jitter_margin``); all of
that depends on the device, the model and the load. So it is not a constant: every rendered frame
reports its *lag* (the moment it was ready, minus the moment its audio window was complete on the
session clock), and a new session takes a high percentile of the recent lags of all sessions, with a
margin. A fixed budget applies until enough frames were seen, and the budget never goes below what
the silence fill needs.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

__all__ = ["RenderBudget"]


class RenderBudget:
    """A server-wide estimate of the render budget (seconds) from the lags of recent frames, per load.

    Lags are kept per load (the number of live sessions when the frame was rendered), the last
    ``window`` of each. A session starting at load ``n`` gets ``quantile`` of the lags seen at load
    ``n`` or more, times ``margin`` plus ``slack``, bounded to ``[floor, ceiling]``; while fewer than
    ``warmup`` such frames were seen (a load the server has not run at yet), ``initial``. So a budget
    measured with one session is never given to the second one. Thread-safe.
    """

    def __init__(self, initial: float = 0.1, floor: float = 0.03, ceiling: float = 1.0, window: int = 1000,
                 warmup: int = 100, quantile: float = 99.0, margin: float = 1.1, slack: float = 0.01):
        if not 0 < floor <= ceiling:
            raise ValueError(f"need 0 < floor <= ceiling, got {floor}, {ceiling}")
        self.initial = float(initial)
        self.floor = float(floor)
        self.ceiling = float(ceiling)
        self.window = int(window)
        self.warmup = int(warmup)
        self.quantile = float(quantile)
        self.margin = float(margin)
        self.slack = float(slack)
        self._lags: dict[int, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def report(self, lag: float, load: int = 1) -> None:
        """One frame was ready ``lag`` seconds after its audio was complete, with ``load`` sessions live."""
        with self._lock:
            self._lags.setdefault(max(int(load), 1), collections.deque(maxlen=self.window)).append(float(lag))

    def _at(self, load: int) -> np.ndarray:
        with self._lock:
            return np.concatenate([np.asarray(d) for n, d in self._lags.items() if n >= load] or [np.zeros(0)])

    def measured(self, load: int = 1) -> bool:
        """True once enough frames were seen at ``load`` sessions or more for the budget to come from them."""
        return len(self._at(load)) >= self.warmup

    def current(self, load: int = 1) -> float:
        """The budget of a session that makes the load ``load`` sessions (seconds)."""
        lags = self._at(load)
        if len(lags) < self.warmup:
            return min(max(self.initial, self.floor), self.ceiling)
        return self.estimate(float(np.percentile(lags, self.quantile)))

    def estimate(self, lag: float) -> float:
        """The budget for frames that take ``lag`` seconds: with the margin and the slack, within the bounds."""
        return min(max(lag * self.margin + self.slack, self.floor), self.ceiling)
