"""edtalk_live.avatar.motion: per-session head pose (still, clip ping-pong, idle) and blended expression state."""

from __future__ import annotations

import math

import pytest
import torch

from edtalk_live.avatar.driving import pingpong
from edtalk_live.avatar.motion import MODES, ExpressionState, PoseSource
from edtalk_live.edtalk.errors import InputError

FPS = 25
FADE = 8  # 300 ms at 25 fps


def _rest() -> torch.Tensor:
    return torch.tensor([0.3, -0.2, 0.05, 0.1, -0.4, 0.25])


def _clip(n: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float32)[:, None]
    return 0.5 + 0.2 * torch.sin(0.3 * t + torch.rand(1, 6, generator=g) * 6) + 0.01 * torch.randn(n, 6, generator=g)


def _run(src: PoseSource, n: int, voiced=False) -> torch.Tensor:
    """``[n,6]`` poses; ``voiced`` is a bool or a function of the frame index."""
    return torch.stack([src.next(voiced(i) if callable(voiced) else voiced) for i in range(n)])


def _idle_step_bound(src: PoseSource) -> torch.Tensor:
    """Largest frame-to-frame change ``[6]`` the idle motion may make with the default idle parameters.

    Sinusoids up to 0.5 Hz, up to 1.5x faster while voiced: |d sin| <= 2*pi*0.75/25 per frame, times the
    largest amplitude; plus the liveliness ramp (time constant 0.5 s) raising the amplitude 1.6x.
    """
    speed = 2 * math.pi * 0.5 * 1.5 / FPS
    ramp = (1 - math.exp(-1 / (FPS * 0.5))) * 0.6 / 1.6
    return src.idle_bound * (speed + ramp) * 1.01


# ------------------------------------------------------------------------------------------ still / clip


def test_still_returns_rest_pose_exactly():
    rest = _rest()
    src = PoseSource(rest, mode="still")
    poses = _run(src, 50, voiced=lambda i: i % 3 == 0)
    assert poses.dtype == torch.float32 and poses.shape == (50, 6)
    assert torch.equal(poses, rest.expand(50, 6))


def test_rest_pose_may_be_a_batch_of_one():
    assert torch.equal(PoseSource(_rest()[None]).next(), _rest())


@pytest.mark.parametrize("n_clip", [1, 2, 7])
def test_clip_mode_plays_forward_and_backward_like_pingpong(n_clip):
    clip = _clip(n_clip)
    src = PoseSource(_rest(), clip_poses=clip, mode="clip")
    n = 5 * n_clip + 11
    assert torch.equal(_run(src, n, voiced=lambda i: i % 2 == 0), pingpong(clip, n))


def test_returned_pose_is_a_copy():
    src = PoseSource(_rest(), mode="still")
    src.next().add_(10.0)
    assert torch.equal(src.next(), _rest())


# ------------------------------------------------------------------------------------------ idle


