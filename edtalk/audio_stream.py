"""Incremental mel spectrogram: ``melspectrogram`` of :mod:`edtalk_live.edtalk.audio`, computed as audio arrives.

:class:`StreamingMel` keeps the pre-emphasis state across chunks and computes only the new STFT frames
(mel frame ``j`` is centred at sample ``200 j`` and reads samples ``[200 j - 400, 200 j + 400)``; the first
two read the reflect padding of the beginning). It holds a bounded ring of raw samples (what future STFT
frames, or a finish at the end padding, still need) and a ring of mel frames the owner trims. The frames
are those of the offline spectrogram within float rounding, whatever the chunking; each also carries the
RMS level of the raw audio under it (for a silence gate).

The streaming lip sync of the server (:mod:`edtalk_live.avatar.lipsync`) is built on it.

Not thread-safe: call ``push``/``finish``/``release_frames``/``reset`` of one instance from one thread at a time.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import torch

from edtalk_live.edtalk.audio import (
    DEFAULT_MEL_CONFIG,
    MelConfig,
    _hann_window,  # the exact window of melspectrogram (bit-identical STFT frames)
    mel_filterbank,
)
from edtalk_live.edtalk.errors import InputError

__all__ = ["StreamingMel"]

_SILENT_DB: Final[float] = -200.0
"""Level reported for digital silence (RMS 0)."""
_BLOCK_FRAMES: Final[int] = 4096
"""STFT frames computed at once (bounds the temporary memory of a large push to about 50 MB)."""


def _as_samples(samples: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate one chunk of mono float audio ``[L]`` (L >= 0); returns it as float64 NumPy."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    if not isinstance(samples, np.ndarray):
        raise InputError(f"audio chunk must be a 1-D float NumPy array, got {type(samples).__name__}")
    if samples.ndim != 1:
        raise InputError(f"audio chunk must be 1-D mono samples, got shape {tuple(samples.shape)}")
    if not np.issubdtype(samples.dtype, np.floating):
        raise InputError(
            f"audio chunk must be floating point in [-1, 1], got dtype {samples.dtype} (divide int16 PCM by 32768)"
        )
    x = samples.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise InputError("audio chunk contains NaN or infinite samples")
    return x


# --------------------------------------------------------------------------------------------------
# Incremental mel spectrogram
# --------------------------------------------------------------------------------------------------


class StreamingMel:
    """Incremental ``edtalk.audio.melspectrogram`` with a per-STFT-frame loudness.

    Mel frame ``j`` (0-based) is the STFT frame centred at sample ``hop * j``; it is computed as soon as
    ``hop * j + n_fft // 2`` samples have arrived (its support ``[hop j - n_fft/2, hop j + n_fft/2)``, the
    part before sample 0 read from the reflect padding of the beginning, so frame 0 also needs sample
    ``n_fft // 2``). Frames whose support would cross
    the end of the stream are only computed by :meth:`finish`, with the reflect padding of the end.

    Args:
        config: the spectrogram parameters (the defaults are the trained ones).
        end_granularity: the stream may be finished at any multiple of this many samples (640 when the
            owner cuts the audio to whole video frames, 1 for any length); the raw-sample ring keeps what
            a :meth:`finish` at any such end not before the last complete multiple still needs.

    Memory: the raw-sample ring holds at most about ``n_fft + end_granularity + chunk`` samples; the mel ring
    holds frames from :attr:`first_frame` on, which the owner advances with :meth:`release_frames`.
    """

    def __init__(self, config: MelConfig = DEFAULT_MEL_CONFIG, end_granularity: int = 1) -> None:
        if end_granularity < 1:
            raise InputError(f"end_granularity must be >= 1, got {end_granularity}")
        self.config = config
        self.end_granularity = int(end_granularity)
        self._window = _hann_window(config.win_length, config.n_fft)
        # The projection runs in torch (float64), not NumPy: alternating OpenBLAS and torch's OpenMP pools on
        # a small CPU makes both spin against each other (8x slower measured on 2 cores); the server calls torch.
        self._basis_t = torch.from_numpy(mel_filterbank(config).astype(np.float64).T.copy())  # [n_fft//2+1, n_mels]
        self._pad = config.n_fft // 2
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next sample pushed is sample 0 of a new stream."""
        self._num_samples = 0  # samples pushed
        self._prev_x: float | None = None  # last raw sample (pre-emphasis state)
        self._s0 = 0  # absolute index of the first sample in the rings
        self._x = np.zeros(0, np.float64)  # raw samples [s0, num_samples)
        self._y = np.zeros(0, np.float64)  # pre-emphasised samples [s0, num_samples)
        self._f0 = 0  # first mel frame held
        self._mel = np.zeros((0, self.config.n_mels), np.float32)  # mel frames [f0, f0 + len)
        self._level = np.zeros(0, np.float64)  # RMS level (dBFS) of the raw samples under each STFT frame
        self._finished_at: int | None = None

    # ------------------------------------------------------------ state
    @property
    def num_samples(self) -> int:
        """Samples pushed since the last reset."""
        return self._num_samples

    @property
    def num_frames(self) -> int:
        """Mel frames computed so far (all of them, including those already released)."""
        return self._f0 + self._mel.shape[0]

    @property
    def first_frame(self) -> int:
        """Index of the oldest mel frame still held."""
        return self._f0

    @property
    def finished(self) -> bool:
        return self._finished_at is not None

    @property
    def buffered_samples(self) -> int:
        """Raw samples held in the ring (bounded)."""
        return self._x.size

    @property
    def buffered_frames(self) -> int:
        """Mel frames held in the ring."""
        return self._mel.shape[0]

    def mel(self, j0: int, j1: int) -> np.ndarray:
        """Mel frames ``j0 .. j1 - 1`` (held ones only): float32 ``[j1 - j0, n_mels]``, a view."""
        self._check_held(j0, j1)
        return self._mel[j0 - self._f0 : j1 - self._f0]

    def level_db(self, j0: int, j1: int) -> np.ndarray:
        """RMS level in dBFS (RMS 1.0 = 0 dB; -200 for digital silence) under STFT frames ``j0 .. j1 - 1``."""
        self._check_held(j0, j1)
        return self._level[j0 - self._f0 : j1 - self._f0]

    def gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mel frames and levels at absolute frame indices ``idx`` (any shape, all held): ``[..., n_mels], [...]``."""
        rel = np.asarray(idx, dtype=np.int64) - self._f0
        if rel.size and (rel.min() < 0 or rel.max() >= self._mel.shape[0]):
            raise IndexError(f"mel frames {int(rel.min()) + self._f0}..{int(rel.max()) + self._f0} not all held "
                             f"(held {self._f0}..{self.num_frames - 1})")
        return self._mel[rel], self._level[rel]

    def _check_held(self, j0: int, j1: int) -> None:
        if not self._f0 <= j0 <= j1 <= self.num_frames:
            raise IndexError(f"mel frames {j0}..{j1 - 1} not all held (held {self._f0}..{self.num_frames - 1})")

    # ------------------------------------------------------------ streaming
    def push(self, samples: np.ndarray | torch.Tensor) -> int:
        """Append mono float samples ``[L]`` (any L >= 0) at ``config.sample_rate``; returns new mel frames."""
        if self._finished_at is not None:
            raise InputError("push after finish(): reset() the StreamingMel first")
        x = _as_samples(samples)
        if x.size == 0:
            return 0
        # Pre-emphasis y[n] = x[n] - k x[n-1] (y[0] = x[0]), continued across chunks with the same arithmetic.
        y = np.empty_like(x)
        if self._prev_x is None:
            y[0] = x[0]
        else:
            y[0] = x[0] - self.config.preemphasis * self._prev_x
        np.subtract(x[1:], self.config.preemphasis * x[:-1], out=y[1:])
        self._prev_x = float(x[-1])
        self._x = np.concatenate([self._x, x])
        self._y = np.concatenate([self._y, y])
        self._num_samples += x.size

        # Frames whose support ends inside what we have: hop * j + pad <= num_samples (frame 0 reads the
        # reflection of sample pad, so it needs pad + 1 samples).
        n = self._num_samples
        available = (n - self._pad) // self.config.hop_length + 1 if n > self._pad else 0
        new = available - self.num_frames
        if new > 0:
            self._append(*self._compute(self.num_frames, available, end=None))
        self._trim_samples()
        return max(new, 0)

    def finish(self, end: int) -> int:
        """End the stream after ``end`` samples, with the reflect padding of the end, as the centred STFT does.

        Mel frames whose support crosses ``end`` are (re)computed from ``samples[:end]`` and the held frames
        are cut to ``end // hop + 1`` (the frame count of ``melspectrogram`` on ``end`` samples). ``end`` must
        lie between the last complete multiple of ``end_granularity`` and :attr:`num_samples`, and be at least
        ``n_fft // 2 + 1`` (the reflect padding of both ends must fit). Returns the total frame count.
        """
        lowest = self._lowest_end()
        if not (max(lowest, self._pad + 1) <= end <= self._num_samples):
            raise InputError(
                f"finish(end={end}): end must be in [{max(lowest, self._pad + 1)}, {self._num_samples}] samples"
            )
        total = end // self.config.hop_length + 1
        # first frame whose support crosses the end: hop * j + pad > end
        first_crossing = max((end - self._pad) // self.config.hop_length + 1, 0)
        j0 = max(first_crossing, self._f0)
        keep = max(j0 - self._f0, 0)
        self._mel = self._mel[:keep]
        self._level = self._level[:keep]
        if total > j0:
            self._append(*self._compute(j0, total, end=end))
        self._finished_at = end
        return total

    def release_frames(self, before: int) -> None:
        """Drop the mel frames before ``before`` (they will not be asked for again)."""
        drop = min(max(before - self._f0, 0), self._mel.shape[0])
        if drop:
            self._mel = self._mel[drop:].copy()
            self._level = self._level[drop:].copy()
            self._f0 += drop

    # ------------------------------------------------------------ internals
    def _lowest_end(self) -> int:
        g = self.end_granularity
        return (self._num_samples // g) * g

    def _trim_samples(self) -> None:
        """Keep only the samples the next STFT frame or a finish at any allowed end can still read."""
        next_start = self.config.hop_length * self.num_frames - self._pad
        keep_from = max(0, min(next_start, self._lowest_end() - self.config.n_fft))
        drop = keep_from - self._s0
        if drop > 0:
            self._x = self._x[drop:].copy()
            self._y = self._y[drop:].copy()
            self._s0 = keep_from

    def _append(self, mel: np.ndarray, level: np.ndarray) -> None:
        self._mel = np.concatenate([self._mel, mel])
        self._level = np.concatenate([self._level, level])

    def _compute(self, j0: int, j1: int, end: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Mel ``[j1-j0, n_mels]`` float32 and level ``[j1-j0]`` dBFS of frames ``j0..j1-1``; ``end``: reflect there."""
        cfg = self.config
        mels, levels = [], []
        offsets = np.arange(cfg.n_fft, dtype=np.int64) - self._pad
        for b0 in range(j0, j1, _BLOCK_FRAMES):
            b1 = min(b0 + _BLOCK_FRAMES, j1)
            idx = cfg.hop_length * np.arange(b0, b1, dtype=np.int64)[:, None] + offsets[None, :]
            idx = np.abs(idx)  # reflect padding of the beginning: y[-n] -> y[n]
            if end is not None:
                idx = np.where(idx >= end, 2 * (end - 1) - idx, idx)  # reflect padding of the end
            rel = idx - self._s0
            assert rel.min() >= 0 and rel.max() < self._x.size, "sample ring trimmed too far"
            frames = self._y[rel] * self._window
            magnitude = np.abs(np.fft.rfft(frames, n=cfg.n_fft, axis=-1))
            mels.append(self._normalise((torch.from_numpy(magnitude) @ self._basis_t).numpy()))
            rms = np.sqrt(np.mean(np.square(self._x[rel]), axis=1))
            with np.errstate(divide="ignore"):
                levels.append(np.where(rms > 0, 20.0 * np.log10(rms), _SILENT_DB))
        if not mels:
            return np.zeros((0, cfg.n_mels), np.float32), np.zeros(0, np.float64)
        return np.concatenate(mels), np.concatenate(levels)

    def _normalise(self, mel: np.ndarray) -> np.ndarray:
        """Linear mel magnitudes -> normalised log-mel float32, the same arithmetic as ``melspectrogram``."""
        cfg = self.config
        min_level = np.exp(cfg.min_level_db / 20.0 * np.log(10))
        db = 20.0 * np.log10(np.maximum(min_level, mel)) - cfg.ref_level_db
        m = cfg.max_abs_value
        normed = (2.0 * m) * ((db - cfg.min_level_db) / (-cfg.min_level_db)) - m
        return np.clip(normed, -m, m).astype(np.float32)
