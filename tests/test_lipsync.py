"""Streaming Audio-to-Motion (edtalk_live.avatar.lipsync) against the offline renderer's lip path.

The offline reference is what ``edtalk_live.avatar.speech.lips_for_audio`` computes:
``smooth(audio_to_lip(mel_windows(melspectrogram(wav), T)))`` on the audio cut to T whole frames.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import edtalk_live.edtalk as edtalk
from edtalk_live.avatar.lipsync import LipFrame, LipSyncConfig, StreamingLipSync
from edtalk_live.edtalk import audio
from edtalk_live.edtalk.audio_stream import StreamingMel
from edtalk_live.edtalk.errors import InputError

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "edtalk_s64.pt"

LIP_ATOL = 1e-5  # streamed vs offline mouth coefficients
MEL_ATOL = 1e-4  # incremental vs whole-signal mel
SPF = audio.SAMPLES_PER_FRAME
NO_GATE = LipSyncConfig(silence_db=None)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture() -> dict:
    if not FIXTURE.is_file():
        pytest.skip(f"parity fixture not found at {FIXTURE}")
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def model(fixture):
    return edtalk.load_model(fixture["checkpoint"], audio2lip=fixture["audio2lip_checkpoint"])


@pytest.fixture(scope="module")
def wav(fixture) -> np.ndarray:
    return fixture["inputs"]["wav_16k"].numpy()


def offline(audio_to_lip, wav: np.ndarray, cut: bool = True) -> torch.Tensor:
    """The offline renderer's mouth coefficients ``[T,20]`` (``cut=False``: mel of the uncut audio)."""
    t = audio.num_frames(wav.size)
    x = audio.fit_to_frames(wav, t) if cut else wav
    with torch.inference_mode():
        return audio.smooth(audio_to_lip(audio.mel_windows(audio.melspectrogram(x), t)))


def fake_audio_to_lip(windows: torch.Tensor) -> torch.Tensor:
    """Cheap stand-in for Audio2Lip: ``[B,1,80,16] -> [B,20]``."""
    return windows.mean(dim=(1, 2, 3))[:, None].repeat(1, 20)


def chunk_sizes(kind: int | str, total: int, seed: int = 0) -> list[int]:
    if kind == "random":
        rng = np.random.default_rng(seed)
        sizes: list[int] = []
        while sum(sizes) < total:
            sizes.append(int(rng.choice([0, 1, 7, 200, 639, 641, 1280, 3333, 9000])))
        return sizes
    return [kind] * math.ceil(total / kind)


def stream(lips: StreamingLipSync, wav: np.ndarray, sizes: list[int]) -> tuple[list[LipFrame], list[int], list[int]]:
    """Push ``wav`` in chunks of ``sizes``, pop after each; returns frames, the stream position at which each
    was returned (None for flushed ones: -1), and the size of the chunk that made it final."""
    frames: list[LipFrame] = []
    popped_at: list[int] = []
    chunk_of: list[int] = []
    pos = 0
    for n in sizes:
        lips.push(wav[pos : pos + n])
        pos = min(pos + n, wav.size)
        got = lips.pop()
        frames += got
        popped_at += [pos] * len(got)
        chunk_of += [n] * len(got)
        if pos >= wav.size:
            break
    tail = lips.flush()
    frames += tail
    popped_at += [-1] * len(tail)
    chunk_of += [0] * len(tail)
    return frames, popped_at, chunk_of


def lips_of(frames: list[LipFrame]) -> torch.Tensor:
    return torch.stack([f.lip for f in frames]) if frames else torch.zeros(0, 20)


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise with a syllable-rate envelope, float32 16 kHz (no fixture needed)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * audio.SAMPLE_RATE)
    t = np.arange(n) / audio.SAMPLE_RATE
    env = 0.3 * (0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t))
    tone = np.sin(2 * np.pi * 180.0 * t) + 0.5 * np.sin(2 * np.pi * 1200.0 * t)
    return (env * (0.5 * tone + 0.3 * rng.standard_normal(n))).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# parity with the offline renderer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 160, 320, 640, 961, 4800, "random"])
