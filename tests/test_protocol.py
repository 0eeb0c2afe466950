"""What a peer may send, parsed once: the offer's session options and the control-channel messages."""

from __future__ import annotations

import json

import pytest

from edtalk_live.edtalk.errors import InputError
from edtalk_live.realtime.protocol import (
    CONTROL_TYPES,
    Choices,
    Emotion,
    Intensity,
    Interrupt,
    Pause,
    Pose,
    Resume,
    SessionOptions,
    Stats,
    parse_control,
)

CHOICES = Choices(avatars=("face", "other"), emotions=("happy", "sad"), has_clip=False)


def test_control_messages_parse_to_typed_messages():
    assert parse_control('{"type": "emotion", "name": "sad", "intensity": 1.5}', CHOICES) == Emotion("sad", 1.5)
    assert parse_control({"type": "emotion", "name": ""}, CHOICES) == Emotion(None, None)
    assert parse_control(b'{"type": "intensity", "value": 0}', CHOICES) == Intensity(0.0)
    assert parse_control({"type": "pose", "mode": "still", "extra": 1}, CHOICES) == Pose("still")
    for kind, cls in (("pause", Pause), ("resume", Resume), ("interrupt", Interrupt), ("stats", Stats)):
        msg = parse_control(json.dumps({"type": kind}), CHOICES)
        assert msg == cls() and msg.type == kind
    assert CONTROL_TYPES == ("emotion", "intensity", "pose", "pause", "resume", "interrupt", "stats", "bye")


@pytest.mark.parametrize(("raw", "error"), [
    ("not json {", "control message is not valid JSON"),
    (b"\xff\xfe", "control message must be UTF-8 text"),
    ("[" * 10_000 + "]" * 10_000, "control message nested deeper than 16 levels"),
    (" " * (64 * 1024 + 1), "control message larger than 65536 bytes"),
    ({"type": "emotion", "name": "x" * 100_000}, "unknown emotion 'xxxxxxxx"),
    ({"type": "intensity", "value": [[1]]}, "intensity must be a number, got <list of 1>"),
    ("[1, 2]", 'a control message is a JSON object with a "type"'),
    ({"type": 3}, 'a control message is a JSON object with a "type"'),
    ({"type": "dance"}, "unknown control message type 'dance'; known: emotion, intensity, pose, pause, resume, "
                        "interrupt, stats"),
    ({"type": "emotion", "name": "ecstatic"}, "unknown emotion 'ecstatic'; available: happy, sad"),
    ({"type": "emotion", "name": "sad", "intensity": 3}, "intensity must be between 0 and 2, got 3"),
    ({"type": "intensity", "value": 5}, "intensity must be between 0 and 2, got 5"),
    ({"type": "intensity", "value": "loud"}, "intensity must be a number, got 'loud'"),
    ({"type": "intensity", "value": float("nan")}, "intensity must be between 0 and 2"),
    ({"type": "intensity"}, "intensity must be a number, got None"),
    ({"type": "pose", "mode": "dance"}, "unknown pose mode 'dance'; choose one of still, clip, idle"),
    ({"type": "pose", "mode": "clip"}, "pose mode 'clip' needs a pose clip on the server (serve --pose-video)"),
])
def test_bad_control_messages_raise_one_line_errors(raw, error):
    with pytest.raises(InputError) as e:
        parse_control(raw, CHOICES)
    assert error in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 200


def test_choices_decide_what_is_allowed():
    assert parse_control({"type": "pose", "mode": "clip"}, Choices(has_clip=True)) == Pose("clip")
    no_expression = Choices(emotions=("happy",), has_expression=False)
    for msg in ({"type": "emotion", "name": "happy"}, {"type": "intensity", "value": 1}):
        with pytest.raises(InputError, match="has no expression control"):
            parse_control(msg, no_expression)


def test_offer_options_use_the_same_checks():
    opts = SessionOptions.parse({"avatar": "other", "emotion": "happy", "intensity": "0.5", "pose": "still",
                                 "probe": 1}, CHOICES)
    assert opts == SessionOptions(avatar="other", emotion="happy", intensity=0.5, pose="still", probe=True)
    assert SessionOptions.parse({}, CHOICES) == SessionOptions(avatar="face")
    assert SessionOptions.from_json({"emotion": "sad"}, ["a"], ["sad"], has_clip=False).emotion == "sad"
    for data, error in (({"colour": "red"}, "unknown session option 'colour'"),
                        ({"avatar": "nobody"}, "unknown avatar 'nobody'; available: face, other"),
                        ({"emotion": "ecstatic"}, "unknown emotion 'ecstatic'; available: happy, sad"),
                        ({"intensity": 2.5}, "intensity must be between 0 and 2, got 2.5"),
                        ({"intensity": True}, "intensity must be a number, got True"),
                        ({"pose": "clip"}, "pose mode 'clip' needs a pose clip"),
                        ({"pose": "wobble"}, "unknown pose mode 'wobble'")):
        with pytest.raises(InputError, match=error):
            SessionOptions.parse(data, CHOICES)
