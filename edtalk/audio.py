"""Audio features of EDTalk: the Wav2Lip mel spectrogram, its per-frame windows and lip smoothing.

Everything here reproduces the published EDTalk demo (which uses Wav2Lip's ``audio.py`` with
librosa) in plain NumPy and PyTorch, without librosa or scipy:

- ``melspectrogram``: 16 kHz mono float audio ``[L]`` -> normalised log-mel ``[N, 80]`` (float32),
  ``N = L // 200 + 1`` (80 mel frames per second).
- ``fit_to_frames``: cut the audio to a whole number of 25 fps video frames (640 samples each).
- ``mel_windows``: mel ``[N, 80]`` -> the Audio2Lip input ``[T, 1, 80, 16]``, one 16-frame window
  (0.2 s) per video frame; video frame ``i`` starts at mel frame ``int(80 * (i - 2) / 25)``.
- ``smooth``: the demo's 3-tap temporal Gaussian over the predicted lip coefficients ``[T, C]``.

The index rule of the windows is exposed as ``window_start`` / ``window_indices`` so that a
streaming implementation can apply exactly the same rule frame by frame.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Final, TypeVar

import numpy as np
import torch

from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

T_Array = TypeVar("T_Array", torch.Tensor, np.ndarray)

logger = logging.getLogger(__name__)

__all__ = [
    "FPS",
    "HOP",
    "MEL_FPS",
    "MEL_STEP",
    "N_FFT",
    "N_MELS",
    "SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "WIN_LENGTH",
    "WINDOW_FRAME_OFFSET",
    "MelConfig",
    "DEFAULT_MEL_CONFIG",
    "fit_to_frames",
    "gaussian_kernel",
    "mel_filterbank",
    "mel_windows",
    "melspectrogram",
    "num_frames",
    "num_mel_frames",
    "smooth",
    "window_indices",
    "window_start",
    "window_starts",
]

N_FFT: Final[int] = 800
HOP: Final[int] = 200
WIN_LENGTH: Final[int] = 800
N_MELS: Final[int] = 80
MEL_FPS: Final[int] = SAMPLE_RATE // HOP  # 80
"""Mel frames per second."""
MEL_STEP: Final[int] = 16
"""Mel frames per Audio2Lip window (0.2 s)."""
WINDOW_FRAME_OFFSET: Final[int] = 2
"""The window of video frame i starts at the time of video frame i - 2 (it is centred on frame i)."""


@dataclass(frozen=True)
class MelConfig:
    """Parameters of the Wav2Lip / EDTalk mel spectrogram (the defaults are the only trained ones)."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    hop_length: int = HOP
    win_length: int = WIN_LENGTH
    n_mels: int = N_MELS
    fmin: float = 55.0
    fmax: float = 7600.0
    preemphasis: float = 0.97
    ref_level_db: float = 20.0
    min_level_db: float = -100.0
    max_abs_value: float = 4.0

    def __post_init__(self) -> None:
        if min(self.sample_rate, self.n_fft, self.hop_length, self.win_length, self.n_mels) <= 0:
            raise InputError(f"MelConfig: sizes must be positive, got {self}")
        if self.win_length > self.n_fft:
            raise InputError(f"MelConfig: win_length {self.win_length} exceeds n_fft {self.n_fft}")
        if not 0.0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise InputError(
                f"MelConfig: need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, fmax={self.fmax}"
            )
        if self.min_level_db >= 0 or self.max_abs_value <= 0:
            raise InputError("MelConfig: min_level_db must be negative and max_abs_value positive")


DEFAULT_MEL_CONFIG: Final[MelConfig] = MelConfig()

# Frames of the STFT processed at once: bounds memory (about 50 MB per block) without a per-frame loop.
_STFT_BLOCK_FRAMES = 8192


# --------------------------------------------------------------------------------------------------
# Mel filterbank (librosa.filters.mel with htk=False, norm='slaney')
# --------------------------------------------------------------------------------------------------

_F_SP = 200.0 / 3  # Slaney scale: linear below 1 kHz, 3 mels per 200 Hz
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = _F_SP * mel
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, linear)