def test_idle_stays_near_rest_with_small_smooth_steps():
    rest = _rest()
    src = PoseSource(rest, mode="idle", seed=3)
    poses = _run(src, 1500, voiced=lambda i: (i // 100) % 2 == 1)  # speech on and off every 4 s
    offset = (poses - rest).abs()
    assert (offset <= src.idle_bound + 1e-6).all()
    assert (src.idle_bound <= 0.1).all(), "default idle motion should be small (< 1 default pose std)"
    steps = (poses[1:] - poses[:-1]).abs()
    assert (steps <= _idle_step_bound(src)).all(), steps.max(0).values
    # it does move: a visible fraction of its range, on every coefficient
    assert (poses.std(0) > 0.1 * src.idle_bound).all(), poses.std(0)


def test_idle_motion_is_slow():
    """Energy concentrated at low frequency: the signal barely changes sign frame to frame."""
    src = PoseSource(torch.zeros(6), mode="idle", seed=5)
    poses = _run(src, 1000)
    crossings = ((poses[1:] * poses[:-1]) < 0).sum(0)  # zero crossings of the offset, per coefficient
    assert (crossings <= 2 * 0.5 * 1000 / FPS + 2).all(), crossings  # at most ~2 per period of 0.5 Hz


def test_idle_is_deterministic_per_seed_and_differs_between_seeds():
    a = _run(PoseSource(_rest(), mode="idle", seed=11), 200, voiced=lambda i: i > 100)
    b = _run(PoseSource(_rest(), mode="idle", seed=11), 200, voiced=lambda i: i > 100)
    c = _run(PoseSource(_rest(), mode="idle", seed=12), 200, voiced=lambda i: i > 100)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_idle_is_livelier_while_voiced():
    def mean_speed(voiced: bool) -> float:
        src = PoseSource(_rest(), mode="idle", seed=7)
        poses = _run(src, 25 * 30, voiced=voiced)[50:]  # skip the first 2 s (the liveliness ramp)
        return (poses[1:] - poses[:-1]).abs().mean().item()

    silent, voiced = mean_speed(False), mean_speed(True)
    assert voiced > 1.5 * silent, (voiced, silent)


def test_idle_speech_raises_both_speed_and_amplitude():
    def stats(voiced: bool, **options) -> tuple[float, float]:
        src = PoseSource(torch.zeros(6), mode="idle", seed=8, **options)
        poses = _run(src, 25 * 40, voiced=voiced)[50:]
        return (poses[1:] - poses[:-1]).abs().mean().item(), poses.abs().max().item()

    speed_silent, _ = stats(False, voiced_gain=1.0)  # amplitude fixed: only the speed can change
    speed_voiced, _ = stats(True, voiced_gain=1.0)
    assert speed_voiced > 1.3 * speed_silent, (speed_voiced, speed_silent)
    _, reach_silent = stats(False, voiced_speed=1.0)  # speed fixed: only the amplitude can change
    _, reach_voiced = stats(True, voiced_speed=1.0)
    assert reach_voiced > 1.4 * reach_silent, (reach_voiced, reach_silent)


def test_idle_liveliness_ramps_smoothly():
    """Speech starting does not change the motion at once: the first voiced frames move like silent ones."""
    silent = PoseSource(_rest(), mode="idle", seed=2)
    voiced = PoseSource(_rest(), mode="idle", seed=2)
    a = _run(silent, 101)
    b = _run(voiced, 101, voiced=lambda i: i == 100)
    assert torch.equal(a[:100], b[:100])
    assert (a[100] - b[100]).abs().max() < 0.1 * voiced.idle_bound.max()


def test_pose_scale_comes_from_the_clip_and_sizes_the_idle_motion():
    clip = _clip(40)
    src = PoseSource(_rest(), clip_poses=clip, mode="idle", seed=4)
    assert torch.allclose(src.pose_scale, clip.double().std(0).float())
    small = PoseSource(torch.zeros(6), mode="idle", seed=4, pose_scale=torch.full((6,), 0.1))
    large = PoseSource(torch.zeros(6), mode="idle", seed=4, pose_scale=torch.full((6,), 0.3))
    assert torch.allclose(_run(large, 100), 3 * _run(small, 100), atol=1e-6)
    assert torch.equal(PoseSource(_rest()).pose_scale, torch.full((6,), 0.1))


# ------------------------------------------------------------------------------------------ mode switches


def test_switch_to_clip_cross_fades_then_plays_the_clip():
    rest = _rest()
    clip = _clip(9) + 1.0  # far from the rest pose: a direct switch would jump by ~1
    src = PoseSource(rest, mode="idle", seed=9)
    before = _run(src, 60)
    src.set_mode("clip", clip)
    assert src.mode == "clip" and src.fading
    after = _run(src, 40)
    poses = torch.cat([before, after])
    jump = (clip[0] - before[-1]).abs()
    assert (jump > 0.5).all()
    steps = (poses[1:] - poses[:-1]).abs()
    # smoothstep over 8 frames moves at most 1.5/8 of the gap per frame, plus the sources' own motion
    bound = jump * 1.5 / FADE + (clip[1:] - clip[:-1]).abs().max(0).values + _idle_step_bound(src) + 0.05
    assert (steps <= bound).all(), steps.max(0).values
    assert (steps.max(0).values < 0.5 * jump).all()
    assert not src.fading
    # the clip ran during the fade: from the 8th frame on, exactly the ping-pong sequence
    assert torch.equal(after[FADE - 1:], pingpong(clip, 40)[FADE - 1:])
    assert not torch.equal(after[FADE - 2], pingpong(clip, 40)[FADE - 2])


def test_switch_to_still_and_back_to_idle_is_smooth():
    rest = _rest()
    clip = _clip(5) - 0.8
    src = PoseSource(rest, clip_poses=clip, mode="clip")
    a = _run(src, 13)
    src.set_mode("still")
    b = _run(src, 20)
    assert torch.equal(b[FADE - 1:], rest.expand(20 - FADE + 1, 6))
    src.set_mode("idle")
    c = _run(src, 20)
    poses = torch.cat([a, b, c])
    steps = (poses[1:] - poses[:-1]).abs()
    gap = (clip - rest).abs().max(0).values
    assert (steps <= gap * 1.5 / FADE + (clip[1:] - clip[:-1]).abs().max(0).values + 1e-5).all()


def test_interrupted_fade_stays_continuous():
    rest = _rest()
    src = PoseSource(rest, clip_poses=_clip(6) + 1.0, mode="still")
    a = _run(src, 5)
    src.set_mode("clip")
    b = _run(src, 3)
    src.set_mode("idle")  # mid-fade: fades out from where it stands
    c = _run(src, 20)
    poses = torch.cat([a, b, c])
    steps = (poses[1:] - poses[:-1]).abs().max(0).values
    assert (steps < 0.35).all(), steps  # the clip is ~1 away: a jump would be ~1
    assert src.mode == "idle" and not src.fading
    assert ((c[-1] - rest).abs() <= src.idle_bound + 1e-6).all()


def test_setting_the_same_mode_changes_nothing():
    src = PoseSource(_rest(), clip_poses=_clip(5), mode="clip")
    ref = PoseSource(_rest(), clip_poses=_clip(5), mode="clip")
    a = [src.next()]
    src.set_mode("clip")
    a += [src.next() for _ in range(12)]
    assert not src.fading
    assert torch.equal(torch.stack(a), _run(ref, 13))


def test_switch_before_the_first_frame_needs_no_fade():
    src = PoseSource(_rest(), clip_poses=_clip(4), mode="idle")
    src.set_mode("clip")
    assert torch.equal(_run(src, 10), pingpong(_clip(4), 10))


def test_fade_length_is_configurable():
    src = PoseSource(_rest(), clip_poses=_clip(4) + 1, mode="still", fade_ms=120)
    assert src.fade_frames == 3
    src.next()
    src.set_mode("clip")
    after = _run(src, 6)
    assert torch.equal(after[2:], pingpong(_clip(4) + 1, 6)[2:])


# ------------------------------------------------------------------------------------------ expression


def _exp(seed: int) -> torch.Tensor:
    return torch.randn(1, 10, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("curve", ["linear", "smoothstep"])
def test_expression_blends_to_the_target_in_8_frames_monotonically(curve):
    rest, happy = _exp(0), _exp(1)
    state = ExpressionState(rest, curve=curve)
    assert torch.equal(state.next(), rest) and state.settled  # no emotion: the avatar's own expression
    state.set_emotion(happy)
    assert not state.settled
    frames = [state.next() for _ in range(FADE)]
    assert state.settled
    assert all(f.shape == (1, 10) and f.dtype == torch.float32 for f in frames)
    assert torch.equal(frames[-1], happy)
    assert not any(torch.equal(f, happy) for f in frames[:-1])
    assert len({f.numpy().tobytes() for f in frames}) == FADE  # exactly one distinct value per frame
    seq = torch.cat([rest] + frames)  # the blend starts from the rest expression
    d = (seq[1:] - seq[:-1]) * torch.sign(happy - rest)
    assert (d >= 0).all(), "blend must be monotone per coefficient"
    # no frame moves more than ~1/5 of the way (linear: 1/8; smoothstep: at most 1.5/8)
    assert ((seq[1:] - seq[:-1]).abs() <= 0.2 * (happy - rest).abs() + 1e-6).all()
    if curve == "linear":
        assert torch.allclose(frames[3], rest + 0.5 * (happy - rest), atol=1e-6)


def test_expression_is_bit_identical_after_settling():
    state = ExpressionState(_exp(0), emotion=_exp(1), intensity=1.3)
    state.set_emotion(_exp(2), intensity=0.7)
    [state.next() for _ in range(FADE)]
    settled = [state.next() for _ in range(20)]
    assert state.settled
    assert all(s.numpy().tobytes() == settled[0].numpy().tobytes() for s in settled)
    assert torch.allclose(settled[0], _exp(0) + 0.7 * (_exp(2) - _exp(0)), atol=1e-6)
    settled[0].add_(1.0)  # callers cannot corrupt the state
    assert torch.equal(state.next(), settled[1])


def test_expression_intensity():
    rest, angry = _exp(0), _exp(3)
    zero = ExpressionState(rest, emotion=angry, intensity=0.0)
    assert torch.equal(zero.next(), rest)
    state = ExpressionState(rest, emotion=angry)
    assert torch.equal(state.next(), angry)
    state.set_intensity(2.0)
    frames = [state.next() for _ in range(FADE)]
    assert torch.allclose(frames[-1], rest + 2 * (angry - rest), atol=1e-6)
    assert (frames[0] - angry).abs().max() < (frames[-1] - angry).abs().max()  # blended, not a jump
    state.set_intensity(0.0, blend_ms=0)
    assert state.settled and torch.equal(state.next(), rest)


def test_expression_retarget_mid_blend_starts_from_the_current_value():
    rest, a, b = _exp(0), _exp(1), _exp(2)
    state = ExpressionState(rest, curve="linear")
    state.set_emotion(a)
    mid = [state.next() for _ in range(4)][-1]
    state.set_emotion(b)
    frames = [state.next() for _ in range(FADE)]
    assert torch.allclose(frames[0], mid + (b - mid) / FADE, atol=1e-6)
    assert torch.equal(frames[-1], b)


def test_expression_back_to_none_blends_to_rest():
    rest, sad = _exp(0), _exp(4)
    state = ExpressionState(rest, emotion=sad)
    assert torch.equal(state.next(), sad)
    state.set_emotion(None)
    frames = [state.next() for _ in range(FADE)]
    assert torch.equal(frames[-1], rest) and state.settled and torch.equal(state.next(), rest)
    assert (frames[-2] - rest).abs().max() < (frames[0] - rest).abs().max()
    state.set_emotion(None)  # already there: no blend
    assert state.settled


def test_same_emotion_again_does_not_blend():
    state = ExpressionState(_exp(0), emotion=_exp(1))
    state.next()
    state.set_emotion(_exp(1))
    assert state.settled and torch.equal(state.next(), _exp(1))


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "make",
    [
        lambda: PoseSource(torch.zeros(5)),
        lambda: PoseSource(torch.zeros(2, 6)),
        lambda: PoseSource(torch.zeros(6), clip_poses=torch.zeros(4, 5)),
        lambda: PoseSource(torch.zeros(6), clip_poses=torch.zeros(6)),
        lambda: PoseSource(torch.zeros(6), clip_poses=torch.zeros(0, 6)),
        lambda: PoseSource(torch.full((6,), float("nan"))),
        lambda: PoseSource(torch.zeros(6), mode="clip"),
        lambda: PoseSource(torch.zeros(6), mode="nod"),
        lambda: PoseSource(torch.zeros(6)).set_mode("clip"),
        lambda: PoseSource(torch.zeros(6)).set_mode("clip", torch.zeros(3, 7)),
        lambda: PoseSource(torch.zeros(6), pose_scale=-torch.ones(6)),
        lambda: ExpressionState(torch.zeros(1, 9)),
        lambda: ExpressionState(torch.zeros(10)).set_emotion(torch.zeros(2, 10)),
        lambda: ExpressionState(torch.zeros(10)).set_emotion(torch.zeros(1, 10), intensity=2.5),
        lambda: ExpressionState(torch.zeros(10)).set_emotion(torch.zeros(1, 10), intensity=-0.1),
        lambda: ExpressionState(torch.zeros(10)).set_intensity(float("nan")),
        lambda: ExpressionState(torch.zeros(10)).set_emotion(None, blend_ms=-1),
        lambda: ExpressionState(torch.zeros(10), curve="cubic"),
    ],
)
def test_invalid_input_raises_a_one_line_input_error(make):
    with pytest.raises(InputError) as e:
        make()
    msg = str(e.value)
    assert msg and "\n" not in msg


def test_unknown_mode_lists_the_modes():
    with pytest.raises(InputError, match="nod") as e:
        PoseSource(_rest()).set_mode("nod")
    assert all(m in str(e.value) for m in MODES)


def test_shape_errors_name_the_shapes():
    with pytest.raises(InputError, match=r"\[N,6\].*\[4, 5\]"):
        PoseSource(_rest(), clip_poses=torch.zeros(4, 5))
    with pytest.raises(InputError, match=r"intensity.*2\.5"):
        ExpressionState(_exp(0)).set_intensity(2.5)
