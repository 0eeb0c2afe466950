"""Per-session head pose and expression generators for the streaming server (one value per 25 fps frame).

Pure torch/NumPy and synchronous: a session calls ``next()`` once per video frame, from whatever task or
thread produces its frames.

* :class:`PoseSource` gives pose coefficients ``[6]``: the avatar's own pose (``still``), a driving clip's
  pre-read coefficients played forward and backward (``clip``), or a built-in idle motion (``idle``:
  smooth, small, livelier while speaking). Switching mode cross-fades over about 300 ms, never jumps.
* :class:`ExpressionState` gives expression coefficients ``[1,10]`` (the avatar's own expression when no
  emotion is chosen, as ``render`` does): an emotion at an intensity, changes blended over about 300 ms in a fixed
  number of steps, then the exact same target every frame so the renderer's per-expression cache hits.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from edtalk_live.avatar.prepare import effective_expression
from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.timing import FPS as VIDEO_FPS

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_POSE_SCALE",
    "EXP_DIM",
    "MODES",
    "POSE_DIM",
    "ExpressionState",
    "IdleMotion",
    "PoseSource",
    "blend_frames",
]

POSE_DIM = 6
EXP_DIM = 10
FPS = float(VIDEO_FPS)
MODES = ("still", "clip", "idle")
CURVES = ("linear", "smoothstep")
MAX_INTENSITY = 2.0
# Per-coefficient spread of head pose used to size the idle motion when no driving clip gives one.
DEFAULT_POSE_SCALE = (0.1,) * POSE_DIM


def blend_frames(ms: float, fps: float = FPS) -> int:
    """Number of frames a blend of ``ms`` milliseconds takes at ``fps`` (300 ms at 25 fps -> 8; 0 ms -> 0)."""
    if not math.isfinite(ms) or ms < 0:
        raise InputError(f"blend time must be a finite number of milliseconds >= 0, got {ms}")
    if not math.isfinite(fps) or fps <= 0:
        raise InputError(f"fps must be a positive number, got {fps}")
    return 0 if ms == 0 else max(1, round(ms * fps / 1000.0))


def check_intensity(intensity: float) -> float:
    """An emotion's intensity as a float in ``[0, 2]``, or a one-line :class:`InputError`."""
    try:
        x = float(intensity)
    except (TypeError, ValueError) as e:
        raise InputError(f"intensity must be a number in [0, {MAX_INTENSITY:g}], got {intensity!r}") from e
    if not 0.0 <= x <= MAX_INTENSITY:  # also rejects NaN
        raise InputError(f"intensity must be in [0, {MAX_INTENSITY:g}], got {intensity!r}")
    return x


def _smoothstep(x: float) -> float:
    return x * x * (3.0 - 2.0 * x)


def _ease(x: float, curve: str) -> float:
    return x if curve == "linear" else _smoothstep(x)


def _coeffs(t, shape: tuple[int | None, ...], what: str) -> torch.Tensor:
    """``t`` as a finite float32 CPU tensor of ``shape`` (``None`` = any length >= 1), or :class:`InputError`."""
    try:
        t = torch.as_tensor(t).detach().to("cpu", torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{what} must be a tensor of shape {_shape_str(shape)}, got {type(t).__name__}") from e
    if t.ndim != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape, strict=True)):
        raise InputError(f"{what} must have shape {_shape_str(shape)}, got {list(t.shape)}")
    if t.numel() == 0:
        raise InputError(f"{what} is empty (shape {list(t.shape)})")
    if not torch.isfinite(t).all():
        raise InputError(f"{what} contains NaN or infinite values")
    return t.clone()


def _shape_str(shape: tuple[int | None, ...]) -> str:
    return "[" + ",".join("N" if s is None else str(s) for s in shape) + "]"


def _check_curve(curve: str) -> str:
    if curve not in CURVES:
        raise InputError(f"unknown blend curve {curve!r}; choose one of {', '.join(CURVES)}")
    return curve


# ------------------------------------------------------------------------------------------ idle motion


