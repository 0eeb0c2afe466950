"""RTMP output: a session's avatar video and voice pushed to an RTMP receiver (YouTube, Twitch, nginx-rtmp).

:class:`RtmpSink` is an output sink (:mod:`edtalk_live.realtime.sinks`) that encodes each chunk the session's
pacer hands over in a thread of its own and sends it as FLV over RTMP with PyAV (FFmpeg's own RTMP client):
H.264 (libx264, ``zerolatency``, 2 s GOP, no B-frames, 25 fps, yuv420p) and AAC (48 kHz stereo; the 16 kHz
mono voice is resampled), as streaming platforms expect.

Timestamps come from the session's audio clock, never from a count of frames sent: chunk ``i`` (voice
samples ``[640 i, 640 (i+1))``) is video pts ``i`` at 1/25 s and audio pts ``3 * 640 i`` at 1/48000 s, less the
media time of the first chunk of the connection: each connection starts its timestamps at 0, as a receiver
expects of a new publisher. So frames the pacer skipped, or the sink's queue dropped, leave gaps in both
streams' timestamps, and what follows a gap stays in sync (the voice after a gap starts a new AAC frame at its
own timestamp, the unfinished one before it padded with silence).

Where it goes is configured on the server (``serve --rtmp-target NAME=URL``, :attr:`ServerSettings.rtmp_targets
<edtalk_live.realtime.server.ServerSettings.rtmp_targets>`) and chosen by name in the session options; a URL
(whose path often holds a stream key) is never taken from a client, never logged, never shown: logs name the
target. A refused or dropped connection is made again with backoff (:class:`~edtalk_live.realtime.sinks.
ThreadSink`), with new encoders; network waits (connecting, a receiver that stops reading) give up after
:attr:`RtmpSink.io_timeout` seconds, so a dead receiver cannot hold the sink's thread.
"""

from __future__ import annotations

import fractions
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterable

import av
import numpy as np

from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from edtalk_live.realtime.sinks import MediaChunk, ThreadSink

logger = logging.getLogger(__name__)

RTMP_SCHEMES = ("rtmp", "rtmps")
#: more ``NAME=URL`` targets, separated by spaces (keeps stream keys out of ``ps``, unlike ``--rtmp-target``)
TARGETS_ENV = "EDTALK_LIVE_RTMP_TARGETS"
#: what a target's name may be made of (it is chosen by name in a session's options and named in logs)
TARGET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: the AAC stream's sample rate: 3 samples for each 16 kHz sample of the voice
AUDIO_RATE = 48_000
UPSAMPLE = AUDIO_RATE // SAMPLE_RATE
AAC_FRAME = 1024                     # samples of one AAC frame


class RtmpError(OSError):
    """The RTMP connection failed (the message never holds the URL: it may hold a stream key)."""


# ------------------------------------------------------------------------------------------ targets


def check_target(name: str, url: str) -> None:
    """Raise :class:`InputError` unless ``name`` is a target name and ``url`` an RTMP URL (:func:`check_url`)."""
    if not isinstance(name, str) or not TARGET_NAME.fullmatch(name):
        raise InputError(f"RTMP target name {str(name)[:70]!r} must be 1-64 letters, digits, '_' or '-'")
    check_url(url, f"RTMP target {name}")


def check_url(url: str, what: str = "RTMP URL") -> None:
    """Raise :class:`InputError` unless ``url`` is an ``rtmp://`` or ``rtmps://`` URL with a host, on one line
    (the message never shows more of the URL than its scheme: the rest may hold a stream key)."""
    if not isinstance(url, str) or any(c.isspace() or not c.isprintable() for c in url):
        raise InputError(f"{what}: the URL must be one line without spaces")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in RTMP_SCHEMES or not url.lower().startswith(("rtmp://", "rtmps://")):
        raise InputError(f"{what}: the URL must start with rtmp:// or rtmps://, got {(parts.scheme or url[:5])!r}")
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        host = None
    if not host:
        raise InputError(f"{what}: the URL has no host (or a bad port): rtmp://HOST[:PORT]/APP/KEY")


def parse_targets(specs: Iterable[str]) -> dict[str, str]:
    """``NAME=URL`` items (``serve --rtmp-target``, :data:`TARGETS_ENV`) as ``{name: url}``, each checked
    (:func:`check_target`); a name given twice is an error."""
    targets: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep:
            raise InputError(f"an RTMP target must look like NAME=rtmp://host/app/key, got {name[:20]!r}...")
        name = name.strip()
        check_target(name, url)
        if name in targets:
            raise InputError(f"RTMP target {name} is given twice")
        targets[name] = url
    return targets


