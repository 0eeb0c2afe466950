"""What a peer may send: the session options of its offer and the messages of its ``control`` data channel.

Both are parsed once, here, into typed values; one set of checks (numbers and their ranges, pose
modes, emotion and avatar names) serves both. A bad field or value raises a one-line
:class:`~edtalk.errors.InputError` naming it. The session only dispatches on the typed message.

Control messages are JSON objects with a ``type``::

    {"type": "emotion", "name": "happy", "intensity": 1.2}    name null/"" = no expression; intensity optional
    {"type": "intensity", "value": 0.8}
    {"type": "pose", "mode": "idle"}                          still | clip | idle
    {"type": "pause"} {"type": "resume"} {"type": "interrupt"} {"type": "stats"} {"type": "bye"}

Each is answered with ``{"type": "ok" | "stats", "for": <type>, "stats": {...}}`` or
``{"type": "error", "error": "..."}``. Unknown extra fields are ignored. The server also sends events of its
own on the channel, errors with a ``code`` (:func:`render_failed_event`). A message is at most
:data:`MAX_CONTROL_BYTES` of UTF-8 JSON, nested at most :data:`~edtalk_live.realtime.limits.MAX_JSON_DEPTH`
deep; error messages quote at most an excerpt of the input (:func:`~edtalk_live.realtime.limits.excerpt`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from edtalk_live.avatar.motion import MAX_INTENSITY
from edtalk_live.avatar.motion import MODES as POSE_MODES
from edtalk_live.edtalk.errors import InputError
from edtalk_live.realtime.limits import excerpt, loads_bounded

#: the largest control message (bytes of UTF-8)
MAX_CONTROL_BYTES = 64 * 1024
INTENSITY_RANGE = (0.0, MAX_INTENSITY)      # the same range as render --intensity


@dataclass(frozen=True)
class Choices:
    """What this server offers; the name checks of offers and control messages read it."""

    avatars: tuple[str, ...] = ()
    emotions: tuple[str, ...] = ()
    has_clip: bool = False           # a pose clip was given to the server (pose mode ``clip``)
    has_expression: bool = True      # the model has expression control (not the lip_pose family)
    rtmp_targets: tuple[str, ...] = ()   # names of the RTMP targets configured on the server (never their URLs)


# ------------------------------------------------------------------------------------------ shared checks


def check_number(value: Any, name: str, lo: float, hi: float) -> float:
    """``value`` as a finite float in ``[lo, hi]``."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {excerpt(value)}")
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name} must be a number, got {excerpt(value)}") from None
    if not (math.isfinite(x) and lo <= x <= hi):
        raise InputError(f"{name} must be between {lo:g} and {hi:g}, got {excerpt(value)}")
    return x


def check_intensity(value: Any) -> float:
    return check_number(value, "intensity", *INTENSITY_RANGE)


def check_emotion(name: Any, choices: Choices) -> str | None:
    """An emotion preset name, or ``None`` (no expression) for ``None`` / ``""``."""
    if not choices.has_expression:
        raise InputError("this model (lip_pose family) has no expression control")
    name = name or None
    if name is not None and name not in choices.emotions:
        raise InputError(f"unknown emotion {excerpt(name)}; available: {', '.join(choices.emotions) or 'none'}")
    return name


def check_pose_mode(mode: Any, choices: Choices) -> str:
    if mode not in POSE_MODES:
        raise InputError(f"unknown pose mode {excerpt(mode)}; choose one of {', '.join(POSE_MODES)}")
    if mode == "clip" and not choices.has_clip:
        raise InputError("pose mode 'clip' needs a pose clip on the server (serve --pose-video)")
    return mode


def check_avatar(name: Any, choices: Choices) -> str:
    """An avatar name; empty or missing means the first avatar."""
    if not choices.avatars:
        raise InputError("the server has no avatar")
    avatar = name or choices.avatars[0]
    if avatar not in choices.avatars:
        raise InputError(f"unknown avatar {excerpt(avatar)}; available: {', '.join(choices.avatars)}")
    return avatar


def check_rtmp_target(name: Any, choices: Choices) -> str | None:
    """The name of an RTMP target configured on the server, or ``None`` (no RTMP output) for ``None`` / ``""``.

    A client chooses a target by name only: a URL is never taken from a client (it is an unknown name).
    """
    if name is None or name == "":
        return None
    if not isinstance(name, str) or name not in choices.rtmp_targets:
        available = ", ".join(choices.rtmp_targets) or "none (serve --rtmp-target NAME=URL configures them)"
        raise InputError(f"unknown RTMP target {excerpt(name)}; available: {available}")
    return name


#: where a session's speech may come from (session option ``input``)
INPUTS: tuple[str, ...] = ("mic", "push")


def check_input(value: Any) -> str:
    if value not in INPUTS:
        raise InputError(f"unknown input {excerpt(value)}; choose one of {', '.join(INPUTS)}")
    return value


# ------------------------------------------------------------------------------------------ session options