@functools.lru_cache(maxsize=8)
def _mel_filterbank_cached(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    # librosa fills a float32 array, then scales it in place: round twice, as it does.
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights = (weights.astype(np.float64) * enorm[:, None]).astype(np.float32)
    weights.setflags(write=False)
    return weights


def mel_filterbank(config: MelConfig = DEFAULT_MEL_CONFIG) -> np.ndarray:
    """Slaney mel filters, float32 ``[n_mels, 1 + n_fft // 2]`` (read-only), as librosa.filters.mel.

    Equals ``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm='slaney')``.
    """
    return _mel_filterbank_cached(
        config.sample_rate, config.n_fft, config.n_mels, float(config.fmin), float(config.fmax)
    )


@functools.lru_cache(maxsize=8)
def _hann_window(win_length: int, n_fft: int) -> np.ndarray:
    """Periodic Hann window of ``win_length``, zero-padded on both sides to ``n_fft`` (float64)."""
    n = np.arange(win_length, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
    left = (n_fft - win_length) // 2
    window = np.pad(window, (left, n_fft - win_length - left))
    window.setflags(write=False)
    return window


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _as_wave(wav: np.ndarray, *, allow_empty: bool) -> np.ndarray:
    """Validate a 1-D floating mono signal; returns it as a NumPy array (no copy where possible)."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    if not isinstance(wav, np.ndarray):
        raise InputError(f"audio must be a 1-D float NumPy array, got {type(wav).__name__}")
    if wav.ndim != 1:
        raise InputError(
            f"audio must be 1-D mono samples, got shape {tuple(wav.shape)} (mix down or pick a channel)"
        )
    if not np.issubdtype(wav.dtype, np.floating):
        raise InputError(
            f"audio must be floating point in [-1, 1], got dtype {wav.dtype} (divide int16 PCM by 32768)"
        )
    if wav.size == 0 and not allow_empty:
        raise InputError("audio is empty (0 samples)")
    return wav


# --------------------------------------------------------------------------------------------------
# Mel spectrogram
# --------------------------------------------------------------------------------------------------


def num_mel_frames(num_samples: int, config: MelConfig = DEFAULT_MEL_CONFIG) -> int:
    """Number of mel frames ``melspectrogram`` returns for ``num_samples`` samples (centred STFT)."""
    if num_samples < 0:
        raise InputError(f"num_samples must be >= 0, got {num_samples}")
    return num_samples // config.hop_length + 1


def melspectrogram(wav_16k: np.ndarray, config: MelConfig = DEFAULT_MEL_CONFIG) -> np.ndarray:
    """Wav2Lip / EDTalk log-mel spectrogram of 16 kHz mono audio.

    Args:
        wav_16k: float samples ``[L]`` (nominally in [-1, 1]) at ``config.sample_rate``, L >= 1.
        config: spectrogram parameters; the defaults are the ones EDTalk was trained with.

    Returns:
        float32 ``[N, n_mels]`` (time-major), ``N = L // hop + 1``, values in
        ``[-max_abs_value, max_abs_value]``.

    Steps: pre-emphasis ``y[n] = x[n] - 0.97 x[n-1]`` (``y[0] = x[0]``); centred STFT (reflect
    padding of ``n_fft // 2`` on both sides, periodic Hann window); magnitude; Slaney mel filters;
    ``20 log10(max(1e-5, m)) - ref_level_db``; symmetric normalisation to [-4, 4] with clipping.
    Computed in float64.
    """
    wav = _as_wave(wav_16k, allow_empty=False)
    x = wav.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise InputError("audio contains NaN or infinite samples")

    # Pre-emphasis, as scipy.signal.lfilter([1, -k], [1], x).
    y = np.empty_like(x)
    y[0] = x[0]
    np.subtract(x[1:], config.preemphasis * x[:-1], out=y[1:])

    # Centred STFT frames (librosa center=True, pad_mode='reflect').
    pad = config.n_fft // 2
    y = np.pad(y, pad, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(y, config.n_fft)[:: config.hop_length]
    n_frames = frames.shape[0]
    assert n_frames == num_mel_frames(wav.size, config)

    window = _hann_window(config.win_length, config.n_fft)
    basis_t = mel_filterbank(config).astype(np.float64).T  # [n_fft//2+1, n_mels]
    mel = np.empty((n_frames, config.n_mels), dtype=np.float64)
    for start in range(0, n_frames, _STFT_BLOCK_FRAMES):
        block = frames[start : start + _STFT_BLOCK_FRAMES] * window
        magnitude = np.abs(np.fft.rfft(block, n=config.n_fft, axis=-1))
        mel[start : start + block.shape[0]] = magnitude @ basis_t

    min_level = np.exp(config.min_level_db / 20.0 * np.log(10))  # 1e-5 as Wav2Lip computes it
    db = 20.0 * np.log10(np.maximum(min_level, mel)) - config.ref_level_db
    m = config.max_abs_value
    normed = (2.0 * m) * ((db - config.min_level_db) / (-config.min_level_db)) - m
    return np.clip(normed, -m, m).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Audio <-> video frames
# --------------------------------------------------------------------------------------------------


def num_frames(num_samples: int) -> int:
    """Number of whole 25 fps video frames in ``num_samples`` samples of 16 kHz audio (floor)."""
    num_samples = int(num_samples)
    if num_samples < 0:
        raise InputError(f"num_samples must be >= 0, got {num_samples}")
    return num_samples // SAMPLES_PER_FRAME


def fit_to_frames(wav: np.ndarray, frames: int | None = None) -> np.ndarray:
    """Cut or zero-pad 16 kHz audio ``[L]`` to ``frames * 640`` samples.

    With ``frames=None`` (what the EDTalk demo does) it is ``num_frames(L)``, i.e. the audio is cut
    to a whole number of video frames (the tail of less than one frame is dropped). Returns an
    array of the input's dtype; a view when only cutting.
    """
    wav = _as_wave(wav, allow_empty=True)
    if frames is None:
        frames = num_frames(wav.size)
    elif frames < 0:
        raise InputError(f"frames must be >= 0, got {frames}")
    length = int(frames) * SAMPLES_PER_FRAME
    if wav.size >= length:
        return wav[:length]
    return np.pad(wav, (0, length - wav.size), mode="constant")


# --------------------------------------------------------------------------------------------------
# Audio2Lip windows
# --------------------------------------------------------------------------------------------------


def _trunc_div(num: int, den: int) -> int:
    """Integer division rounding toward zero (Python ``int(num / den)`` without float error)."""
    q = abs(num) // den
    return q if num >= 0 else -q


def window_start(i: int) -> int:
    """First mel frame of the window of video frame ``i``: ``int(80 * (i - 2) / 25)``, unclamped.

    Truncates toward zero like Python's ``int()``: frame 0 -> -6, 1 -> -3, 2 -> 0, 3 -> 3, 4 -> 6.
    Exact integer arithmetic (agrees with the demo's float expression for any realistic length).
    """
    return _trunc_div(MEL_FPS * (int(i) - WINDOW_FRAME_OFFSET), FPS)


def window_indices(i: int, num_mel: int) -> list[int]:
    """The ``MEL_STEP`` mel frame indices of video frame ``i``, clamped to ``[0, num_mel - 1]``."""
    if num_mel < 1:
        raise InputError(f"num_mel must be >= 1, got {num_mel}")
    start = window_start(i)
    return [min(max(j, 0), num_mel - 1) for j in range(start, start + MEL_STEP)]


def window_starts(count: int, first: int = 0) -> torch.Tensor:
    """``window_start(i)`` for ``i = first .. first + count - 1`` as int64 ``[count]``."""
    i = torch.arange(first, first + count, dtype=torch.int64)
    num = MEL_FPS * (i - WINDOW_FRAME_OFFSET)
    return torch.div(num, FPS, rounding_mode="trunc")


def mel_windows(mel: np.ndarray | torch.Tensor, num_frames: int) -> torch.Tensor:
    """Per-video-frame mel windows, the Audio2Lip input.

    Args:
        mel: ``[N, n_mels]`` (NumPy or torch), as returned by ``melspectrogram``; N >= 1.
        num_frames: number of video frames T (normally ``num_frames(len(wav))``).

    Returns:
        float32 ``[T, 1, n_mels, 16]``: for frame i the mel frames ``window_start(i) + 0..15``,
        clamped to ``[0, N - 1]``, transposed to (mel band, time). On the device of a torch input.
    """
    if isinstance(mel, np.ndarray):
        mel_t = torch.from_numpy(np.ascontiguousarray(mel))
    elif isinstance(mel, torch.Tensor):
        mel_t = mel.detach()
    else:
        raise InputError(f"mel must be a NumPy array or torch tensor, got {type(mel).__name__}")
    if mel_t.ndim != 2 or mel_t.shape[0] < 1:
        raise InputError(f"mel must be [N, n_mels] with N >= 1, got shape {tuple(mel_t.shape)}")
    if not mel_t.is_floating_point():
        raise InputError(f"mel must be floating point, got dtype {mel_t.dtype}")
    if num_frames < 0:
        raise InputError(f"num_frames must be >= 0, got {num_frames}")

    n = mel_t.shape[0]
    idx = window_starts(int(num_frames))[:, None] + torch.arange(MEL_STEP, dtype=torch.int64)[None, :]
    idx = idx.clamp_(0, n - 1).to(mel_t.device)
    windows = mel_t.to(torch.float32)[idx]  # [T, 16, n_mels]
    return windows.transpose(1, 2).unsqueeze(1).contiguous()


# --------------------------------------------------------------------------------------------------
# Lip coefficient smoothing
# --------------------------------------------------------------------------------------------------


def gaussian_kernel(k_size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """Normalised Gaussian taps ``exp(-x^2 / 2 sigma^2)``, x = -k//2 .. k//2, float64 ``[k_size]``.

    For the defaults: ``[0.27406862, 0.45186276, 0.27406862]``.
    """
    if k_size < 1 or k_size % 2 == 0:
        raise InputError(f"k_size must be a positive odd number, got {k_size}")
    if not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma}")
    pad = k_size // 2
    x = np.arange(-pad, k_size - pad, dtype=np.float64)
    k = np.exp(-(x**2) / (2.0 * sigma**2))
    return k / k.sum()


@functools.lru_cache(maxsize=8)
def _taps32(k_size: int, sigma: float) -> tuple[float, ...]:
    # the demo builds the taps in float64 and casts them to float32 before the convolution
    return tuple(float(t) for t in gaussian_kernel(k_size, sigma).astype(np.float32))


def smooth(lip: T_Array, sigma: float = 1.0, k_size: int = 3) -> T_Array:
    """Temporal Gaussian smoothing of per-frame coefficients, as the EDTalk demo's ``conv_feat``.

    Args:
        lip: floating ``[T, C]`` (time first), a torch tensor (any device) or a numpy array.
        sigma, k_size: Gaussian width and (odd) number of taps.

    Returns:
        ``[T, C]``, same type, dtype and device: each channel convolved along time with
        ``gaussian_kernel(k_size, sigma)`` (taps in float32) with zero padding, so the first and last
        frames are attenuated (by 0.726 for the defaults). Computed as a sum of shifted copies (a
        grouped ``conv1d`` over 20 channels costs more in call overhead than in arithmetic, and the
        streaming lip sync calls this for every frame).
    """
    is_torch = isinstance(lip, torch.Tensor)
    if not is_torch and not isinstance(lip, np.ndarray):
        raise InputError(f"lip must be a torch tensor or numpy array, got {type(lip).__name__}")
    if lip.ndim != 2:
        raise InputError(f"lip must be [T, C], got shape {tuple(lip.shape)}")
    if not (lip.is_floating_point() if is_torch else np.issubdtype(lip.dtype, np.floating)):
        raise InputError(f"lip must be floating point, got dtype {lip.dtype}")
    taps = _taps32(k_size, float(sigma))
    t = lip.shape[0]
    out = lip.clone() if is_torch else lip.copy()
    if t == 0 or lip.shape[1] == 0:
        return out
    pad = k_size // 2
    out *= taps[pad]
    for k, w in enumerate(taps):
        d = k - pad                          # out[i] += w * lip[i + d], zero outside [0, t)
        if d == 0 or abs(d) >= t:
            continue
        if d > 0:
            out[: t - d] += w * lip[d:]
        else:
            out[-d:] += w * lip[: t + d]
    return out