class IdleMotion:
    """Smooth, small, natural head motion: an offset ``[6]`` added to the avatar's rest pose.

    Each coefficient is a sum of ``components`` sinusoids with seeded frequencies in
    ``[min_hz, max_hz]`` (log-uniform, lower ones stronger) and seeded phases; the weights sum to one,
    so the offset never exceeds ``amplitude * voiced_gain * scale`` per coefficient. While speaking
    (``voiced``) a liveliness level ramps towards 1 with time constant ``tau_s`` (and back to 0 when
    silent); it raises the amplitude up to ``voiced_gain`` times and the speed up to ``voiced_speed``
    times. Phases are integrated, so speed changes never jump; ``scale`` changes are eased in the same way.
    Deterministic given ``seed``.
    """

    def __init__(
        self,
        scale: torch.Tensor,
        seed: int = 0,
        fps: float = FPS,
        amplitude: float = 0.5,
        voiced_gain: float = 1.6,
        voiced_speed: float = 1.5,
        tau_s: float = 0.5,
        components: int = 3,
        min_hz: float = 0.05,
        max_hz: float = 0.5,
    ):
        for name, v, lo in (("amplitude", amplitude, 0.0), ("voiced_gain", voiced_gain, 1.0),
                            ("voiced_speed", voiced_speed, 1.0), ("tau_s", tau_s, 0.0)):
            if not math.isfinite(v) or v < lo:
                raise InputError(f"idle {name} must be a finite number >= {lo}, got {v}")
        if not 0 < min_hz <= max_hz or not math.isfinite(max_hz):
            raise InputError(f"idle frequencies need 0 < min_hz <= max_hz, got {min_hz}..{max_hz}")
        if components < 1:
            raise InputError(f"idle motion needs at least one component, got {components}")
        if not math.isfinite(fps) or fps <= 0:
            raise InputError(f"fps must be a positive number, got {fps}")
        self.fps = float(fps)
        self.amplitude = float(amplitude)
        self.voiced_gain = float(voiced_gain)
        self.voiced_speed = float(voiced_speed)
        self.tau_s = float(tau_s)
        self.max_hz = float(max_hz)
        self._target_scale = self._check_scale(scale).double().numpy()
        self._scale = self._target_scale.copy()
        rng = np.random.default_rng(seed)
        shape = (POSE_DIM, components)
        self._freq = np.exp(rng.uniform(math.log(min_hz), math.log(max_hz), shape))  # Hz
        self._phase = rng.uniform(0.0, 2.0 * math.pi, shape)
        weight = rng.uniform(0.5, 1.0, shape) / np.sqrt(self._freq / min_hz)  # slower = larger
        self._weight = weight / weight.sum(axis=1, keepdims=True)
        self._alpha = 1.0 if tau_s == 0 else 1.0 - math.exp(-1.0 / (self.fps * tau_s))
        self.energy = 0.0  # liveliness in [0, 1]

    @staticmethod
    def _check_scale(scale) -> torch.Tensor:
        scale = _coeffs(scale, (POSE_DIM,), "pose scale")
        if (scale < 0).any():
            raise InputError(f"pose scale must be >= 0, got {scale.tolist()}")
        return scale

    @property
    def scale(self) -> torch.Tensor:
        """Per-coefficient pose spread ``[6]`` the motion is sized to (the target, when easing to a new one)."""
        return torch.from_numpy(self._target_scale).float()

    @scale.setter
    def scale(self, scale: torch.Tensor) -> None:
        self._target_scale = self._check_scale(scale).double().numpy()

    @property
    def bound(self) -> torch.Tensor:
        """Largest possible offset ``|offset| [6]`` (with the largest of the current and target scale)."""
        return torch.from_numpy(self.amplitude * self.voiced_gain * np.maximum(self._scale, self._target_scale)).float()

    def next(self, voiced: bool) -> torch.Tensor:
        """Advance one frame and return the offset ``[6]`` (float32) to add to the rest pose."""
        self.energy += self._alpha * ((1.0 if voiced else 0.0) - self.energy)
        self._scale += self._alpha * (self._target_scale - self._scale)
        speed = 1.0 + (self.voiced_speed - 1.0) * self.energy
        self._phase = (self._phase + 2.0 * math.pi * self._freq * speed / self.fps) % (2.0 * math.pi)
        gain = self.amplitude * (1.0 + (self.voiced_gain - 1.0) * self.energy)
        offset = gain * self._scale * (self._weight * np.sin(self._phase)).sum(axis=1)
        return torch.from_numpy(offset).float()


