"""Bounds on what a peer may send, checked before anything expensive reads it.

* :func:`loads_bounded`: JSON text of at most ``max_bytes``, nested at most ``max_depth`` deep, as a
  Python value; anything else raises a one-line :class:`~edtalk_live.edtalk.errors.InputError`
  (never ``RecursionError``: the nesting is measured before ``json.loads`` sees the text).
* :func:`check_offer_sdp`: an SDP offer small and plain enough for aiortc's parser, whose cost grows
  with the square of the duplicated lines (2,000 copies of one ``a=rtpmap`` line took it 30 s, the
  event loop frozen meanwhile). Limits: :data:`SDP_LIMITS`; a DTLS fingerprint and ICE credentials
  are required (an offer without them could never connect, and would hold a session until the
  connect timeout).
* :func:`excerpt`: what an error message may quote of the input (80 characters, one line).
* :class:`TokenBuckets`: a token bucket per key (client address, session), for rate limits.

Each check raises :class:`InputError` naming what is over which limit; callers answer it as a 4xx
(offers) or a ``{"type": "error"}`` reply (control messages).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from edtalk_live.edtalk.errors import InputError

#: characters of the input an error message may quote
EXCERPT_CHARS = 80
#: the deepest JSON nesting accepted (offers and control messages are flat objects)
MAX_JSON_DEPTH = 16


def clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters (ending in ``…`` when cut)."""
    text = " ".join(text[: 4 * limit].split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` as :func:`clip` cuts it: what an error message may quote of the input.

    Containers are not ``repr``-ed whole (a deep one would recurse): only their type and size.
    """
    if isinstance(value, (dict, list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    return clip(repr(value[: limit + 1] if isinstance(value, (str, bytes)) else value), limit)


# what the nesting scan looks at: brackets, and the quotes and backslashes that delimit strings
_JSON_SPECIAL = re.compile(rb'[\[\]{}"\\]')


def json_depth(raw: bytes) -> int:
    """The deepest bracket nesting of JSON text ``raw`` (brackets inside strings not counted).

    Written here because neither ``json`` nor the maintained parsers bound the nesting: ``json.loads``
    recurses per level and raises ``RecursionError`` (or exhausts the C stack) on deep input. One pass
    over the special characters, no recursion, no backtracking; text that is not JSON gets some depth,
    and ``json.loads`` rejects it.
    """
    depth = deepest = 0
    in_string, escaped_at = False, -1
    for m in _JSON_SPECIAL.finditer(raw):
        pos = m.start()
        if pos == escaped_at:
            continue
        c = raw[pos]
        if in_string:
            if c == 0x5C:                       # backslash: the next byte is escaped
                escaped_at = pos + 1
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


def loads_bounded(raw: str | bytes, what: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(raw)`` for untrusted text: at most ``max_bytes`` of UTF-8, nested at most ``max_depth``.

    Raises :class:`InputError` (``what`` names the input) for anything else, never another exception.
    """
    if isinstance(raw, str):
        if len(raw) > max_bytes:        # a character is at least one byte: no need to encode a huge string
            raise InputError(f"{what} larger than {max_bytes} bytes")
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:      # lone surrogates
            raise InputError(f"{what} must be UTF-8 text") from None
    if len(raw) > max_bytes:
        raise InputError(f"{what} larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} must be UTF-8 text") from None
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise InputError(f"{what} nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise InputError(f"{what} is not valid JSON") from None


# ------------------------------------------------------------------------------------------ SDP


@dataclass(frozen=True)
class SdpLimits:
    """How large an offer's SDP may be (a browser's offer has about 100-400 lines, 1-9 sections)."""

    max_lines: int = 1500
    max_line_chars: int = 1024
    max_media: int = 16
    max_formats: int = 128          # payload types of one m-line (each at most one a=rtpmap and one a=fmtp)
    max_rtcp_fb: int = 512          # a=rtcp-fb lines of one media section
    max_candidates: int = 64        # a=candidate lines of one media section
    max_ssrc: int = 64              # a=ssrc lines of one media section
    media_kinds: tuple[str, ...] = ("audio", "video", "application")


SDP_LIMITS = SdpLimits()


def check_offer_sdp(sdp: str, limits: SdpLimits = SDP_LIMITS) -> None:
    """Raise :class:`InputError` unless ``sdp`` is within ``limits`` and has what a WebRTC offer needs.

    Not a validator of SDP (aiortc parses it next, and its errors are answered as a bad offer): only
    the bounds that keep that parse fast, and the attributes without which no session can connect.
    """
    lines = sdp.splitlines()
    if len(lines) > limits.max_lines:
        raise InputError(f"SDP has {len(lines)} lines, at most {limits.max_lines} allowed")
    if not lines or not lines[0].startswith("v="):
        raise InputError(f"SDP must start with v=, got {excerpt(lines[0] if lines else sdp)}")
    sections: list[list[str]] = [[]]                # the session section, then one per m= line
    for n, line in enumerate(lines, 1):
        if len(line) > limits.max_line_chars:
            raise InputError(f"SDP line {n} is {len(line)} characters long, at most {limits.max_line_chars} "
                             "allowed")
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    session, media = sections[0], sections[1:]
    if not media:
        raise InputError("SDP has no media section (m= line)")
    if len(media) > limits.max_media:
        raise InputError(f"SDP has {len(media)} media sections, at most {limits.max_media} allowed")

    def has(section: list[str], prefix: str) -> bool:
        return any(line.startswith(prefix) for line in section)

    for i, section in enumerate(media):
        fields = section[0][2:].split()
        kind = fields[0] if fields else ""
        if kind not in limits.media_kinds:
            raise InputError(f"SDP media section {i} is {excerpt(kind)}: only {', '.join(limits.media_kinds)} "
                             "allowed")
        if len(fields) - 3 > limits.max_formats:
            raise InputError(f"SDP media section {i} lists {len(fields) - 3} formats, at most "
                             f"{limits.max_formats} allowed")
        counts = {"a=candidate:": 0, "a=rtcp-fb:": 0, "a=ssrc:": 0}
        mapped: dict[str, set[str]] = {"a=rtpmap:": set(), "a=fmtp:": set()}
        for line in section[1:]:
            for prefix in counts:
                if line.startswith(prefix):
                    counts[prefix] += 1
            for prefix, seen in mapped.items():
                if line.startswith(prefix):
                    pt = line[len(prefix):].split(" ", 1)[0]
                    if pt in seen:
                        raise InputError(f"SDP media section {i} has more than one {prefix}{excerpt(pt)} line")
                    seen.add(pt)
        for prefix, most in (("a=candidate:", limits.max_candidates), ("a=rtcp-fb:", limits.max_rtcp_fb),
                             ("a=ssrc:", limits.max_ssrc)):
            if counts[prefix] > most:
                raise InputError(f"SDP media section {i} has {counts[prefix]} {prefix[2:-1]} lines, at most {most} "
                                 "allowed")
        for prefix, name in (("a=fingerprint:", "DTLS fingerprint (a=fingerprint)"),
                             ("a=ice-ufrag:", "ICE username (a=ice-ufrag)"),
                             ("a=ice-pwd:", "ICE password (a=ice-pwd)")):
            if not (has(section, prefix) or has(session, prefix)):
                raise InputError(f"SDP media section {i} has no {name}")


# ------------------------------------------------------------------------------------------ rate limits


class TokenBuckets:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up.

    Written here because the maintained limiters are built for other shapes (``aiolimiter`` waits for
    capacity instead of refusing; ``limits`` brings storage backends): this one only answers "now, or
    in how many seconds". Full buckets are forgotten when more than ``max_keys`` are kept (a full
    bucket is the same as a new one), so the memory is bounded whatever the number of clients.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000, clock=time.monotonic):
        if not (rate > 0 and burst >= 1):
            raise InputError(f"a rate limit needs rate > 0 and burst >= 1, got {rate:g}/s, burst {burst:g}")
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: dict[Any, tuple[float, float]] = {}     # key -> (tokens, at)

    def take(self, key: Any) -> float:
        """Take one token for ``key``: 0.0 when there was one, else the seconds until there is one."""
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > self.max_keys:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]

    @staticmethod
    def retry_after(wait: float) -> str:
        """A ``Retry-After`` header value (whole seconds, at least 1) for a :meth:`take` result."""
        return str(max(1, math.ceil(wait)))