def targets_from_args(args) -> dict[str, str]:
    """The RTMP targets of ``serve``'s arguments: ``--rtmp-target NAME=URL`` (repeatable) and :data:`TARGETS_ENV`."""
    import os

    return parse_targets([*(getattr(args, "rtmp_target", None) or ()), *os.environ.get(TARGETS_ENV, "").split()])


def redact(url: str) -> str:
    """The URL's scheme and host only (what logs may show of a target)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/..."


def _tee_slave(url: str, options: dict[str, str]) -> str:
    """``url`` as the one output of FFmpeg's ``tee`` muxer, with ``options`` for the FLV muxer and the network
    (the tee muxer is how PyAV lets options reach the protocol that opens the URL)."""
    escaped = re.sub(r"([\\'|\[\]])", r"\\\1", url)
    return "[" + ":".join(f"{k}={v}" for k, v in options.items()) + "]" + escaped


# ------------------------------------------------------------------------------------------ the sink


class RtmpSink(ThreadSink):
    """Pushes the chunks of a session to ``url`` (``rtmp://`` or ``rtmps://``) as FLV: H.264 + AAC.

    ``size``: the session's output ``(width, height)``; the stream is that size cut to even numbers (an image of
    another size is scaled to it). ``video_bitrate``: the cap of the H.264 stream (bits/s; quality CRF 23 below
    it). Everything (encoding, the connection) runs in the sink's thread: :meth:`put` never waits.
    """

    kind = "rtmp"
    #: seconds a connection may take to open, and a write to go through, before the connection counts as failed
    io_timeout: float = 5.0
    #: libx264's speed preset and threads (a sink per session: keep it small)
    preset: str = "veryfast"
    encoder_threads: int = 2
    gop: int = 2 * FPS                # a keyframe every 2 s (what platforms ask for)
    audio_bitrate: int = 128_000

    def __init__(self, url: str, size: tuple[int, int], name: str | None = None,
                 on_count: Callable[[str, str, int], None] | None = None, capacity: int = 2 * FPS,
                 video_bitrate: int = 2_000_000):
        super().__init__(name, on_count, capacity)
        check_url(url, f"RTMP sink {self.name}")
        width, height = size
        if width < 2 or height < 2:
            raise InputError(f"RTMP output needs an image of at least 2x2 pixels, got {width}x{height}")
        self.url = url
        self.width, self.height = width - width % 2, height - height % 2
        self.video_bitrate = video_bitrate
        self._out = None
        self._video = None
        self._audio = None
        self._resampler = None
        self._base: int | None = None          # index of the connection's first chunk: its timestamps start there
        self._broken = False                   # a write on this connection failed
        self._pending = np.zeros((2, 0), np.float32)   # resampled voice not yet in a full AAC frame
        self._pending_pts = 0                  # pts (1/48000) of its first sample

    def __repr__(self) -> str:           # never the URL
        return f"RtmpSink({self.name!r}, {redact(self.url)}, {self.width}x{self.height})"

    # ------------------------------------------------------------ the sink's thread
    def open(self) -> None:
        options = {"f": "flv", "onfail": "abort", "flvflags": "no_duration_filesize",
                   "rw_timeout": str(int(self.io_timeout * 1e6))}
        try:
            out = av.open(_tee_slave(self.url, options), "w", format="tee")
            self._out = out
            video = out.add_stream("libx264", rate=FPS, options={
                "preset": self.preset, "tune": "zerolatency", "crf": "23",
                "maxrate": str(self.video_bitrate), "bufsize": str(2 * self.video_bitrate),
                "x264-params": f"keyint={self.gop}:min-keyint={self.gop}:scenecut=0:bframes=0"})
            video.width, video.height, video.pix_fmt = self.width, self.height, "yuv420p"
            ctx = video.codec_context
            ctx.time_base = fractions.Fraction(1, FPS)
            ctx.gop_size, ctx.max_b_frames, ctx.thread_count = self.gop, 0, self.encoder_threads
            ctx.flags |= av.codec.context.Flags.global_header    # FLV carries SPS/PPS in its header
            audio = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
            audio.bit_rate = self.audio_bitrate
            audio.codec_context.time_base = fractions.Fraction(1, AUDIO_RATE)
            audio.codec_context.flags |= av.codec.context.Flags.global_header
            self._video, self._audio = video, audio
            out.start_encoding()           # connects (RTMP handshake, publish) and sends the FLV header
        except av.FFmpegError as e:
            raise RtmpError(_why(e)) from None
        self._resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AUDIO_RATE)
        self._base, self._broken = None, False
        self._pending = np.zeros((2, 0), np.float32)
        # a new connection starts at the live edge: what queued up while there was none is dropped (counted),
        # not sent in a burst that would leave the stream behind by the queue's length
        stale = len(self.queue)
        self.queue.clear()
        if stale:
            self.counters.add("drops", stale)
        logger.info("sink rtmp/%s: publishing to %s (%dx%d)", self.name, redact(self.url), self.width, self.height)

    def write(self, chunk: MediaChunk) -> None:
        if self._base is None:
            self._base = chunk.index
        try:
            self._out.mux(self._video.encode(self._video_frame(chunk)))
            self._encode_voice(chunk)
        except Exception as e:
            self._broken = True            # close() then flushes nothing into a dead connection
            if isinstance(e, av.FFmpegError):
                raise RtmpError(_why(e)) from None
            raise

    def close(self) -> None:
        """Send what the encoders still hold and end the stream; after a failure, only let the connection go."""
        out = self._out
        if out is None:
            return
        try:
            try:
                if self._base is not None and not self._broken:
                    for frame in self._resampler.resample(None):
                        self._queue_voice(frame.pts, frame.to_ndarray())
                    self._flush_voice(pad=True)
                    out.mux(self._video.encode(None))
                    out.mux(self._audio.encode(None))
            finally:
                out.close()
        except av.FFmpegError as e:
            raise RtmpError(_why(e)) from None
        finally:
            self._out = self._video = self._audio = self._resampler = None

    # ------------------------------------------------------------ encoding
    def _video_frame(self, chunk: MediaChunk) -> av.VideoFrame:
        image = chunk.image
        h, w = image.shape[:2]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:h - h % 2, :w - w % 2]), format="rgb24")
        frame.pts = chunk.index - self._base        # scaled to the stream's size by PyAV if it differs
        frame.time_base = fractions.Fraction(1, FPS)
        return frame

    def _encode_voice(self, chunk: MediaChunk) -> None:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk.voice, np.int16)[None], format="s16",
                                           layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        frame.pts = chunk.first_sample - self._base * SAMPLES_PER_FRAME
        for out in self._resampler.resample(frame):       # pts kept (less the resampler's 1 ms delay)
            self._queue_voice(out.pts, out.to_ndarray())

    def _queue_voice(self, pts: int, samples: np.ndarray) -> None:
        """Cut the resampled voice (``[2, n]`` at 48 kHz, first sample at ``pts``) into AAC frames placed by
        their timestamps: after a gap (a skipped or dropped chunk) the frame in progress is padded with silence
        and a new one starts at ``pts``."""
        waiting = self._pending.shape[1]
        gap = pts - (self._pending_pts + waiting)
        # a gap (a chunk is 1920 samples here; rounding makes a sample or two) that the padding fits in
        if waiting and gap > UPSAMPLE * 8 and gap >= -waiting % AAC_FRAME:
            self._flush_voice(pad=True)
        if not self._pending.shape[1]:
            self._pending_pts = pts
        self._pending = np.concatenate([self._pending, samples], axis=1)
        self._flush_voice(pad=False)

    def _flush_voice(self, pad: bool) -> None:
        """Encode every whole AAC frame waiting (``pad``: and the last part, padded with silence)."""
        pending = self._pending
        if pad and pending.shape[1] % AAC_FRAME:
            pending = np.pad(pending, ((0, 0), (0, AAC_FRAME - pending.shape[1] % AAC_FRAME)))
        whole = pending.shape[1] // AAC_FRAME * AAC_FRAME
        for start in range(0, whole, AAC_FRAME):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pending[:, start:start + AAC_FRAME]),
                                               format="fltp", layout="stereo")
            frame.sample_rate = AUDIO_RATE
            frame.time_base = fractions.Fraction(1, AUDIO_RATE)
            frame.pts = self._pending_pts + start
            self._out.mux(self._audio.encode(frame))
        self._pending = pending[:, whole:]
        self._pending_pts += whole


def _why(e: av.FFmpegError) -> str:
    """What failed, without the file name PyAV adds (the URL, which may hold a stream key)."""
    return f"{type(e).__name__}: {e.strerror or 'error'}"
