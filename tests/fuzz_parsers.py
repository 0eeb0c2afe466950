"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers edtalk-live owns, the ones untrusted bytes reach.

    python tests/fuzz_parsers.py -runs=200000            # or -max_total_time=600; any libFuzzer flag

Targets, picked by the first byte of each input (modulo 6), the rest being the target's input:

0. ``loads_bounded``: the JSON reader of offers and control messages (size, UTF-8, nesting bounds);
1. ``check_offer_sdp``: the SDP bounds checked before aiortc's parser sees an offer;
2. ``parse_control``: a control-channel message (text or bytes) -> a typed message;
3. ``SessionOptions.parse``: an offer's options, from JSON the fuzzer writes;
4. ``read_image``: the avatar image reader (its byte and pixel caps before decoding; PIL decodes);
5. ``parse_sdpfrag``: a WHIP/WHEP trickle ICE PATCH body (its bounds, aiortc's candidate parser).

Each must return or raise :class:`~edtalk_live.edtalk.errors.InputError`, nothing else, and stay fast
(libFuzzer's ``-timeout``, 2 s here by default: these run on a request's path). Any other exception or
a timeout is a crash, which libFuzzer reports with the input that caused it (saved as ``crash-*``).
``tests/test_fuzz.py`` runs this script for a few thousand inputs in CI.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from edtalk_live.edtalk.errors import InputError
    from edtalk_live.media.io import read_image
    from edtalk_live.realtime.limits import check_offer_sdp, loads_bounded
    from edtalk_live.realtime.protocol import Choices, SessionOptions, parse_control
    from edtalk_live.realtime.whip import parse_sdpfrag

CHOICES = Choices(avatars=("default", "anna"), emotions=("happy", "sad"), has_clip=False, rtmp_targets=("live",))
_IMAGE = os.path.join(tempfile.mkdtemp(prefix="edtalk-fuzz-"), "image")


def _loads(payload: bytes) -> None:
    loads_bounded(payload, "fuzzed JSON", 4096)


def _sdp(payload: bytes) -> None:
    # an offer's SDP arrives as a JSON string: any str, lone surrogates (JSON's \\ud800) included
    check_offer_sdp(payload.decode("utf-8", "surrogateescape"))


def _control(payload: bytes) -> None:
    for raw in (payload, payload.decode("utf-8", "surrogateescape")):    # binary and text channel messages
        try:
            parse_control(raw, CHOICES)
        except InputError:
            pass


def _options(payload: bytes) -> None:
    data = loads_bounded(payload, "fuzzed options", 4096)
    if isinstance(data, dict):
        SessionOptions.parse(data, CHOICES)


def _image(payload: bytes) -> None:
    with open(_IMAGE, "wb") as f:
        f.write(payload)
    read_image(_IMAGE)


def _sdpfrag(payload: bytes) -> None:
    parse_sdpfrag(payload.decode("utf-8", "surrogateescape"))


TARGETS = (_loads, _sdp, _control, _options, _image, _sdpfrag)


def one_input(data: bytes) -> None:
    """The first byte picks the target (``tests/test_fuzz.py`` writes seeds that way), the rest is its input."""
    if not data:
        return
    try:
        TARGETS[data[0] % len(TARGETS)](data[1:])
    except InputError:
        pass


def main() -> None:
    args = list(sys.argv)
    if not any(a.startswith("-timeout=") for a in args):
        args.append("-timeout=2")
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