@dataclass(frozen=True)
class SessionOptions:
    """What a peer may choose for its session (JSON fields of the offer)."""

    avatar: str = ""
    emotion: str | None = None
    intensity: float = 1.0
    pose: str = "idle"
    low_latency: bool = False
    probe: bool = False          # paint each frame's index into its top rows (latency measurements)
    paste_back: bool = False     # stream the avatar's whole photo with the face blended back in
    rtmp: str | None = None      # push the session to this RTMP target of the server too (a name, never a URL)
    #: where the speech comes from: "mic" (the peer's audio track) or "push" (a bot's TTS audio, pushed over the
    #: session's speech socket, :mod:`edtalk_live.realtime.pushsocket`; a microphone track is then ignored)
    input: str = "mic"

    FIELDS: ClassVar[tuple[str, ...]] = ("avatar", "emotion", "intensity", "pose", "low_latency", "probe",
                                         "paste_back", "rtmp", "input")

    @classmethod
    def parse(cls, data: dict[str, Any], choices: Choices) -> SessionOptions:
        """Validate the offer's options; raises :class:`InputError` naming the bad field or value."""
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise InputError(f"unknown session option {excerpt(unknown[0])}; known: {', '.join(cls.FIELDS)}")
        emotion = data.get("emotion") or None
        return cls(avatar=check_avatar(data.get("avatar"), choices),
                   # a model without expressions accepts "no emotion" in an offer
                   emotion=None if emotion is None else check_emotion(emotion, choices),
                   intensity=check_intensity(data.get("intensity", 1.0)),
                   pose=check_pose_mode(data.get("pose", "idle"), choices),
                   low_latency=bool(data.get("low_latency", False)), probe=bool(data.get("probe", False)),
                   paste_back=bool(data.get("paste_back", False)),
                   rtmp=check_rtmp_target(data.get("rtmp"), choices),
                   input=check_input(data.get("input", "mic")))

    @classmethod
    def from_json(cls, data: dict[str, Any], avatars: list[str], emotions: list[str], has_clip: bool,
                  rtmp_targets: Sequence[str] = ()) -> SessionOptions:
        """:meth:`parse` with the server's avatar and emotion names, whether it has a pose clip and the names of
        its RTMP targets."""
        return cls.parse(data, Choices(avatars=tuple(avatars), emotions=tuple(emotions), has_clip=has_clip,
                                       rtmp_targets=tuple(rtmp_targets)))


# ------------------------------------------------------------------------------------------ events

#: ``code`` of the error event a session sends when rendering its frames starts failing
RENDER_FAILED = "render_failed"


def render_failed_event(reason: str, frame: int) -> dict[str, Any]:
    """The one event of a streak of frames the renderer failed on (``reason``: see
    :data:`~edtalk_live.realtime.metrics.RENDER_FAILURE_REASONS`), from video frame ``frame`` on."""
    return {"type": "error", "code": RENDER_FAILED, "reason": reason, "frame": frame,
            "error": f"rendering failed for this session ({reason.replace('_', ' ')}) from frame {frame}: its last "
                     "frame is shown until rendering works again"}


# ------------------------------------------------------------------------------------------ control messages


@dataclass(frozen=True)
class Emotion:
    """Blend to emotion ``name`` (``None``: no expression), at ``intensity`` (``None``: keep the current one)."""

    name: str | None
    intensity: float | None = None
    type: ClassVar[str] = "emotion"


@dataclass(frozen=True)
class Intensity:
    value: float
    type: ClassVar[str] = "intensity"


@dataclass(frozen=True)
class Pose:
    mode: str
    type: ClassVar[str] = "pose"


@dataclass(frozen=True)
class Pause:
    """Mute: the mouth rests and the voice is silent until :class:`Resume`."""

    type: ClassVar[str] = "pause"


@dataclass(frozen=True)
class Resume:
    type: ClassVar[str] = "resume"


@dataclass(frozen=True)
class Interrupt:
    """Drop queued audio and frames at once (an agent cutting its own speech)."""

    type: ClassVar[str] = "interrupt"


@dataclass(frozen=True)
class Stats:
    """Ask for the session's statistics (every reply carries them; this one is typed ``stats``)."""

    type: ClassVar[str] = "stats"


@dataclass(frozen=True)
class Bye:
    """Hang up: the reply is sent, then the server ends the session and closes the peer connection."""

    type: ClassVar[str] = "bye"


ControlMessage = Emotion | Intensity | Pose | Pause | Resume | Interrupt | Stats | Bye

#: control message types, in the order error messages list them
CONTROL_TYPES: tuple[str, ...] = tuple(m.type for m in (Emotion, Intensity, Pose, Pause, Resume, Interrupt, Stats,
                                                            Bye))


def parse_control(raw: str | bytes | dict[str, Any], choices: Choices) -> ControlMessage:
    """One control message (JSON text or an already decoded object) as a typed message.

    Raises :class:`InputError` for anything else: too large, not UTF-8, nested too deep, not JSON, no
    ``type``, an unknown type, or a bad field (the same checks as the offer's options).
    """
    if isinstance(raw, (str, bytes)):
        msg = loads_bounded(raw, "control message", MAX_CONTROL_BYTES)
    else:
        msg = raw
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise InputError('a control message is a JSON object with a "type"')
    kind = msg["type"]
    if kind == "emotion":
        name = check_emotion(msg.get("name"), choices)
        intensity = msg.get("intensity")
        return Emotion(name, None if intensity is None else check_intensity(intensity))
    if kind == "intensity":
        if not choices.has_expression:
            raise InputError("this model (lip_pose family) has no expression control")
        return Intensity(check_intensity(msg.get("value")))
    if kind == "pose":
        return Pose(check_pose_mode(msg.get("mode"), choices))
    simple = {"pause": Pause, "resume": Resume, "interrupt": Interrupt, "stats": Stats, "bye": Bye}
    if kind in simple:
        return simple[kind]()
    raise InputError(f"unknown control message type {excerpt(kind)}; known: {', '.join(CONTROL_TYPES)}")