# ------------------------------------------------------------------------------------------ head pose


@dataclass
class _Stream:
    """One pose source: ``still`` (rest pose), ``clip`` (ping-pong over ``clip`` from frame ``k``),
    ``idle`` (rest + the shared idle offset) or ``hold`` (a fixed pose, used when a fade is interrupted)."""

    kind: str
    clip: torch.Tensor | None = None
    pose: torch.Tensor | None = None
    k: int = 0

    def next(self, rest: torch.Tensor, idle_offset: torch.Tensor) -> torch.Tensor:
        if self.kind == "still":
            return rest
        if self.kind == "idle":
            return rest + idle_offset
        if self.kind == "hold":
            return self.pose
        n = self.clip.shape[0]
        k, self.k = self.k, self.k + 1
        if n == 1:
            return self.clip[0]
        period = 2 * n - 2
        k %= period
        if k >= n:
            k = period - k
        return self.clip[k]


class PoseSource:
    """Head pose coefficients ``[6]``, one per 25 fps frame, for one session.

    ``rest_pose [6]`` (or ``[1,6]``) is the avatar's own pose, read from the identity image;
    ``clip_poses [N,6]`` the pose coefficients of a driving clip, read once. Modes:

    * ``still``: ``rest_pose`` exactly, every frame;
    * ``clip``: the clip forward then backward (frames ``0..N-1, N-2..1, 0, ..``), endlessly, as
      ``edtalk_live.avatar.driving.pingpong``;
    * ``idle``: ``rest_pose`` plus :class:`IdleMotion` (smooth, small, livelier while ``voiced``),
      sized by :attr:`pose_scale` (the clip's per-coefficient std when a clip was given).

    :meth:`set_mode` cross-fades (smoothstep over ``fade_ms``, 8 frames at 300 ms and 25 fps) from the
    source that was playing to the new one, both still running, so there is no jump. The idle motion runs
    in the background every frame, so its liveliness is current whenever it is switched in.
    """

    def __init__(
        self,
        rest_pose: torch.Tensor,
        clip_poses: torch.Tensor | None = None,
        mode: str = "still",
        seed: int = 0,
        fps: float = FPS,
        fade_ms: float = 300.0,
        pose_scale: torch.Tensor | None = None,
        idle_amplitude: float = 0.5,
        **idle_options,
    ):
        """``pose_scale [6]`` overrides the idle-motion spread; ``idle_options`` go to :class:`IdleMotion`."""
        rest = torch.as_tensor(rest_pose)
        if rest.ndim == 2 and rest.shape[0] == 1:
            rest = rest[0]
        self._rest = _coeffs(rest, (POSE_DIM,), "rest pose")
        self.fps = float(fps)
        self.fade_frames = blend_frames(fade_ms, fps)
        self._clip = None if clip_poses is None else self._check_clip(clip_poses)
        self._explicit_scale = pose_scale is not None
        scale = pose_scale if pose_scale is not None else self._scale_from(self._clip)
        self._idle = IdleMotion(scale, seed=seed, fps=fps, amplitude=idle_amplitude, **idle_options)
        self._stream = self._new_stream(self._check_mode(mode))
        self._mode = mode
        self._from: _Stream | None = None  # the stream fading out, while a fade runs
        self._fade_j = 0
        self._last: torch.Tensor | None = None

    # -------------------------------------------------------------------- checks and helpers
    @staticmethod
    def _check_mode(mode: str) -> str:
        if mode not in MODES:
            raise InputError(f"unknown pose mode {mode!r}; choose one of {', '.join(MODES)}")
        return mode

    @staticmethod
    def _check_clip(clip: torch.Tensor) -> torch.Tensor:
        return _coeffs(clip, (None, POSE_DIM), "clip poses")

    @staticmethod
    def _scale_from(clip: torch.Tensor | None) -> torch.Tensor:
        """Per-coefficient std of a clip (where it moves at all), else :data:`DEFAULT_POSE_SCALE`."""
        default = torch.tensor(DEFAULT_POSE_SCALE, dtype=torch.float32)
        if clip is None or clip.shape[0] < 2:
            return default
        std = clip.double().std(dim=0).float()
        return torch.where(std > 1e-6, std, default)

    def _new_stream(self, mode: str) -> _Stream:
        if mode == "clip":
            if self._clip is None:
                raise InputError("pose mode 'clip' needs clip poses [N,6]; none were given")
            return _Stream("clip", clip=self._clip)
        return _Stream(mode)

    # -------------------------------------------------------------------- public API
    @property
    def mode(self) -> str:
        """The current mode (the one being faded to, during a fade)."""
        return self._mode

    @property
    def rest_pose(self) -> torch.Tensor:
        """The avatar's own pose ``[6]``."""
        return self._rest.clone()

    @property
    def pose_scale(self) -> torch.Tensor:
        """Per-coefficient pose spread ``[6]`` that sizes the idle motion."""
        return self._idle.scale

    @property
    def idle_bound(self) -> torch.Tensor:
        """Largest possible distance ``[6]`` of an idle-mode pose from the rest pose."""
        return self._idle.bound

    @property
    def fading(self) -> bool:
        """True while a mode switch is being cross-faded."""
        return self._from is not None

    def set_mode(self, mode: str, clip_poses: torch.Tensor | None = None) -> None:
        """Switch to ``mode`` (``still``, ``clip``, ``idle``), cross-fading from the current pose.

        ``clip_poses [N,6]`` replaces the driving clip (and, unless a ``pose_scale`` was given at
        construction, the idle-motion spread, eased in); a new clip plays from its first frame.
        Setting the mode that is already playing, with no new clip, changes nothing.
        """
        self._check_mode(mode)
        clip = None if clip_poses is None else self._check_clip(clip_poses)
        if clip is not None:
            self._clip = clip
            if not self._explicit_scale:
                self._idle.scale = self._scale_from(clip)
        if mode == self._mode and (clip is None or mode != "clip"):
            return  # nothing to switch (a new clip is kept for later)
        new = self._new_stream(mode)
        if self._last is not None and self.fade_frames > 0:
            # a fade interrupted by another switch fades out from where it stands
            self._from = self._stream if self._from is None else _Stream("hold", pose=self._last)
            self._fade_j = 0
        else:
            self._from = None
        logger.debug("pose mode %s -> %s", self._mode, mode)
        self._stream = new
        self._mode = mode

    def next(self, voiced: bool = False) -> torch.Tensor:
        """The pose ``[6]`` (float32) for the next frame; ``voiced`` (speech in this frame) livens idle motion."""
        offset = self._idle.next(bool(voiced))
        pose = self._stream.next(self._rest, offset)
        if self._from is not None:
            old = self._from.next(self._rest, offset)
            self._fade_j += 1
            if self._fade_j >= self.fade_frames:
                self._from = None
            else:
                w = _smoothstep(self._fade_j / self.fade_frames)
                pose = old + w * (pose - old)
        self._last = pose.clone()
        return pose.clone()