def test_stream_matches_offline(model, wav, chunk):
    ref = offline(model.audio_to_lip, wav)
    lips = StreamingLipSync(model.audio_to_lip, NO_GATE)
    frames, popped_at, chunk_of = stream(lips, wav, chunk_sizes(chunk, wav.size))

    t = audio.num_frames(wav.size)
    assert len(frames) == t == ref.shape[0]
    assert [f.index for f in frames] == list(range(t))
    assert [f.sample_start for f in frames] == [SPF * i for i in range(t)]
    got = lips_of(frames)
    err = (got - ref).abs().max().item()
    assert err <= LIP_ATOL, f"chunk {chunk}: max abs error {err:.3g}"

    # final no later than latency_samples after the frame's start (up to the chunk that crossed it),
    # and never before the audio it depends on has arrived
    for f, at, n in zip(frames, popped_at, chunk_of, strict=True):
        if at < 0:  # returned by flush: its window reaches past the end of the stream
            assert lips.samples_needed(f.index) > wav.size
            continue
        assert at >= lips.samples_needed(f.index)
        assert at - f.sample_start < lips.latency_samples + max(n, 1)
    if chunk == 1:
        delays = [at - f.sample_start for f, at in zip(frames, popped_at, strict=True) if at >= 0]
        assert max(delays) == lips.latency_samples


