"""Parity of edtalk.audio with the EDTalk / Wav2Lip reference (fixture produced with librosa)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edtalk_live.edtalk import audio
from edtalk_live.edtalk.errors import InputError

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "edtalk_s64.pt"

MEL_ATOL = 1e-3
SMOOTH_ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture() -> dict:
    if not FIXTURE.is_file():
        pytest.skip(f"parity fixture not found at {FIXTURE}")
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def wav(fixture) -> np.ndarray:
    return fixture["inputs"]["wav_16k"].numpy()


# --------------------------------------------------------------------------------------------------
# Parity with the fixture
# --------------------------------------------------------------------------------------------------


def test_fixture_shapes_and_frame_counts(fixture, wav):
    assert wav.shape == (160640,)
    t = audio.num_frames(wav.size)
    assert t == 251
    assert audio.num_mel_frames(wav.size) == 804
    assert tuple(fixture["inputs"]["mel"].shape) == (804, 80)
    assert tuple(fixture["inputs"]["mel_windows"].shape) == (t, 1, 80, 16)
    assert tuple(fixture["outputs"]["audio2lip.raw"].shape) == (t, 20)


def test_melspectrogram_matches_reference(fixture, wav):
    mel = audio.melspectrogram(wav)
    ref = fixture["inputs"]["mel"].numpy()
    assert mel.shape == ref.shape
    assert mel.dtype == np.float32
    err = float(np.abs(mel - ref).max())
    assert err <= MEL_ATOL, f"mel max abs error {err:.3g} > {MEL_ATOL}"


def test_melspectrogram_float64_and_tensor_input(fixture, wav):
    ref = fixture["inputs"]["mel"].numpy()
    for x in (wav.astype(np.float64), torch.from_numpy(wav)):
        err = float(np.abs(audio.melspectrogram(x) - ref).max())
        assert err <= MEL_ATOL, f"mel max abs error {err:.3g} > {MEL_ATOL} for {type(x).__name__}"


def test_melspectrogram_is_sensitive_to_parameters(wav, fixture):
    """The parity test must be able to fail: a slightly different pre-emphasis is far off."""
    ref = fixture["inputs"]["mel"].numpy()
    mel = audio.melspectrogram(wav, audio.MelConfig(preemphasis=0.95))
    assert float(np.abs(mel - ref).max()) > 10 * MEL_ATOL


def test_mel_windows_match_reference_exactly(fixture):
    mel = fixture["inputs"]["mel"]
    ref = fixture["inputs"]["mel_windows"]
    for m in (mel, mel.numpy()):
        windows = audio.mel_windows(m, ref.shape[0])
        assert windows.dtype == torch.float32
        assert windows.shape == ref.shape
        assert torch.equal(windows, ref), f"max abs diff {(windows - ref).abs().max().item():.3g}"


def test_mel_windows_from_own_mel(fixture, wav):
    ref = fixture["inputs"]["mel_windows"]
    windows = audio.mel_windows(audio.melspectrogram(wav), audio.num_frames(wav.size))
    err = (windows - ref).abs().max().item()
    assert err <= MEL_ATOL, f"mel window max abs error {err:.3g} > {MEL_ATOL}"


def test_smooth_matches_reference(fixture):
    raw = fixture["outputs"]["audio2lip.raw"]
    ref = fixture["outputs"]["audio2lip.smoothed"]
    out = audio.smooth(raw)
    assert out.shape == ref.shape and out.dtype == raw.dtype
    err = (out - ref).abs().max().item()
    assert err <= SMOOTH_ATOL, f"smoothed max abs error {err:.3g} > {SMOOTH_ATOL}"
    assert (raw - ref).abs().max().item() > 100 * SMOOTH_ATOL  # smoothing is not the identity here


# --------------------------------------------------------------------------------------------------
# Window index rule
# --------------------------------------------------------------------------------------------------


def test_window_start_rule():
    assert [audio.window_start(i) for i in range(7)] == [-6, -3, 0, 3, 6, 9, 12]
    for i in range(0, 5000, 7):
        assert audio.window_start(i) == int(80.0 * ((i - 2) / 25.0)), i
    starts = audio.window_starts(5000)
    assert starts.dtype == torch.int64
    assert starts.tolist() == [audio.window_start(i) for i in range(5000)]
    assert audio.window_starts(3, first=10).tolist() == [audio.window_start(i) for i in (10, 11, 12)]


def test_window_indices_clamped():
    assert audio.window_indices(0, 100) == [0] * 7 + list(range(1, 10))
    assert audio.window_indices(40, 120)[-1] == 119  # start 121 -> all clamped to the last frame
    assert audio.window_indices(40, 120) == [119] * 16


def test_mel_windows_small_and_past_the_end():
    mel = torch.arange(10 * 80, dtype=torch.float32).view(10, 80)
    windows = audio.mel_windows(mel, 6)
    assert windows.shape == (6, 1, 80, 16)
    for i in range(6):
        expected = mel[audio.window_indices(i, 10)].t()
        assert torch.equal(windows[i, 0], expected), i
    assert audio.mel_windows(mel, 0).shape == (0, 1, 80, 16)


# --------------------------------------------------------------------------------------------------
# Frames, shapes and input validation
# --------------------------------------------------------------------------------------------------


def test_num_frames_and_fit_to_frames():
    assert audio.SAMPLES_PER_FRAME == 640
    assert audio.num_frames(0) == 0
    assert audio.num_frames(639) == 0
    assert audio.num_frames(640) == 1
    assert audio.num_frames(16000) == 25
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    cut = audio.fit_to_frames(x)
    assert cut.shape == (640,) and np.array_equal(cut, x[:640]) and cut.dtype == np.float32
    padded = audio.fit_to_frames(x, frames=3)
    assert padded.shape == (1920,)
    assert np.array_equal(padded[:1000], x) and not padded[1000:].any()
    assert audio.fit_to_frames(x[:100]).shape == (0,)


def test_melspectrogram_shape_and_range():
    rng = np.random.default_rng(0)
    for n in (1, 5, 199, 200, 401, 1000, 16000):
        x = (0.1 * rng.standard_normal(n)).astype(np.float32)
        mel = audio.melspectrogram(x)
        assert mel.shape == (n // 200 + 1, 80), n
        assert mel.dtype == np.float32
        assert np.all(mel >= -4.0) and np.all(mel <= 4.0)
    assert np.all(audio.melspectrogram(np.zeros(3200, np.float32)) == -4.0)


def test_mel_filterbank_properties():
    fb = audio.mel_filterbank()
    assert fb.shape == (80, 401) and fb.dtype == np.float32
    assert not fb.flags.writeable
    assert np.all(fb >= 0)
    freqs = np.linspace(0, 8000, 401)
    assert not fb[:, freqs < 55].any() and not fb[:, freqs > 7600].any()
    # Slaney normalisation: each triangle has unit area in Hz, up to sampling on the 20 Hz FFT grid
    # (the narrow low bands, 67 Hz wide, are sampled coarsely; the wide high bands closely).
    areas = fb.sum(axis=1) * (freqs[1] - freqs[0])
    assert np.allclose(areas[10:], 1.0, atol=0.05), areas
    assert np.allclose(areas[60:], 1.0, atol=0.005), areas


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(0, np.float32),
        np.zeros((2, 1600), np.float32),
        np.zeros(1600, np.int16),
        np.array([0.0, np.nan, 0.0]),
        [0.0, 0.1, 0.2],
    ],
    ids=["empty", "2d", "int16", "nan", "list"],
)
def test_melspectrogram_rejects_invalid_input(bad):
    with pytest.raises(InputError) as info:
        audio.melspectrogram(bad)
    assert "\n" not in str(info.value) and str(info.value)


def test_other_invalid_inputs():
    with pytest.raises(InputError):
        audio.num_frames(-1)
    with pytest.raises(InputError):
        audio.fit_to_frames(np.zeros((2, 2)))
    with pytest.raises(InputError):
        audio.mel_windows(torch.zeros(80), 3)
    with pytest.raises(InputError):
        audio.mel_windows(torch.zeros(0, 80), 3)
    with pytest.raises(InputError):
        audio.smooth(torch.zeros(5, 2, 3))
    with pytest.raises(InputError):
        audio.smooth(torch.zeros(5, 2), k_size=4)
    with pytest.raises(InputError):
        audio.smooth(torch.zeros(5, 2), sigma=0.0)


# --------------------------------------------------------------------------------------------------
# Smoothing
# --------------------------------------------------------------------------------------------------


def test_gaussian_kernel_weights():
    k = audio.gaussian_kernel(3, 1.0)
    assert np.allclose(k, [0.27406862, 0.45186276, 0.27406862], atol=1e-8)
    assert abs(k.sum() - 1.0) < 1e-12


def test_smooth_constant_interior_and_zero_padded_edges():
    x = torch.full((10, 4), 2.5)
    y = audio.smooth(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.allclose(y[1:-1], x[1:-1], atol=1e-6), "interior of a constant must stay constant"
    edge = 2.5 * (0.45186276 + 0.27406862)
    assert torch.allclose(y[0], torch.full((4,), edge), atol=1e-6)
    assert torch.allclose(y[-1], torch.full((4,), edge), atol=1e-6)
    assert (y[0] < x[0]).all()


def test_smooth_impulse_and_dtype():
    x = torch.zeros(7, 2, dtype=torch.float64)
    x[3, 1] = 1.0
    y = audio.smooth(x)
    assert y.dtype == torch.float64
    expected = torch.zeros(7, 2, dtype=torch.float64)
    expected[2:5, 1] = torch.tensor([0.27406862, 0.45186276, 0.27406862], dtype=torch.float64)
    assert torch.allclose(y, expected, atol=1e-7)
    assert audio.smooth(torch.zeros(0, 20)).shape == (0, 20)
    assert audio.smooth(torch.ones(1, 3)).shape == (1, 3)