# ------------------------------------------------------------------------------------------ expression


class ExpressionState:
    """Expression coefficients ``[1,10]`` for one session: an emotion at an intensity, blended on change.

    ``rest [1,10]`` (or ``[10]``) is the avatar's own expression, read from the identity image. The
    effective expression of an emotion ``target [1,10]`` at ``intensity`` in ``[0, 2]`` is
    ``rest + intensity * (target - rest)``; ``target=None`` means "no emotion": the avatar's own expression
    ``rest`` (:func:`~edtalk_live.avatar.prepare.effective_expression`, shared with ``render``).

    A change blends from the value last returned to the new one over ``blend_ms`` (8 frames at 300 ms and
    25 fps), along ``curve`` (``linear`` or ``smoothstep``): exactly one value per frame, the last one the
    target itself; after that the very same values every frame, so ``prepare_expression``'s cache hits.
    """

    def __init__(
        self,
        rest: torch.Tensor,
        emotion: torch.Tensor | None = None,
        intensity: float = 1.0,
        fps: float = FPS,
        blend_ms: float = 300.0,
        curve: str = "smoothstep",
    ):
        """Start settled on ``emotion`` (``None``: the avatar's own) at ``intensity``, without a blend."""
        rest = torch.as_tensor(rest)
        if rest.ndim == 1:
            rest = rest[None]
        self._rest = _coeffs(rest, (1, EXP_DIM), "rest expression")
        self.fps = float(fps)
        self.blend_ms = float(blend_ms)
        blend_frames(blend_ms, fps)  # validates both
        self.curve = _check_curve(curve)
        self._emotion = self._check_emotion(emotion)
        self._intensity = check_intensity(intensity)
        self._target = self._effective()  # the effective target
        self._start = self._target  # blend start
        self._steps = 0
        self._j = 0
        self._last = self._target  # the value shown at the last frame (before any: the initial one)

    # -------------------------------------------------------------------- properties
    @property
    def rest(self) -> torch.Tensor:
        """The avatar's own expression ``[1,10]``."""
        return self._rest.clone()

    @property
    def emotion(self) -> torch.Tensor | None:
        """The emotion ``[1,10]`` being shown (or blended to), ``None`` for the avatar's own expression."""
        return None if self._emotion is None else self._emotion.clone()

    @property
    def intensity(self) -> float:
        """The intensity in ``[0, 2]``."""
        return self._intensity

    @property
    def target(self) -> torch.Tensor | None:
        """The effective expression ``[1,10]`` being shown (or blended to)."""
        return self._target.clone()

    @property
    def settled(self) -> bool:
        """True when not blending: every :meth:`next` returns the same value."""
        return self._j >= self._steps

    # -------------------------------------------------------------------- changes
    def set_emotion(self, target: torch.Tensor | None, intensity: float = 1.0, blend_ms: float | None = None) -> None:
        """Show emotion ``target [1,10]`` (or ``[10]``; ``None`` = the avatar's own) at ``intensity`` in ``[0, 2]``,
        blended over ``blend_ms`` (default: the constructor's, 300 ms; 0 = at once)."""
        target = self._check_emotion(target)
        intensity = check_intensity(intensity)
        steps = blend_frames(self.blend_ms if blend_ms is None else blend_ms, self.fps)
        self._emotion, self._intensity = target, intensity
        self._retarget(steps)

    def set_intensity(self, intensity: float, blend_ms: float | None = None) -> None:
        """Change the intensity (in ``[0, 2]``) of the current emotion, blended like :meth:`set_emotion`."""
        intensity = check_intensity(intensity)
        steps = blend_frames(self.blend_ms if blend_ms is None else blend_ms, self.fps)
        self._intensity = intensity
        self._retarget(steps)

    @staticmethod
    def _check_emotion(target) -> torch.Tensor | None:
        if target is None:
            return None
        t = torch.as_tensor(target)
        return _coeffs(t[None] if t.ndim == 1 else t, (1, EXP_DIM), "emotion")

    def _effective(self) -> torch.Tensor:
        return effective_expression(self._rest, self._emotion, self._intensity)

    def _retarget(self, steps: int) -> None:
        new = self._effective()
        current = self._last
        self._target = new
        if torch.equal(new, current) or steps == 0:
            self._steps = self._j = 0
            return
        self._start = current
        self._steps, self._j = steps, 0

    def next(self) -> torch.Tensor:
        """The expression ``[1,10]`` (float32) for the next frame."""
        if self._j < self._steps:
            self._j += 1
            if self._j < self._steps:
                end = self._target
                w = _ease(self._j / self._steps, self.curve)
                self._last = self._start + w * (end - self._start)
                return self._last.clone()
        self._last = self._target
        return self._last.clone()
