"""Streaming Audio-to-Motion: 16 kHz mono audio in, one mouth-coefficient vector per 40 ms video frame out.

The front end of the real-time server. It computes exactly what the offline renderer computes
(``edtalk_live.avatar.speech.lips_for_audio``)::

    smooth(audio_to_lip(mel_windows(melspectrogram(wav), T)))      # wav cut to T whole frames of 640 samples

but incrementally, as audio arrives in chunks of any size:

- :class:`StreamingMel` keeps the pre-emphasis state across chunks and computes only the new STFT frames
  (mel frame ``j`` is centred at sample ``200 j`` and reads samples ``[200 j - 400, 200 j + 400)``; the first
  two read the reflect padding of the beginning). It holds a bounded ring of raw samples (what future STFT
  frames, or a finish at the end padding, still need) and a ring of mel frames the owner trims.
- :class:`StreamingLipSync` gathers the 16-frame window of each video frame as soon as the window is
  final, runs ``audio_to_lip`` once per :meth:`~StreamingLipSync.pop` on all new windows, applies the
  3-tap smoothing incrementally (frame ``i`` is final once frame ``i + 1``'s raw coefficients exist) and
  a silence gate that pulls the mouth to a resting pose when there is no voice.

Latency (computed from the constants, see :attr:`StreamingLipSync.latency_samples`):

- default (``lookahead="offline"``, ``cut_to_frames=True``): 3200 samples = 200 ms after a frame's start.
  The window of frame ``i + 1`` (needed by the smoothing) ends at most 2800 samples (175 ms) after frame
  ``i``'s start; because the offline renderer cuts the audio to whole frames, a window is only final once
  the whole 640-sample frame containing its end has arrived (otherwise the stream could still end before
  it and the offline result would use the end's reflect padding instead), which rounds this up to 200 ms.
- ``cut_to_frames=False``: 2800 samples = 175 ms (2760 after the first frame); identical to the offline
  renderer for streams that are a whole number of frames long, otherwise to the offline functions on the
  uncut audio (``mel_windows(melspectrogram(wav), len(wav) // 640)``).
- ``lookahead="low"``: 640 samples = 40 ms, a trade of quality for latency: the window of frame ``i``
  ends at the end of frame ``i`` (no future context; the mouth follows the sound about 110 ms late) and the
  smoothing is the causal 2-tap mean of the previous and current frame.

Not thread-safe: call ``push``/``pop``/``flush``/``reset`` of one instance from one thread at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from edtalk_live.edtalk.audio import (
    DEFAULT_MEL_CONFIG,
    MEL_STEP,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    gaussian_kernel,
    smooth,
    window_start,
    window_starts,
)
from edtalk_live.edtalk.audio_stream import StreamingMel
from edtalk_live.edtalk.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["LipFrame", "LipSyncConfig", "PendingPop", "StreamingLipSync"]


@dataclass(frozen=True)
class LipSyncConfig:
    """Options of :class:`StreamingLipSync`.

    Attributes:
        lookahead: ``"offline"`` (default): the offline renderer's centred 16-frame window and 3-tap
            Gaussian smoothing, identical results, 200 ms latency. ``"low"``: the window ends at the end
            of the frame and the smoothing is the causal mean of the previous and current frame: 40 ms
            latency, the mouth follows the sound about 110 ms late and is less accurate.
        cut_to_frames: the end of a stream is cut to whole 640-sample frames as the offline renderer does
            (exact parity for any length; a window is final only once the whole frame containing its end
            has arrived, +25 ms). False: no cut, parity for whole-frame streams only, 175 ms.
        silence_db: silence gate threshold in dBFS (RMS of the raw audio, RMS 1.0 = 0 dBFS): a frame whose
            window's loudest STFT frame is below it is unvoiced and its mouth goes to ``rest_lip``.
            ``None`` or 0 disables the gate.
        silence_ramp_db: width of the soft ramp below the threshold: at ``silence_db - silence_ramp_db`` and
            below the mouth is fully at rest, in between it is blended linearly in dB.
    """

    lookahead: Literal["offline", "low"] = "offline"
    cut_to_frames: bool = True
    silence_db: float | None = -50.0
    silence_ramp_db: float = 6.0

    def __post_init__(self) -> None:
        if self.lookahead not in ("offline", "low"):
            raise InputError(f"lookahead must be 'offline' or 'low', got {self.lookahead!r}")
        if self.silence_db is not None and not (math.isfinite(self.silence_db) and self.silence_db <= 0):
            raise InputError(f"silence_db must be a level <= 0 dBFS or None, got {self.silence_db}")
        if not (math.isfinite(self.silence_ramp_db) and self.silence_ramp_db > 0):
            raise InputError(f"silence_ramp_db must be positive, got {self.silence_ramp_db}")

    @property
    def gate_enabled(self) -> bool:
        return bool(self.silence_db)


@dataclass(frozen=True, eq=False)
class LipFrame:
    """One video frame's mouth.

    Attributes:
        index: video frame number (25 fps), increasing across :meth:`StreamingLipSync.reset`.
        lip: mouth coefficients float32 ``[lip_dim]`` (20), CPU, smoothed and gated.
        sample_start: audio time of the frame's start in 16 kHz samples, ``640 * index``.
        voiced: the frame's window is above the silence threshold (always True with the gate off).
    """

    index: int
    lip: torch.Tensor
    sample_start: int
    voiced: bool

    @property
    def time_s(self) -> float:
        """Start of the frame in seconds."""
        return self.sample_start / SAMPLE_RATE


@dataclass(frozen=True, eq=False)
class PendingPop:
    """A :meth:`StreamingLipSync.begin_pop`: ``windows`` mel windows ``[n,1,80,16]`` whose Audio2Lip output
    ``complete`` takes (``None`` when the frames need none), returning the frames."""

    windows: torch.Tensor | None
    complete: Callable[[torch.Tensor | np.ndarray | None], list[LipFrame]]


class StreamingLipSync:
    """Streaming ``smooth(audio_to_lip(mel_windows(melspectrogram(wav), T)))`` with a silence gate.

    Usage::

        lips = StreamingLipSync(renderer.audio_to_lip)
        lips.push(chunk)              # float32 [L] 16 kHz mono, any L
        for f in lips.pop():          # every frame now final, in order, each index once
            show(f.index, f.lip)
        ...
        tail = lips.flush()           # end of stream: the remaining frames, offline end semantics

    Args:
        audio_to_lip: mel windows ``[B,1,80,16]`` float32 -> raw mouth coefficients ``[B,lip_dim]`` (e.g.
            ``Renderer.audio_to_lip`` or ``EDTalkModel.audio_to_lip``); called at most once per ``pop``/``flush``.
        config: options (lookahead, end cut, silence gate).
        rest_lip: resting (closed) mouth coefficients ``[lip_dim]``; zeros by default, i.e. the mouth of the
            source image (``latent = wa``); pass the coefficients read from a closed-mouth frame if it is open.

    For a finite stream the concatenation of every ``pop()`` and the final ``flush()`` equals the offline
    result on the stream cut to whole frames within float rounding (about 1e-7), however the audio was
    chunked, when the gate is off (with the gate on, voiced frames are unchanged).

    Frame indices: frame ``i`` of the current stream has index ``first_index + i``. :meth:`reset` and
    :meth:`flush` keep the counter running: the next stream starts at the frame after the last one the
    previous stream's audio touched, so indices and ``sample_start`` stay monotonic; :attr:`position`
    is the sample time of the next pushed sample.

    Memory stays bounded over any stream length as long as ``pop()`` is called regularly: about 1.5k raw
    samples, a few dozen mel frames and a few frames of coefficients (see :attr:`buffer_sizes`).
    """

    def __init__(
        self,
        audio_to_lip: Callable[[torch.Tensor], torch.Tensor],
        config: LipSyncConfig | None = None,
        rest_lip: torch.Tensor | None = None,
    ) -> None:
        if not callable(audio_to_lip):
            raise InputError(f"audio_to_lip must be callable, got {type(audio_to_lip).__name__}")
        self.audio_to_lip = audio_to_lip
        self.config = config if config is not None else LipSyncConfig()
        if rest_lip is not None:
            rest_lip = torch.as_tensor(rest_lip, dtype=torch.float32).detach().cpu()
            if rest_lip.ndim != 1:
                raise InputError(f"rest_lip must be [lip_dim], got shape {list(rest_lip.shape)}")
        self._rest = rest_lip
        self._offline = self.config.lookahead == "offline"
        granularity = SAMPLES_PER_FRAME if self.config.cut_to_frames else 1
        self._mel = StreamingMel(DEFAULT_MEL_CONFIG, end_granularity=granularity)
        self._hop = DEFAULT_MEL_CONFIG.hop_length
        self._half = DEFAULT_MEL_CONFIG.n_fft // 2
        self._taps = gaussian_kernel(3, 1.0)  # the smoothing's taps, for the gate weights
        self._origin = 0
        self._checked = False  # audio_to_lip's output was checked against rest_lip
        self._latency = max(self.samples_needed(i) - SAMPLES_PER_FRAME * i for i in range(4 * MEL_STEP))
        self._clear()

    # ------------------------------------------------------------ public state
    @property
    def latency_samples(self) -> int:
        """Audio (16 kHz samples) past a frame's start that must have arrived before the frame is final.

        The maximum over frames of ``samples_needed(i) - 640 i`` (the pattern repeats every 5 frames):
        3200 (200 ms) by default, 2800 (175 ms) with ``cut_to_frames=False``, 640 (40 ms) with
        ``lookahead="low"``. The server delays the voice by this much to keep it in sync with the lips.
        """
        return self._latency

    @property
    def latency_s(self) -> float:
        return self._latency / SAMPLE_RATE

    @property
    def first_index(self) -> int:
        """Index of frame 0 of the current stream."""
        return self._origin

    @property
    def next_index(self) -> int:
        """Index of the next frame ``pop``/``flush`` will return."""
        return self._origin + self._n_out

    @property
    def position(self) -> int:
        """Sample time (16 kHz, since the first stream) of the next sample to push."""
        return SAMPLES_PER_FRAME * self._origin + self._mel.num_samples

    @property
    def buffer_sizes(self) -> dict[str, int]:
        """What is held now: raw samples, mel frames, frames of raw coefficients awaiting output."""
        return {
            "samples": self._mel.buffered_samples,
            "mel_frames": self._mel.buffered_frames,
            "lip_frames": int(self._raw.shape[0]),
        }

    def samples_needed(self, i: int) -> int:
        """Samples of the current stream that must have arrived for its frame ``i`` (0-based) to be final."""
        needed = self._raw_ready_at(i + 1 if self._offline else i)
        if self.config.cut_to_frames:
            needed = -(-needed // SAMPLES_PER_FRAME) * SAMPLES_PER_FRAME
        return needed

    def ready(self) -> bool:
        """True when :meth:`pop` would return at least one frame (cheap: lets callers skip empty pops)."""
        return self._mel.num_samples >= self.samples_needed(self.next_index - self.first_index)

    # ------------------------------------------------------------ streaming
    def push(self, samples: np.ndarray | torch.Tensor) -> None:
        """Append 16 kHz mono float samples ``[L]`` in [-1, 1] (any L >= 0); computes the new mel frames."""
        self._mel.push(samples)

    def pop(self) -> list[LipFrame]:
        """Every frame that became final since the last call, in order (possibly none)."""
        pending = self.begin_pop()
        if pending is None:
            return []
        return pending.complete(self._call(pending.windows) if pending.windows is not None else None)

    def begin_pop(self) -> PendingPop | None:
        """:meth:`pop` in two steps, for one Audio2Lip call over several lip syncs
        (:mod:`edtalk_live.realtime.lipbatch`): ``None`` when no frame is final yet, else a
        :class:`PendingPop` whose ``windows`` (``None``: no coefficients needed) go to ``audio_to_lip``
        and whose ``complete(raw)`` returns what ``pop`` would. Nothing changes until ``complete``;
        a pending pop left uncompleted changes nothing at all."""
        available = self._mel.num_samples
        if self.config.cut_to_frames:
            available -= available % SAMPLES_PER_FRAME
        if available < self._next_ready:
            return None
        k = self._n_raw
        while self._raw_ready_at(k) <= available:
            k += 1
        return self._plan(k, k - 1 if self._offline else k, num_mel=None, release=True)

    def flush(self) -> list[LipFrame]:
        """End of stream: the remaining frames with the offline renderer's end semantics, then :meth:`reset`.

        The stream is cut to ``T = n // 640`` whole frames (``n`` samples pushed; without ``cut_to_frames``
        the mel uses all ``n`` samples), the mel frames at the end use the reflect padding of the end,
        window indices are clamped to the last mel frame and the smoothing is zero-padded after frame T-1.
        """
        n = self._mel.num_samples
        total = n // SAMPLES_PER_FRAME
        frames: list[LipFrame] = []
        if total > self._n_out:
            end = total * SAMPLES_PER_FRAME if self.config.cut_to_frames else n
            num_mel = self._mel.finish(end)
            pending = self._plan(total, total, num_mel=num_mel, release=False)
            frames = pending.complete(self._call(pending.windows) if pending.windows is not None else None)
        logger.debug("flush: %d frames at the end of a stream of %d samples", len(frames), n)
        self.reset()
        return frames

    def reset(self) -> None:
        """Drop buffered audio and frames not yet returned (e.g. on an interrupt); start a new stream.

        The frame counter keeps running: the new stream's frame 0 gets the index after the last frame
        the dropped audio touched (``ceil(n / 640)`` frames after the old stream's first), so the first
        sample pushed after a reset is at :attr:`position` ``= 640 * first_index``. The new stream is
        processed like a fresh one (pre-emphasis, reflect padding and smoothing restart).
        """
        n = self._mel.num_samples
        self._origin += -(-n // SAMPLES_PER_FRAME)
        self._mel.reset()
        self._clear()

    # ------------------------------------------------------------ internals
    def _clear(self) -> None:
        self._n_raw = 0  # frames of the stream whose windows and gate are known
        self._n_out = 0  # frames of the stream returned
        self._raw0 = 0  # stream frame of row 0 of the arrays below
        self._windows = np.zeros((0, 1, 80, MEL_STEP), np.float32)  # mel windows [rows, 1, 80, 16]
        self._raw = np.zeros((0, 0), np.float32)  # raw coefficients [rows, lip_dim] (rows not computed: 0)
        self._have = np.zeros(0, bool)  # which rows' raw coefficients are computed
        self._gate = np.zeros(0, np.float64)  # gate openness in [0, 1] per row
        self._next_ready = self._raw_ready_at(0)  # samples needed before the next frame's window is complete

    def _window_starts(self, i0: int, i1: int) -> np.ndarray:
        """First mel frame (unclamped) of the windows of frames ``i0 .. i1 - 1``: int64 ``[i1 - i0]``."""
        if self._offline:
            return window_starts(i1 - i0, i0).numpy()
        i = np.arange(i0, i1, dtype=np.int64)
        # the last STFT frame whose support ends by the frame's end: hop * j + n_fft/2 <= 640 (i + 1)
        last = (SAMPLES_PER_FRAME * (i + 1) - self._half) // self._hop
        return last - (MEL_STEP - 1)

    def _window_start(self, i: int) -> int:
        """First mel frame (unclamped) of the window of frame ``i``."""
        if self._offline:
            return window_start(i)
        return (SAMPLES_PER_FRAME * (i + 1) - self._half) // self._hop - (MEL_STEP - 1)

    def _raw_ready_at(self, i: int) -> int:
        """Samples (before any whole-frame rounding) needed for frame ``i``'s window and frame ``i`` itself."""
        last_mel = self._window_start(i) + MEL_STEP - 1
        return max(self._hop * last_mel + self._half, SAMPLES_PER_FRAME * (i + 1))

    def _call(self, windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.audio_to_lip(windows)

    def _plan(self, k: int, upto: int, num_mel: int | None, release: bool) -> PendingPop:
        """Gather the windows of frames ``n_raw .. k - 1``; the pending return of frames ``n_out .. upto - 1``.

        Raw coefficients are computed only where a returned frame reads them (a frame whose mouth is
        fully at rest reads none); nothing changes until the pending pop completes.
        """
        i0 = self._n_raw
        windows, gate, have, raw = self._windows, self._gate, self._have, self._raw
        if k > i0:
            idx = self._window_starts(i0, k)[:, None] + np.arange(MEL_STEP, dtype=np.int64)[None, :]
            idx = np.clip(idx, 0, None if num_mel is None else num_mel - 1)
            mel, level = self._mel.gather(idx)  # [n, 16, 80], [n, 16]
            windows = np.concatenate([windows, mel.transpose(0, 2, 1)[:, None].astype(np.float32, copy=False)])
            gate = np.concatenate([gate, self._openness(level.max(axis=1))])
            have = np.concatenate([have, np.zeros(k - i0, bool)])
            width = raw.shape[1] or (self._rest.shape[0] if self._rest is not None else 0)
            raw = np.concatenate([raw.reshape(len(gate) - (k - i0), width), np.zeros((k - i0, width), np.float32)])
        n0, r0 = self._n_out, self._raw0
        upto = max(upto, n0)
        lo, hi = max(n0 - 1, 0), min(upto + 1, k)  # rows the smoothing of frames n0 .. upto - 1 reads
        weight = self._weights(gate[lo - r0 : hi - r0], n0 - lo, upto - n0)
        need = np.zeros(len(gate), bool)
        for r in np.flatnonzero(weight > 0.0) + (n0 - r0):  # a frame not fully at rest reads its neighbours
            need[max(r - 1, lo - r0) : r + 2 if self._offline else r + 1] = True
        if not self._checked and upto > n0:
            need[n0 - r0] = True  # the first call checks the number of coefficients (and makes rest = zeros)
        need &= ~have
        rows = np.flatnonzero(need)

        def complete(out: torch.Tensor | np.ndarray | None) -> list[LipFrame]:
            nonlocal raw, have
            if len(rows):
                if out is None:
                    raise InputError(f"this pop needs the coefficients of {len(rows)} windows")
                out = torch.as_tensor(out).detach().to("cpu", torch.float32).numpy()
                if out.ndim != 2 or out.shape[0] != len(rows):
                    raise InputError(f"audio_to_lip returned shape {list(out.shape)} for {len(rows)} windows, "
                                     f"expected [{len(rows)}, lip_dim]")
                rest = self._rest
                if rest is not None and rest.shape[0] != out.shape[1]:
                    raise InputError(f"rest_lip has {rest.shape[0]} coefficients, audio_to_lip gives {out.shape[1]}")
                raw = np.zeros((len(gate), out.shape[1]), np.float32) if raw.shape[1] != out.shape[1] else raw.copy()
                raw[rows] = out
                have = have | need
                if rest is None:
                    self._rest = torch.zeros(out.shape[1])
                self._checked = True
            self._windows, self._gate, self._have, self._raw = windows, gate, have, raw
            if k > i0:
                self._n_raw = k
                self._next_ready = self._raw_ready_at(k)
            frames = self._emit(upto, weight)
            if release:
                self._release()
            return frames

        batch = torch.from_numpy(np.ascontiguousarray(windows[rows])) if len(rows) else None
        return PendingPop(batch, complete)

    def _weights(self, g: np.ndarray, first: int, count: int) -> np.ndarray:
        """How much of its own mouth each of ``count`` frames shows (0: fully at rest), from the gates ``g``
        of the rows its smoothing reads (row ``first`` is the first frame's own)."""
        if count <= 0:
            return np.zeros(0)
        if not self.config.gate_enabled:
            return np.ones(count)
        if self._offline:
            gp = np.concatenate([g[:1], g, g[-1:]])  # replicate the gate at the stream's ends
            k = self._taps
            g_smooth = k[0] * gp[:-2] + k[1] * gp[1:-1] + k[2] * gp[2:]
        else:
            gp = np.concatenate([g[:1], g])
            g_smooth = 0.5 * (gp[:-1] + gp[1:])
        own = g[first : first + count]
        return np.maximum(own, g_smooth[first : first + count])  # voiced frames (own == 1) stay untouched

    def _openness(self, level_db: np.ndarray) -> np.ndarray:
        """Gate openness in [0, 1] from a window's loudest STFT frame (dBFS): 1 at the threshold and above."""
        if not self.config.gate_enabled:
            return np.ones_like(level_db)
        ramp = self.config.silence_ramp_db
        return np.clip((level_db - self.config.silence_db) / ramp + 1.0, 0.0, 1.0)

    def _emit(self, upto: int, weight: np.ndarray) -> list[LipFrame]:
        """Smooth and gate frames ``n_out .. upto - 1`` (``weight``: their gate weights) and return them."""
        n0 = self._n_out
        if upto <= n0:
            return []
        lo = max(n0 - 1, 0)
        hi = min(upto + 1, self._n_raw)
        seg = self._raw[lo - self._raw0 : hi - self._raw0]
        if self._offline:
            # offline smoothing on the segment: its zero padding is the stream's own at frame 0 and at the end;
            # elsewhere the padded rows (the segment's first and last) are dropped.
            lip = smooth(seg)[n0 - lo : upto - lo]
        else:
            prev = np.concatenate([seg[:1], seg[:-1]]) if n0 == 0 else seg[:-1]
            cur = seg if n0 == 0 else seg[1:]
            lip = (np.float32(0.5) * (prev + cur))[: upto - n0]
        own = self._gate[n0 - self._raw0 : upto - self._raw0]
        if self.config.gate_enabled and (weight < 1.0).any():
            rest = self._rest.numpy()[None]
            w = weight.astype(np.float32)[:, None]
            blended = w * lip + (np.float32(1.0) - w) * rest
            lip = np.where(w >= 1.0, lip, np.where(w <= 0.0, rest, blended))
        voiced = own >= 1.0
        self._n_out = upto
        base = self._origin + n0
        lips = torch.from_numpy(np.ascontiguousarray(lip, dtype=np.float32))
        return [
            LipFrame(index=base + r, lip=lips[r], sample_start=SAMPLES_PER_FRAME * (base + r), voiced=bool(voiced[r]))
            for r in range(upto - n0)
        ]

    def _release(self) -> None:
        """Drop windows, coefficients and mel frames no future frame needs."""
        keep = max(self._n_out - 1, 0)  # the smoothing of frame n_out reads frame n_out - 1
        drop = keep - self._raw0
        if drop > 0:
            self._windows = self._windows[drop:].copy()
            self._raw = self._raw[drop:].copy()
            self._have = self._have[drop:].copy()
            self._gate = self._gate[drop:].copy()
            self._raw0 = keep
        self._mel.release_frames(max(self._window_start(self._n_raw), 0))
