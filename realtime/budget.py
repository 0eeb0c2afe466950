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
    """A server-wide estimate of the render budget (seconds) from the lags of recent frames.

    ``initial`` applies until ``warmup`` frames were reported; then the budget is
    ``quantile`` of the last ``window`` lags times ``margin`` plus ``slack``, bounded to
    ``[floor, ceiling]``. Thread-safe (frames report from the event loop; readers may be anywhere).
    """

    def __init__(self, initial: float = 0.1, floor: float = 0.03, ceiling: float = 1.0, window: int = 1000,
                 warmup: int = 100, quantile: float = 99.0, margin: float = 1.2, slack: float = 0.01):
        if not 0 < floor <= ceiling:
            raise ValueError(f"need 0 < floor <= ceiling, got {floor}, {ceiling}")
        self.initial = float(initial)
        self.floor = float(floor)
        self.ceiling = float(ceiling)
        self.warmup = int(warmup)
        self.quantile = float(quantile)
        self.margin = float(margin)
        self.slack = float(slack)
        self._lags: collections.deque[float] = collections.deque(maxlen=window)
        self._seen = 0
        self._lock = threading.Lock()

    def report(self, lag: float) -> None:
        """One frame was ready ``lag`` seconds after its audio was complete."""
        with self._lock:
            self._lags.append(float(lag))
            self._seen += 1

    @property
    def measured(self) -> bool:
        """True once enough frames were seen for the budget to come from them."""
        return self._seen >= self.warmup

    def lag_quantile(self, q: float | None = None) -> float | None:
        with self._lock:
            lags = np.asarray(self._lags)
        return float(np.percentile(lags, self.quantile if q is None else q)) if len(lags) else None

    def current(self) -> float:
        """The budget a session starting now gets (seconds)."""
        if not self.measured:
            return min(max(self.initial, self.floor), self.ceiling)
        lag = self.lag_quantile()
        return min(max(lag * self.margin + self.slack, self.floor), self.ceiling)