def test_stream_not_whole_frames_matches_offline_cut(model, wav):
    cut = wav[: wav.size - 3 * SPF - 333]  # 333 samples short of a whole frame
    ref = offline(model.audio_to_lip, cut)
    for chunk in (1, 961, "random"):
        frames, _, _ = stream(StreamingLipSync(model.audio_to_lip, NO_GATE), cut, chunk_sizes(chunk, cut.size, 3))
        assert [f.index for f in frames] == list(range(cut.size // SPF))
        assert (lips_of(frames) - ref).abs().max().item() <= LIP_ATOL


def test_without_cut_matches_offline_on_uncut_audio(model, wav):
    cfg = LipSyncConfig(silence_db=None, cut_to_frames=False)
    whole = StreamingLipSync(model.audio_to_lip, cfg)
    frames, _, _ = stream(whole, wav, chunk_sizes(320, wav.size))
    assert (lips_of(frames) - offline(model.audio_to_lip, wav)).abs().max().item() <= LIP_ATOL

    cut = wav[: wav.size - 3 * SPF - 333]
    frames, _, _ = stream(StreamingLipSync(model.audio_to_lip, cfg), cut, chunk_sizes(961, cut.size))
    ref = offline(model.audio_to_lip, cut, cut=False)
    assert len(frames) == ref.shape[0]
    assert (lips_of(frames) - ref).abs().max().item() <= LIP_ATOL


# --------------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------------


def _expected_latency(first_frame_offset: int, round_to_frame: bool, causal: bool) -> int:
    """Independent computation: the smoothing of frame i needs the window of frame i+1 (offline mode)."""
    worst = 0
    for i in range(100):
        if causal:
            last = (SPF * (i + 1) - audio.N_FFT // 2) // audio.HOP  # last STFT frame ending by the frame's end
        else:
            last = audio.window_start(i + first_frame_offset) + audio.MEL_STEP - 1
        need = max(audio.HOP * last + audio.N_FFT // 2, SPF * (i + 1))
        if round_to_frame:
            need = math.ceil(need / SPF) * SPF
        worst = max(worst, need - SPF * i)
    return worst


def test_latency_from_constants():
    default = StreamingLipSync(fake_audio_to_lip)
    uncut = StreamingLipSync(fake_audio_to_lip, LipSyncConfig(cut_to_frames=False))
    low = StreamingLipSync(fake_audio_to_lip, LipSyncConfig(lookahead="low"))
    assert default.latency_samples == _expected_latency(1, True, False) == 3200  # 200 ms
    assert uncut.latency_samples == _expected_latency(1, False, False) == 2800  # 175 ms
    assert low.latency_samples == _expected_latency(0, True, True) == SPF  # 40 ms
    assert 0.160 <= uncut.latency_s <= default.latency_s <= 0.200
    assert low.latency_samples < uncut.latency_samples < default.latency_samples


# --------------------------------------------------------------------------------------------------
# incremental mel
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 199, 640, "random"])
def test_incremental_mel_matches_melspectrogram(chunk):
    x = speechlike(2.3, seed=1)
    full = audio.melspectrogram(x)
    mel = StreamingMel()
    pos = 0
    for n in chunk_sizes(chunk, x.size, seed=2):
        new = mel.push(x[pos : pos + n])
        pos = min(pos + n, x.size)
        # a frame is computed as soon as its whole STFT support has arrived (frame 0 also reads sample 400)
        assert new >= 0
        assert mel.num_frames == ((pos - 400) // audio.HOP + 1 if pos > 400 else 0)
        if pos >= x.size:
            break
    streamed = mel.mel(0, mel.num_frames).copy()
    assert mel.num_frames < full.shape[0]  # the last frames depend on the end padding
    assert full.shape[0] - mel.num_frames == 2
    np.testing.assert_allclose(streamed, full[: mel.num_frames], rtol=0, atol=MEL_ATOL)

    total = mel.finish(x.size)  # the end padding: now every frame
    assert total == full.shape[0] == mel.num_frames
    np.testing.assert_allclose(mel.mel(0, total), full, rtol=0, atol=MEL_ATOL)


def test_mel_finish_at_an_earlier_whole_frame():
    x = speechlike(1.0, seed=3)
    mel = StreamingMel(end_granularity=SPF)
    mel.push(x[:5000])  # 7 whole frames (4480) and 520 samples
    total = mel.finish(4480)
    full = audio.melspectrogram(x[:4480])
    assert total == full.shape[0]
    np.testing.assert_allclose(mel.mel(0, total), full, rtol=0, atol=MEL_ATOL)
    with pytest.raises(InputError):
        mel.push(x[:10])


def test_mel_buffers_stay_small():
    mel = StreamingMel(end_granularity=SPF)
    x = speechlike(1.0, seed=4)
    for k in range(40):
        mel.push(x[: 16000 - 37 * k])
        mel.release_frames(mel.num_frames - 20)
        assert mel.buffered_samples <= audio.N_FFT + SPF
        assert mel.buffered_frames <= 20


# --------------------------------------------------------------------------------------------------
# bounded memory over a long stream
# --------------------------------------------------------------------------------------------------


def test_memory_bounded_over_a_long_stream():
    minutes = 60
    rng = np.random.default_rng(5)
    second = (0.1 * rng.standard_normal(audio.SAMPLE_RATE)).astype(np.float32)
    silence = np.zeros(audio.SAMPLE_RATE, np.float32)
    lips = StreamingLipSync(fake_audio_to_lip)
    peak = {"samples": 0, "mel_frames": 0, "lip_frames": 0}
    frames = 0
    expected_next = 0
    pushed = 0
    for k in range(minutes * 60 // 2):
        chunk = np.concatenate([second, silence if k % 5 == 0 else second])[: 2 * audio.SAMPLE_RATE - (k % 7) * 13]
        lips.push(chunk)
        pushed += chunk.size
        got = lips.pop()
        if got:
            assert got[0].index == expected_next
            expected_next = got[-1].index + 1
        frames += len(got)
        for key, value in lips.buffer_sizes.items():
            peak[key] = max(peak[key], value)
    frames += len(lips.flush())
    assert frames == pushed // SPF
    # ring sizes independent of the stream's length: about one STFT frame plus one video frame of samples,
    # the 16-frame window plus what 2 s of audio adds, and the smoothing's neighbours
    assert peak["samples"] <= audio.N_FFT + SPF, peak
    assert peak["mel_frames"] <= audio.MEL_STEP + 8, peak
    assert peak["lip_frames"] <= 2, peak
    assert lips.buffer_sizes == {"samples": 0, "mel_frames": 0, "lip_frames": 0}


# --------------------------------------------------------------------------------------------------
# silence gate
# --------------------------------------------------------------------------------------------------


def test_digital_silence_gives_exactly_the_rest_pose(model):
    rest = torch.linspace(-0.3, 0.3, 20)
    lips = StreamingLipSync(model.audio_to_lip, LipSyncConfig(), rest_lip=rest)
    frames, _, _ = stream(lips, np.zeros(3 * audio.SAMPLE_RATE, np.float32), chunk_sizes(320, 48000))
    assert len(frames) == 75
    for f in frames:
        assert torch.equal(f.lip, rest)
        assert not f.voiced
    # default rest pose: zeros
    frames, _, _ = stream(StreamingLipSync(model.audio_to_lip), np.zeros(16000, np.float32), [16000])
    assert all(torch.equal(f.lip, torch.zeros(20)) for f in frames)


@pytest.mark.parametrize("lookahead", ["offline", "low"])
def test_silence_costs_no_audio_to_lip(model, wav, lookahead):
    """Audio2Lip runs only for windows some returned frame reads: a frame fully at rest reads none. The
    result is the same as with every window computed (the gate weights of those frames are 0)."""
    x = np.concatenate([wav[:16000], np.zeros(3 * 16000, np.float32), wav[:8000]])
    windows = []

    def counting(w: torch.Tensor) -> torch.Tensor:
        windows.append(w.shape[0])
        return model.audio_to_lip(w)

    cfg = LipSyncConfig(lookahead=lookahead)
    frames, _, _ = stream(StreamingLipSync(counting, cfg), x, chunk_sizes(320, x.size))
    open_frames = sum(1 for f in frames if not torch.equal(f.lip, torch.zeros(20)))
    # ~25 + 12 voiced frames, each reads at most its neighbours; 75 silent frames read nothing
    assert open_frames < 50
    assert sum(windows) <= open_frames + 6
    # every window computed (gate off) gives the same mouths where the gate is fully open
    ref, _, _ = stream(StreamingLipSync(model.audio_to_lip, LipSyncConfig(lookahead=lookahead, silence_db=None)),
                       x, chunk_sizes(320, x.size))
    voiced = torch.tensor([f.voiced for f in frames])
    assert (lips_of(frames)[voiced] - lips_of(ref)[voiced]).abs().max().item() <= LIP_ATOL


def test_gate_leaves_voiced_frames_of_speech_untouched(model, wav):
    ref = offline(model.audio_to_lip, wav)
    rest = torch.full((20,), 0.25)
    frames, _, _ = stream(StreamingLipSync(model.audio_to_lip, rest_lip=rest), wav, chunk_sizes(640, wav.size))
    voiced = torch.tensor([f.voiced for f in frames])
    assert voiced.float().mean() > 0.8  # the fixture is mostly speech
    got = lips_of(frames)
    assert (got[voiced] - ref[voiced]).abs().max().item() <= LIP_ATOL
    # the fixture's pauses (two of them) are pulled towards the rest pose
    assert (~voiced).sum() > 0
    assert ((got[~voiced] - rest).abs().mean(1) <= (ref[~voiced] - rest).abs().mean(1) + 1e-6).all()


def test_gate_inside_speech_and_soft_fade():
    # constant "mouth open" network, rest = 0: the output is the gate's weight
    ones = lambda w: torch.ones(w.shape[0], 20)  # noqa: E731
    speech = speechlike(1.0, seed=6)
    silence = np.zeros(2 * audio.SAMPLE_RATE, np.float32)
    x = np.concatenate([speech, silence, speech])
    frames, _, _ = stream(StreamingLipSync(ones), x, chunk_sizes(320, x.size))
    w = lips_of(frames)[:, 0]
    voiced = np.array([f.voiced for f in frames])
    assert voiced[5:20].all() and voiced[-20:-5].all()
    assert not voiced[35:65].any()
    assert torch.equal(lips_of(frames)[35:65], torch.zeros(30, 20))  # deep in the pause: exactly at rest

    # a fade from -30 to -80 dBFS over 2 s closes the mouth gradually
    t = np.arange(2 * audio.SAMPLE_RATE) / audio.SAMPLE_RATE
    fade = (10 ** ((-30 - 25 * t) / 20) * np.sqrt(2) * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    frames, _, _ = stream(StreamingLipSync(ones), fade, chunk_sizes(320, fade.size))
    w = lips_of(frames)[:, 0].numpy()
    assert w[3] == pytest.approx(1.0, abs=1e-6) and w[-1] == 0.0
    assert (np.diff(w[1:]) <= 1e-6).all()  # monotone (frame 0 carries the smoothing's zero padding)
    assert np.abs(np.diff(w[1:])).max() < 0.35  # no hard jump from open to rest


def test_gate_threshold_is_configurable():
    ones = lambda w: torch.ones(w.shape[0], 20)  # noqa: E731
    quiet = (10 ** (-45 / 20) * np.sqrt(2) * np.sin(np.arange(32000) * 2 * np.pi * 300 / 16000)).astype(np.float32)
    loud_gate = stream(StreamingLipSync(ones, LipSyncConfig(silence_db=-30.0)), quiet, [32000])[0]
    soft_gate = stream(StreamingLipSync(ones, LipSyncConfig(silence_db=-60.0)), quiet, [32000])[0]
    assert not any(f.voiced for f in loud_gate) and all(f.voiced for f in soft_gate)
    assert lips_of(loud_gate)[10:40].abs().max() == 0
    with pytest.raises(InputError):
        LipSyncConfig(silence_db=6.0)
    assert not LipSyncConfig(silence_db=0).gate_enabled


# --------------------------------------------------------------------------------------------------
# low-latency mode
# --------------------------------------------------------------------------------------------------


def test_low_latency_mode(model, wav):
    lips = StreamingLipSync(model.audio_to_lip, LipSyncConfig(lookahead="low", silence_db=None))
    assert lips.latency_samples == SPF
    frames, popped_at, _ = stream(lips, wav, chunk_sizes(160, wav.size))
    t = audio.num_frames(wav.size)
    assert [f.index for f in frames] == list(range(t))
    # one frame per 640 samples: frame i comes out as soon as its own 640 samples are in
    assert [at for at in popped_at] == [SPF * (i + 1) for i in range(t)]

    # reference: the window ends at the frame's end, causal mean of previous and current frame
    mel = torch.from_numpy(audio.melspectrogram(wav))
    last = (SPF * (torch.arange(t) + 1) - audio.N_FFT // 2) // audio.HOP
    idx = (last[:, None] - audio.MEL_STEP + 1 + torch.arange(audio.MEL_STEP)[None]).clamp(0, mel.shape[0] - 1)
    with torch.inference_mode():
        raw = model.audio_to_lip(mel[idx].transpose(1, 2)[:, None].contiguous())
    ref = 0.5 * (torch.cat([raw[:1], raw[:-1]]) + raw)
    assert (lips_of(frames) - ref).abs().max().item() <= LIP_ATOL

    # chunking does not matter either
    other, _, _ = stream(StreamingLipSync(model.audio_to_lip, lips.config), wav, chunk_sizes("random", wav.size, 9))
    assert (lips_of(other) - ref).abs().max().item() <= LIP_ATOL


# --------------------------------------------------------------------------------------------------
# reset, flush and edge cases
# --------------------------------------------------------------------------------------------------


def test_reset_drops_pending_and_keeps_indices_monotonic(model, wav):
    lips = StreamingLipSync(model.audio_to_lip, NO_GATE)
    lips.push(wav[: 10 * SPF + 100])
    first = lips.pop()
    assert [f.index for f in first] == list(range(len(first))) and len(first) < 10
    lips.reset()
    assert lips.buffer_sizes == {"samples": 0, "mel_frames": 0, "lip_frames": 0}
    assert lips.first_index == lips.next_index == 11  # ceil((10 * 640 + 100) / 640)
    assert lips.position == 11 * SPF
    assert lips.pop() == [] and lips.flush() == []  # the dropped frames never come back
    assert lips.next_index == 11

    # the new stream is processed as a fresh one, its indices continue
    frames, _, _ = stream(lips, wav, chunk_sizes(961, wav.size))
    t = audio.num_frames(wav.size)
    assert [f.index for f in frames] == list(range(11, 11 + t))
    assert [f.sample_start for f in frames] == [SPF * i for i in range(11, 11 + t)]
    assert (lips_of(frames) - offline(model.audio_to_lip, wav)).abs().max().item() <= LIP_ATOL
    assert lips.next_index == 11 + t  # flush resets and continues


def test_short_and_empty_streams():
    lips = StreamingLipSync(fake_audio_to_lip)
    lips.push(np.zeros(0, np.float32))
    assert lips.pop() == [] and lips.flush() == []
    lips.push(np.zeros(639, np.float32))  # less than one frame: nothing, as offline
    assert lips.pop() == [] and lips.flush() == []
    assert lips.next_index == 1
    lips.push(np.full(SPF, 0.1, np.float32))  # exactly one frame
    assert lips.pop() == []
    frames = lips.flush()
    assert [f.index for f in frames] == [1]
    ref = offline(fake_audio_to_lip, np.full(SPF, 0.1, np.float32))
    assert (frames[0].lip - ref[0]).abs().max().item() <= LIP_ATOL


def test_bad_inputs():
    lips = StreamingLipSync(fake_audio_to_lip)
    with pytest.raises(InputError, match="int16"):
        lips.push(np.zeros(10, np.int16))
    with pytest.raises(InputError, match="1-D"):
        lips.push(np.zeros((10, 2), np.float32))
    with pytest.raises(InputError, match="NaN"):
        lips.push(np.array([0.0, np.nan], np.float32))
    with pytest.raises(InputError, match="lookahead"):
        LipSyncConfig(lookahead="none")  # type: ignore[arg-type]
    bad_rest = StreamingLipSync(fake_audio_to_lip, rest_lip=torch.zeros(7))
    bad_rest.push(np.zeros(8000, np.float32))
    with pytest.raises(InputError, match="rest_lip"):
        bad_rest.pop()


def test_ready_predicts_pop():
    """ready() is True exactly when pop() has a frame to give, whatever the chunking."""
    rng = np.random.default_rng(3)
    wav = (rng.standard_normal(16000 * 3) * 0.1).astype(np.float32)
    for cut in (False, True):
        lips = StreamingLipSync(lambda w: w.mean(dim=(1, 2, 3))[:, None].repeat(1, 20),
                                LipSyncConfig(cut_to_frames=cut, silence_db=None))
        pos = 0
        while pos < len(wav):
            n = int(rng.integers(0, 900))
            lips.push(wav[pos:pos + n])
            pos += n
            expected = lips.ready()
            assert bool(lips.pop()) == expected
