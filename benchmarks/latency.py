"""Audio-in -> frame-out latency and A/V offset of the real server, measured end to end with real WebRTC clients.

    python -m benchmarks.latency --random test --sessions 1,4,16 --seconds 10
    python -m benchmarks.latency --weights DIR --avatar face.png --backend onnxruntime
    python -m benchmarks.latency --server http://gpu-box:8080 --sessions 16

For every concurrency N, N Python clients (``edtalk_live.realtime.client.run_client``, aiortc: Opus and VP8 encode
and decode, both jitter buffers) connect at once and each sends the same audio in real time. The
sessions run in probe mode: the server paints each video frame's index ``i`` into the frame's top
quarter (``realtime.probe.paint_index``), so the client knows exactly which frame it received.
Frame ``i`` shows the mouth for the session's audio samples ``[640 i, 640 (i+1))`` (16 kHz), and the
session's ``audio_anchor`` says where the client's sample 0 landed, so client sample ``k`` is session
sample ``anchor + k``. Per received frame and per session:

- **video latency**: the frame's arrival (client wall clock) minus the moment the *last* sample of the
  audio it shows was sent (``send_start + (640 (i+1) - anchor) / 16000``; the client paces in real
  time). Frames showing audio before or after the sent audio are left out.
- **voice latency**: the received voice (resampled to 16 kHz) is cross-correlated with the sent audio
  to find which sent sample each received sample carries; a sample's latency is the arrival of the
  packet carrying it minus the moment it was sent.
- **A/V offset**: a frame's arrival minus the arrival of the voice packet carrying the *first* sample
  of the frame's audio (the frame is on screen while its 40 ms of voice play; positive = video late).
  Both arrivals are taken as aiortc hands them to the application, i.e. after its jitter buffers.
- fps received, frames lost (gaps in the decoded indices), and the server's own counters.

Both clocks are the client's, so the server may run on another machine. With no ``--server`` the
benchmark starts one itself: in this process (the default; clients and server then share one event
loop and one GIL, which is what a one-box measurement costs) or, with ``--server-process``, in a child
process. ``--random test|official`` writes seeded random weights (speed and latency do not depend on
the weight values) and a random-noise avatar to a temporary folder.

"Added" latency is everything beyond the audio window the mouth needs. The lip-sync look-ahead (the
server's ``delay_ms`` minus its ``render_budget``, 175 ms by default) says how far past a frame's
*first* audio sample the mouth's audio window reaches; the video latency is measured from the frame's
*last* sample, 40 ms later, so the part no implementation can avoid is ``look-ahead - 40 ms`` and
``added = p95 - (look-ahead - 40 ms)``: the render budget, encode, transport, decode, jitter buffers and
event-loop delays. The table is Markdown on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edtalk_live.benchmarks.outputs import RTMP_PATH
from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

__all__ = ["LevelResult", "SessionMeasure", "VoiceBlock", "analyse_session", "main", "speech_like", "summarise",
           "voice_blocks", "voice_lag", "write_random_weights"]

logger = logging.getLogger(__name__)

RATE = SAMPLE_RATE
FRAME_SAMPLES = SAMPLES_PER_FRAME    # 40 ms of 16 kHz audio per video frame (25 fps)
FRAME_MS = 1000 / FPS
#: a decoded index more than this many frames after the previous one is a misread (unless the next ones follow it)
MAX_INDEX_JUMP = 50
#: the renderer "kept up" when at most this fraction of the frames sent was late (dropped, repeated, skipped)
KEPT_UP_FRACTION = 0.01
#: the voice lag is trusted when the normalised correlation at the best lag reaches this
MIN_VOICE_CORRELATION = 0.5
TARGET_ADDED_MS = 200.0
#: seconds a client stays connected after its audio, beyond the server's delay (frames later than this are missed)
TAIL_S = 1.5
#: the outputs ``--outputs`` can measure: the WebRTC peer that sends the audio, an RTMP receiver of the session
#: (a target the benchmark configures on the server it starts), a WHEP viewer of the session
OUTPUTS = ("webrtc", "rtmp", "whep")
#: the name of the benchmark's RTMP target on the server
RTMP_TARGET = "bench"


# ================================================================================================ test audio


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Float32 mono 16 kHz "speech-like" test audio: bursts of band-limited noise and chirps between pauses.

    Voiced bursts of 0.15-0.6 s (noise band-passed to 150-3800 Hz, plus a chirp sweeping 150-400 Hz
    with harmonics, under a smooth envelope) alternate with pauses of 0.1-0.4 s. Nothing repeats, so
    the cross-correlation of an echo with it has one clear peak. Peak level about 0.5.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * RATE))
    out = np.zeros(n, np.float32)
    pos = int(rng.uniform(0.05, 0.2) * RATE)
    while pos < n:
        length = int(rng.uniform(0.15, 0.6) * RATE)
        seg = min(length, n - pos)
        if seg <= 0:
            break
        t = np.arange(length) / RATE
        spec = np.fft.rfft(rng.standard_normal(length))
        freqs = np.fft.rfftfreq(length, 1 / RATE)
        spec[(freqs < 150) | (freqs > 3800)] = 0
        noise = np.fft.irfft(spec, length)
        noise /= np.abs(noise).max() + 1e-9
        f0, f1 = rng.uniform(150, 250), rng.uniform(200, 400)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
        chirp = sum(np.sin(h * phase) / h for h in (1, 2, 3, 4))
        chirp /= np.abs(chirp).max() + 1e-9
        env = np.sin(np.pi * np.arange(length) / length) ** 0.5
        burst = env * (0.6 * noise + 0.4 * chirp) * rng.uniform(0.6, 1.0)
        out[pos:pos + seg] = 0.5 * burst[:seg]
        pos += length + int(rng.uniform(0.1, 0.4) * RATE)
    return out


# ================================================================================================ weights


def bench_weights(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, str]:
    """A benchmark's model: ``--weights``/``--avatar`` as given, else seeded random ``--random`` weights written
    into ``tmp``; ``(weights, avatar, a note saying which)``."""
    if getattr(args, "weights", None):
        weights, avatar = Path(args.weights), Path(args.avatar)
        return weights, avatar, f"weights {weights.name}, avatar {avatar.name}"
    logger.info("writing random %s weights (seed %d)", args.random, args.seed)
    weights, avatar = write_random_weights(tmp / "weights", args.random, getattr(args, "family", "edtalk"),
                                           args.seed)
    return weights, avatar, f"`{args.random}` config, seeded random weights (seed {args.seed}), random-noise avatar"


def write_random_weights(dest: Path, config_name: str, family: str = "edtalk", seed: int = 0
                         ) -> tuple[Path, Path]:
    """Seeded random official-layout weights and a random-noise avatar PNG in ``dest``.

    ``config_name`` is one of :data:`benchmarks.fps.CONFIGS` (``official``: 256², published widths;
    ``test``: 64², the fixture widths; ``tiny``). Writes ``EDTalk.pt`` (or ``EDTalk_lip_pose.pt``)
    as ``{'gen': state_dict}`` and ``Audio2Lip.pt`` as ``{'audio2lip': state_dict}``, with the
    flow-predicting convolutions scaled like the parity fixtures. Returns ``(weights_dir, avatar)``.
    """
    import torch
    from PIL import Image

    from edtalk_live.benchmarks.fps import CONFIGS, FLOW_WEIGHT_SCALE
    from edtalk_live.edtalk.model import EDTalkModel
    from edtalk_live.media.weights import AUDIO2LIP_FILE, EDTALK_FILE, LIP_POSE_FILE

    if config_name not in CONFIGS:
        raise ValueError(f"unknown config {config_name!r}; choose from {', '.join(CONFIGS)}")
    cfg = CONFIGS[config_name].model_config(family)
    torch.manual_seed(seed)
    model = EDTalkModel(cfg, with_audio2lip=True).eval()
    with torch.no_grad():
        for tf in model.generator.dec.to_flows:
            tf.conv.weight.mul_(FLOW_WEIGHT_SCALE)
    dest.mkdir(parents=True, exist_ok=True)
    torch.save({"gen": model.generator.state_dict()}, dest / (EDTALK_FILE if cfg.has_expression else LIP_POSE_FILE))
    torch.save({"audio2lip": model.audio2lip.state_dict()}, dest / AUDIO2LIP_FILE)
    rng = np.random.default_rng(seed)
    avatar = dest / "avatar.png"
    Image.fromarray(rng.integers(0, 256, (cfg.size, cfg.size, 3), dtype=np.uint8)).save(avatar)
    return dest, avatar


# ================================================================================================ analysis


@dataclass
class SessionMeasure:
    """What one client measured. Latencies and offsets in milliseconds, one entry per usable frame."""

    session: str = ""
    error: str = ""
    video_latency_ms: list[float] = field(default_factory=list)
    voice_latency_ms: list[float] = field(default_factory=list)     # at the first sample of every usable frame
    av_offset_ms: list[float] = field(default_factory=list)
    av_offset_at: list[float] = field(default_factory=list)        # each av_offset_ms frame's arrival (wall clock)
    frames_received: int = 0
    frames_used: int = 0            # frames whose audio lies inside the sent audio
    frames_expected: int = 0        # frames the sent audio spans (640 samples each)
    bad_index: int = 0              # frames whose painted index failed the sanity check
    frames_lost: int = 0            # indices never received (gaps in the decoded indices)
    fps: float = 0.0
    voice_lag: int | None = None    # overall: received 16 kHz sample j carries sent sample j - voice_lag
    voice_correlation: float = 0.0  # median normalised correlation of the voice blocks at their own lags
    voice_blocks: int = 0           # blocks of received voice matched to the sent audio
    voice_unmatched: int = 0        # blocks with voice but no clear match (left out)
    voice_lag_steps: int = 0        # times the lag changed by more than 1 ms between blocks (samples lost/skipped)
    delay_ms: float | None = None
    audio_in_ms: float | None = None  # client sample 0 sent -> placed on the server's clock (in-process servers)
    server: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error


def _to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    """Mono samples at ``rate`` -> 16 kHz, without a time shift (centred box filter, or linear interpolation)."""
    x = np.asarray(x, np.float64)
    if rate == RATE or len(x) == 0:
        return x
    if rate % RATE == 0:
        f = rate // RATE
        kernel = np.ones(f) / f
        smooth = np.convolve(x, kernel, mode="full")[(f - 1) // 2:(f - 1) // 2 + len(x)]   # centred
        return smooth[::f]
    t = np.arange(int(len(x) * RATE / rate)) * (rate / RATE)
    return np.interp(t, np.arange(len(x)), x)


def voice_lag(received: np.ndarray, sent: np.ndarray) -> tuple[int, float]:
    """Lag ``L`` with ``received[j] ≈ sent[j - L]`` (both 16 kHz) and the normalised correlation there.

    Cross-correlation over every lag by FFT; the normalised correlation is computed on the overlap
    at the best lag (1.0 for an exact copy; below :data:`MIN_VOICE_CORRELATION` the lag is unreliable).
    """
    r = np.asarray(received, np.float64)
    s = np.asarray(sent, np.float64)
    if len(r) == 0 or len(s) == 0:
        return 0, 0.0
    n = 1 << int(math.ceil(math.log2(len(r) + len(s))))
    c = np.fft.irfft(np.fft.rfft(r, n) * np.conj(np.fft.rfft(s, n)), n)
    lags = np.concatenate([np.arange(0, len(r)), np.arange(-len(s) + 1, 0)])
    values = np.concatenate([c[:len(r)], c[n - len(s) + 1:]])
    lag = int(lags[int(np.argmax(values))])
    j0, j1 = max(0, lag), min(len(r), len(s) + lag)
    a, b = r[j0:j1], s[j0 - lag:j1 - lag]
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return lag, float(a @ b) / denom if denom > 0 else 0.0


@dataclass(frozen=True)
class VoiceBlock:
    """Received 16 kHz samples ``[start, end)`` carry sent samples ``[start - lag, end - lag)``."""

    start: int
    end: int
    lag: int
    correlation: float


def voice_blocks(received: np.ndarray, sent: np.ndarray, block: int = RATE // 4, search: int = RATE // 2
                 ) -> tuple[int, list[VoiceBlock], int]:
    """Match the received voice to the sent audio block by block (robust to samples lost or skipped on the way).

    Returns ``(overall lag, matched blocks, unmatched blocks)``. Each ``block``-sample piece of
    ``received`` that holds voice is cross-correlated with the sent audio within ``search`` samples of
    the overall lag (:func:`voice_lag`); pieces whose best normalised correlation stays below
    :data:`MIN_VOICE_CORRELATION` are unmatched, silent pieces are skipped. Where two neighbouring
    pieces disagree, the sample where the lag changed is found by least squares.
    """
    r = np.asarray(received, np.float64)
    s = np.asarray(sent, np.float64)
    lag0, _ = voice_lag(r, s)
    pad = len(r) + search + block
    sp = np.concatenate([np.zeros(pad), s, np.zeros(pad)])          # sent sample k at sp[k + pad]
    energy = np.concatenate([[0.0], np.cumsum(sp * sp)])
    floor = 1e-3 * float(np.mean(s * s)) if len(s) else 0.0
    blocks, unmatched = [], 0
    for j0 in range(0, len(r) - block // 4, block):
        x = r[j0:j0 + block]
        ex = float(x @ x)
        if ex <= floor * len(x):
            continue                                                 # a pause: nothing to match
        a = j0 - lag0 - search + pad                                 # sent window [a, a + len(x) + 2 search)
        seg = sp[a:a + len(x) + 2 * search]
        n = 1 << int(math.ceil(math.log2(len(seg) + len(x))))
        c = np.fft.irfft(np.fft.rfft(seg, n) * np.conj(np.fft.rfft(x, n)), n)[:len(seg) - len(x) + 1]
        es = energy[a + len(x):a + len(seg) + 1] - energy[a:a + len(seg) - len(x) + 1]
        norm = c / np.sqrt(np.maximum(es, 1e-12) * ex)
        o = int(np.argmax(norm))
        lag = j0 - (a + o - pad)
        if norm[o] >= MIN_VOICE_CORRELATION:
            blocks.append(VoiceBlock(j0, j0 + len(x), lag, float(norm[o])))
        else:
            unmatched += 1
    # where two adjacent blocks disagree, the lag changed inside one of them: find the sample where it did
    for n in range(len(blocks) - 1):
        a, b = blocks[n], blocks[n + 1]
        if a.lag == b.lag or a.end != b.start:
            continue
        j = np.arange(a.start, b.end)
        x = r[j]
        cost = []
        for lag in (a.lag, b.lag):
            ref = sp[j - lag + pad]
            gain = float(x @ ref) / max(float(ref @ ref), 1e-12)
            cost.append(np.concatenate([[0.0], np.cumsum((x - gain * ref) ** 2)]))
        split = a.start + int(np.argmin(cost[0] + (cost[1][-1] - cost[1])))
        blocks[n] = VoiceBlock(a.start, split, a.lag, a.correlation)
        blocks[n + 1] = VoiceBlock(split, b.end, b.lag, b.correlation)
    return lag0, [b for b in blocks if b.end > b.start], unmatched


def _valid_indices(indices: Sequence[int]) -> np.ndarray:
    """Mask of the decoded indices to trust: each one follows the previous trusted one by 1 to
    :data:`MAX_INDEX_JUMP`, or (after a longer stall, or at the start) is followed that way by the next two."""
    idx = np.asarray(indices, np.int64)
    keep = np.zeros(len(idx), bool)

    def step_ok(a: int, b: int) -> bool:
        return 0 < b - a <= MAX_INDEX_JUMP

    last = None
    for j, i in enumerate(idx):
        continued = j + 2 < len(idx) and step_ok(i, idx[j + 1]) and step_ok(idx[j + 1], idx[j + 2])
        if (last is not None and step_ok(last, i)) or ((last is None or i > last) and continued):
            keep[j] = True
            last = i
    return keep


def _placed_voice(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The received voice (at ``result.audio_rate``), each frame's arrival, and where each frame ends in it.

    Frames are placed by their timestamps when the client kept them, with silence where packets were lost
    (as the server places incoming audio): the voice then keeps one lag to the sent audio however many
    packets were lost, instead of a step at every loss. Without timestamps, frames follow each other.
    """
    chunks = [np.asarray(c, np.float64).reshape(-1) for c in result.received_audio]
    times = np.asarray([t for t, _ in result.audio_arrival], np.float64)
    pts = list(getattr(result, "audio_pts", []))
    if len(pts) != len(chunks) or any(p is None for p in pts):
        return np.concatenate(chunks), times, np.asarray([n for _, n in result.audio_arrival], np.float64)
    # RTP timestamps are 32-bit and start anywhere: unwrap them and count from the first
    starts = np.concatenate([[0], np.cumsum([(b - a + 2**31) % 2**32 - 2**31 for a, b in itertools.pairwise(pts)])])
    starts -= starts.min()
    ends = starts + np.asarray([len(c) for c in chunks])
    voice = np.zeros(int(ends.max()))
    for c, at in zip(chunks, starts, strict=True):
        voice[at:at + len(c)] = c
    return voice, times, ends.astype(np.float64)


def analyse_session(result, sent: np.ndarray, read_index=None) -> SessionMeasure:
    """Latencies and offsets of one :class:`edtalk_live.realtime.client.ClientResult` (run with ``probe`` and
    ``keep_frames``).

    ``sent`` is the float 16 kHz audio the client sent; ``read_index`` reads a frame's painted index
    (default :func:`edtalk_live.realtime.probe.read_index`).
    """
    if read_index is None:
        from edtalk_live.realtime.probe import read_index
    sent = np.asarray(sent, np.float32)
    stats = result.stats or {}
    m = SessionMeasure(session=result.session, server=dict(stats), frames_received=len(result.video_arrival),
                       frames_expected=len(sent) // FRAME_SAMPLES, delay_ms=stats.get("delay_ms"))
    anchor = stats.get("audio_anchor")
    if anchor is None or result.send_start is None:
        m.error = "the server reported no audio anchor (no stats reply, or no audio arrived)"
        return m
    if len(result.frames) != len(result.video_arrival):
        m.error = "the client kept no frames: run it with keep_frames=True"
        return m
    arrival = np.asarray(result.video_arrival, np.float64)
    if len(arrival) >= 2 and arrival[-1] > arrival[0]:
        m.fps = (len(arrival) - 1) / (arrival[-1] - arrival[0])
    indices = np.asarray([read_index(f) for f in result.frames], np.int64)
    keep = _valid_indices(indices)
    m.bad_index = int((~keep).sum())
    good = indices[keep]
    if len(good) > 1:   # indices the readable ones span, less the frames received in that span (readable or not)
        where = np.flatnonzero(keep)
        m.frames_lost = max(0, int(good[-1] - good[0] + 1) - int(where[-1] - where[0] + 1))

    # the voice: which sent sample each received sample carries, and when the packet carrying it arrived
    times = ends = None
    blocks: list[VoiceBlock] = []
    if result.received_audio and result.audio_rate:
        voice, times, ends = _placed_voice(result)
        received = _to_16k(voice, result.audio_rate)
        m.voice_lag, blocks, m.voice_unmatched = voice_blocks(received, sent)
        m.voice_blocks = len(blocks)
        if blocks:
            m.voice_correlation = float(np.median([b.correlation for b in blocks]))
            m.voice_lag_steps = int(sum(abs(b.lag - a.lag) > RATE // 1000 for a, b in itertools.pairwise(blocks)))

    def voice_arrival(k: int) -> float | None:
        """Arrival (wall clock) of the voice packet carrying sent sample ``k`` (None: not found in the voice)."""
        for b in blocks:
            j = k + b.lag                                               # position in the received 16 kHz stream
            if b.start <= j < b.end:
                at = int(np.searchsorted(ends, j * result.audio_rate / RATE, side="right"))
                return float(times[at]) if at < len(times) else None
        return None

    for i, t in zip(good, arrival[keep], strict=True):
        k_end = FRAME_SAMPLES * (int(i) + 1) - anchor       # one past the last sent sample the frame shows
        if not 0 < k_end <= len(sent):
            continue
        m.frames_used += 1
        m.video_latency_ms.append((t - (result.send_start + k_end / RATE)) * 1000)
        k0 = k_end - FRAME_SAMPLES                           # the frame's first sample: it is shown from then
        if times is None or k0 < 0:
            continue
        va = voice_arrival(k0)
        if va is not None:
            m.voice_latency_ms.append((va - (result.send_start + k0 / RATE)) * 1000)
            m.av_offset_ms.append((t - va) * 1000)
            m.av_offset_at.append(float(t))
    if not m.video_latency_ms:
        m.error = f"no usable frame ({m.frames_received} received, {m.bad_index} with an unreadable index)"
    return m


@dataclass
class LevelResult:
    """One concurrency level: the measures of its N sessions."""

    sessions: int
    measures: list[SessionMeasure]
    wall_s: float = 0.0
    load: str = ""


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else None


def summarise(level: LevelResult, render_budget_ms: float | None) -> dict[str, Any]:
    """Aggregate one level over its sessions (all frames of all sessions pooled for the percentiles)."""
    ok = [m for m in level.measures if m.ok]
    video = [x for m in ok for x in m.video_latency_ms]
    voice = [x for m in ok for x in m.voice_latency_ms]
    offset = [x for m in ok for x in m.av_offset_ms]
    delays = [m.delay_ms for m in ok if m.delay_ms is not None]
    delay = float(np.median(delays)) if delays else None
    # the server reports its look-ahead and (measured or fixed) render budget per session; older servers
    # only their delay, from which the budget given on the command line is taken away
    looks = [m.server["lookahead_ms"] for m in ok if m.server.get("lookahead_ms") is not None]
    budgets = [m.server["render_budget_ms"] for m in ok if m.server.get("render_budget_ms") is not None]
    if budgets:
        render_budget_ms = float(np.median(budgets))
    if looks:
        lookahead = float(np.median(looks))
    else:
        lookahead = None if delay is None or render_budget_ms is None else delay - render_budget_ms
    # the video latency is measured from the end of a frame's audio; the look-ahead from its start
    needed = None if lookahead is None else lookahead - FRAME_MS
    p95 = _pct(video, 95)
    counters = {k: sum(int(m.server.get(k) or 0) for m in ok)
                for k in ("frames_sent", "frames_dropped", "frames_repeated", "frames_skipped")}
    late = counters["frames_repeated"] + counters["frames_skipped"]
    sent = max(counters["frames_sent"] + counters["frames_skipped"], 1)          # frames due
    allowed = max(1.0, KEPT_UP_FRACTION * sent)                       # one frame is always forgiven (warm-up)
    fps = [m.fps for m in ok]
    server_p95 = [m.server["latency_ms_p95"] for m in ok if m.server.get("latency_ms_p95") is not None]
    kept_up = bool(ok) and late <= allowed and counters["frames_dropped"] <= allowed
    return {
        "sessions": level.sessions,
        "sessions_ok": len(ok),
        "errors": [m.error for m in level.measures if not m.ok],
        "frames_used": len(video),
        "frames_measured": len(video) / max(1, sum(m.frames_expected for m in level.measures)),
        "video_latency_ms_p50": _pct(video, 50),
        "video_latency_ms_p95": p95,
        "video_latency_ms_min": min(video) if video else None,
        "delay_ms": delay,
        "render_budget_ms": render_budget_ms,
        "lookahead_ms": lookahead,
        "unavoidable_ms": needed,
        "added_ms_p95": None if p95 is None or needed is None else p95 - needed,
        "voice_latency_ms_p50": _pct(voice, 50),
        "audio_in_ms_p50": (audio_in := _pct([m.audio_in_ms for m in ok if m.audio_in_ms is not None], 50)),
        # what is left of the median video latency: VP8, transport, the client's jitter buffer and decode
        "video_out_ms_p50": (None if audio_in is None or delay is None or not video
                             else _pct(video, 50) - (delay - FRAME_MS) - audio_in),
        "av_offset_ms_p50": _pct(offset, 50),
        "av_offset_ms_max_abs": max((abs(x) for x in offset), default=None),
        "voice_correlation_min": min((m.voice_correlation for m in ok if m.voice_blocks), default=None),
        "voice_unmatched": sum(m.voice_unmatched for m in ok),
        "voice_lag_steps": sum(m.voice_lag_steps for m in ok),
        "fps_mean": float(np.mean(fps)) if fps else None,
        "fps_min": min(fps) if fps else None,
        "frames_lost": sum(m.frames_lost for m in ok),
        "bad_index": sum(m.bad_index for m in ok),
        "server_latency_ms_p95_max": max(server_p95) if server_p95 else None,
        **counters,
        "late_fraction": max(late, counters["frames_dropped"]) / sent,
        "kept_up": kept_up,
        "load": level.load,
        "wall_s": level.wall_s,
    }


# ================================================================================================ running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _get_json(url: str, timeout: float = 5.0) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, http.get(url) as r:
        return await r.json(content_type=None)


async def _wait_idle(url: str, timeout: float = 20.0) -> None:
    """Wait until the server reports no live session (the previous level's peers are reclaimed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if (await _get_json(f"{url}/health")).get("sessions") == 0:
                return
        await asyncio.sleep(0.25)
    logger.warning("the server still has live sessions after %.0f s", timeout)


class _AnchorSpy:
    """In-process servers only: when each session's first audio sample landed, on the wall clock.

    Reads ``server.peers[sid].session`` (its clock and ``audio.anchor_pos``) every 50 ms; if the
    server's internals change, it records nothing and the benchmark reports "—".
    """

    def __init__(self, server: Any):
        self.server = server
        self.landed: dict[str, float] = {}

    async def poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                for sid, peer in list(self.server.peers.items()):
                    s = peer.session
                    if sid not in self.landed and s.audio.anchor_pos is not None:
                        wall_minus_loop = time.time() - loop.time()
                        self.landed[sid] = s.clock.t0 + s.audio.anchor_pos / RATE + wall_minus_loop
            except AttributeError:
                return
            await asyncio.sleep(0.05)


async def run_level(url: str, n: int, audio: np.ndarray, options: dict[str, Any],
                    connect_timeout: float = 60.0, spy: _AnchorSpy | None = None) -> LevelResult:
    """N clients at once, each sending ``audio`` (16 kHz float) in real time; every session analysed."""
    from edtalk_live.realtime.client import run_client

    t0 = time.monotonic()
    # record everything (not only the window the server's delay predicts) and stay a while after the audio,
    # so that late frames are measured rather than cut off
    results = await asyncio.gather(*(run_client(url, audio, None, options=options, keep_frames=True,
                                                connect_timeout=connect_timeout, record_window=False, tail=TAIL_S)
                                     for _ in range(n)), return_exceptions=True)
    wall = time.monotonic() - t0
    measures = []
    for r in results:
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            measures.append(SessionMeasure(error=f"{type(r).__name__}: {r}"))
        else:
            m = analyse_session(r, audio)
            landed = spy.landed.get(r.session) if spy is not None else None
            if landed is None and _loopback(url):     # the server's own report: the same host, the same clock
                landed = (r.stats or {}).get("first_audio_wall_s")
            if landed is not None and r.send_start is not None:
                m.audio_in_ms = (landed - r.send_start) * 1000
            measures.append(m)
    for m in measures:
        if m.error:
            logger.warning("%d sessions: session %s: %s", n, m.session[:8] or "?", m.error)
    return LevelResult(n, measures, wall_s=wall, load=_load())


async def run_outputs(url: str, audio: np.ndarray, options: dict[str, Any], outputs: Sequence[str],
                      rtmp_port: int | None, connect_timeout: float = 60.0) -> list[dict[str, Any]]:
    """One session sending ``audio``, received at once by every output in ``outputs`` (:data:`OUTPUTS`); one row
    per output, each measured like the WebRTC peer (:func:`analyse_session`) on the same wall clock."""
    from types import SimpleNamespace

    from edtalk_live.benchmarks.outputs import RtmpRecorder, WhepRecorder
    from edtalk_live.realtime.client import run_client

    recorders: dict[str, Any] = {}
    options = dict(options)
    try:
        if "rtmp" in outputs:
            assert rtmp_port is not None
            recorders["rtmp"] = RtmpRecorder(rtmp_port)
            await recorders["rtmp"].start()
            options["rtmp"] = RTMP_TARGET
        if "whep" in outputs:
            recorders["whep"] = WhepRecorder(url)
        result = await run_client(url, audio, None, options=options, keep_frames=True, connect_timeout=connect_timeout,
                                  record_window=False, tail=TAIL_S,
                                  on_session=recorders["whep"].attach if "whep" in recorders else None)
    finally:
        recordings = {name: await rec.stop() for name, rec in recorders.items()}
    rows = []
    if "webrtc" in outputs:
        rows.append(output_row("webrtc", analyse_session(result, audio)))
    for name, rec in recordings.items():
        view = SimpleNamespace(**{k: getattr(rec, k) for k in ("frames", "video_arrival", "received_audio",
                                                                "audio_rate", "audio_arrival", "audio_pts")},
                               stats=result.stats, send_start=result.send_start, session=result.session)
        m = analyse_session(view, audio, read_index=int)
        if rec.error and not m.error and not m.video_latency_ms:
            m.error = rec.error
        rows.append(output_row(name, m))
    return rows


def output_row(output: str, m: SessionMeasure) -> dict[str, Any]:
    """One output's figures (milliseconds) from its :class:`SessionMeasure`."""
    return {"output": output, "error": m.error,
            "video_latency_ms_p50": _pct(m.video_latency_ms, 50), "video_latency_ms_p95": _pct(m.video_latency_ms, 95),
            "voice_latency_ms_p50": _pct(m.voice_latency_ms, 50), "av_offset_ms_p50": _pct(m.av_offset_ms, 50),
            "av_offset_ms_max_abs": max((abs(x) for x in m.av_offset_ms), default=None), "fps": m.fps or None,
            "frames_used": m.frames_used, "frames_expected": m.frames_expected, "frames_lost": m.frames_lost,
            "voice_correlation": m.voice_correlation if m.voice_blocks else None}


def format_outputs_table(rows: Sequence[dict[str, Any]]) -> str:
    from edtalk_live.realtime.limits import clip

    head = ["output", "video latency p50 (ms)", "video latency p95 (ms)", "voice latency p50 (ms)",
            "A/V offset p50 (ms)", "max \\|A/V\\| (ms)", "fps received", "frames measured", "frames lost"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["output"], _f(r["video_latency_ms_p50"]), _f(r["video_latency_ms_p95"]),
                 _f(r["voice_latency_ms_p50"]), _f(r["av_offset_ms_p50"]), _f(r["av_offset_ms_max_abs"]),
                 _f(r["fps"], 1), f"{r['frames_used']} / {r['frames_expected']}", str(r["frames_lost"])]
        if r["error"]:
            cells[1] = f"failed: {clip(r['error'], 80)}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loopback(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _load() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except (OSError, AttributeError):
        return ""


@dataclass
class ServerInfo:
    url: str
    where: str                     # "in this process", "child process", or the URL given
    backend: str = "?"
    model: str = "?"
    render_budget_ms: float | None = None        # None: measured by the server
    spy: _AnchorSpy | None = field(default=None, repr=False)
    pid: int | None = None         # the server's process id when the benchmark started it in a child process

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "where": self.where, "backend": self.backend, "model": self.model,
                "render_budget_ms": self.render_budget_ms}


def _no_alignment() -> dict[str, bool]:
    """``build_server`` options that take the avatar as given (the random-noise avatar has no face to align)."""
    import inspect

    from edtalk_live.realtime.serve import build_server

    return {"align": False} if "align" in inspect.signature(build_server).parameters else {}


@contextlib.asynccontextmanager
async def _in_process_server(weights: Path, avatar: Path, args: argparse.Namespace, model_note: str):
    from aiohttp import web

    from edtalk_live.realtime.serve import build_server
    from edtalk_live.realtime.server import ServerSettings

    port = _free_port()
    # every client of a level connects at once from this host: no per-address offer rate
    settings = ServerSettings(port=port, max_sessions=max(args.sessions), render_budget=args.render_budget,
                              max_batch=args.max_batch, offer_rate=None,
                              rtmp_targets={RTMP_TARGET: rtmp_url} if (rtmp_url := getattr(args, "rtmp_url", None))
                              else {})
    server = build_server(weights, avatar, backend=args.backend, device=args.device, settings=settings,
                          **_no_alignment())
    cfg = server.renderer.config
    runner = web.AppRunner(server.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    spy = _AnchorSpy(server)
    polling = asyncio.create_task(spy.poll(), name="latency-anchor-spy")
    try:
        yield ServerInfo(f"http://127.0.0.1:{port}", "in this process", server.renderer.describe(),
                         _describe_config(cfg, model_note), _budget_ms(args), spy)
    finally:
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)
        await runner.cleanup()


def pin_to(cpus: set[int] | None):
    """A ``preexec_fn`` that keeps a child process (and every thread it starts) on ``cpus``; None: no pinning."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@contextlib.asynccontextmanager
async def server_process(weights: Path, avatar: Path | None, log_dir: Path, *, backend: str = "auto",
                         max_sessions: int = 8, max_batch: int = 16, render_budget: float | None = None,
                         device: str | None = None, extra: Sequence[str] = (), cpus: set[int] | None = None):
    """``edtalk-live serve --workers 1`` started as its own process on a free port; yields ``(url, process,
    health, config)`` once it answers, and stops it afterwards. Its log goes to ``log_dir/server.log``. Without
    ``avatar`` the server shows its built-in portrait. ``cpus``: the cores it may run on (Linux; all by default)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "edtalk_live.clients.cli", "-v",
           "serve", "--weights", str(weights), *(["--avatar", str(avatar)] if avatar else []), "--port", str(port),
           "--workers", "1", "--offer-rate", "0",       # every client of a level connects at once from this host
           "--backend", backend, "--max-sessions", str(max_sessions), "--max-batch", str(max_batch),
           *(["--render-budget", str(render_budget)] if render_budget is not None else []),
           *(["--device", device] if device else []), *extra]
    if _no_alignment():
        cmd.append("--no-align")
    async with spawn_server(cmd, port, log_dir, cpus) as started:
        yield started


@contextlib.asynccontextmanager
async def spawn_server(cmd: Sequence[str], port: int, log_dir: Path, cpus: set[int] | None = None):
    """Run ``cmd``, a server of edtalk-live's HTTP interface on ``port``; yields ``(url, process, health,
    config)`` once ``/health`` and ``/config`` answer, and stops it afterwards (log: ``log_dir/server.log``)."""
    log_path = log_dir / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1], preexec_fn=pin_to(cpus))
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the server process exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(Exception):
                health = await _get_json(f"{url}/health", timeout=2.0)
                config = await _get_json(f"{url}/config", timeout=2.0)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server process did not answer on {url} within 600 s (log: {log_path})")
            await asyncio.sleep(0.5)
        yield url, proc, health, config
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def _child_server(weights: Path, avatar: Path, args: argparse.Namespace, model_note: str, log_dir: Path):
    rtmp_url = getattr(args, "rtmp_url", None)        # (other benchmarks start servers here too, without outputs)
    extra = ["--rtmp-target", f"{RTMP_TARGET}={rtmp_url}"] if rtmp_url else []
    async with server_process(weights, avatar, log_dir, backend=args.backend, max_sessions=max(args.sessions),
                              max_batch=args.max_batch, render_budget=args.render_budget,
                              device=args.device, extra=extra) as (url, proc, health, config):
        yield ServerInfo(url, f"child process (pid {proc.pid})", health.get("backend", "?"),
                         f"{config.get('family')}, {config.get('size')}² ({model_note})", _budget_ms(args),
                         pid=proc.pid)


@contextlib.asynccontextmanager
async def _remote_server(args: argparse.Namespace):
    url = args.server.rstrip("/")
    try:
        health = await _get_json(f"{url}/health")
        config = await _get_json(f"{url}/config")
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise RuntimeError(f"cannot reach the server at {url}: {type(e).__name__}: {e}") from None
    if health.get("max_sessions", 0) < max(args.sessions):
        logger.warning("the server allows %s sessions; levels above that will be refused", health.get("max_sessions"))
    yield ServerInfo(url, url, health.get("backend", "?"), f"{config.get('family')}, {config.get('size')}²",
                     _budget_ms(args))


def _describe_config(cfg, note: str) -> str:
    widths = ", ".join(str(w) for w in cfg.widths)
    return f"{cfg.family}, {cfg.size}², widths ({widths}), style {cfg.style_dim} ({note})"


# ================================================================================================ report


def _f(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["sessions", "video latency p50 (ms)", "video latency p95 (ms)", "server delay (ms)", "look-ahead (ms)",
            "render budget (ms)", "unavoidable (ms)", "added p95 (ms)", "voice latency p50 (ms)", "audio in (ms)",
            "video out (ms)", "A/V offset p50 (ms)",
            "max \\|A/V\\| (ms)", "fps received (mean / min)", "frames measured", "frames lost", "server p95 (ms)",
            "dropped / repeated / skipped", "renderer kept up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * (len(head) - 1) + ["---"]) + "|"]
    for r in rows:
        n = str(r["sessions"]) if r["sessions_ok"] == r["sessions"] else f"{r['sessions']} ({r['sessions_ok']} ok)"
        kept = "yes" if r["kept_up"] else f"no ({100 * r['late_fraction']:.0f} % not in time)"
        fps = "—" if r["fps_mean"] is None else f"{r['fps_mean']:.1f} / {r['fps_min']:.1f}"
        lost = str(r["frames_lost"]) + (f" (+{r['bad_index']} unreadable)" if r["bad_index"] else "")
        lines.append("| " + " | ".join([
            n, _f(r["video_latency_ms_p50"]), _f(r["video_latency_ms_p95"]), _f(r["delay_ms"]), _f(r["lookahead_ms"]),
            _f(r["render_budget_ms"]), _f(r["unavoidable_ms"]), _f(r["added_ms_p95"]), _f(r["voice_latency_ms_p50"]),
            _f(r["audio_in_ms_p50"]), _f(r["video_out_ms_p50"]),
            _f(r["av_offset_ms_p50"]), _f(r["av_offset_ms_max_abs"]), fps,
            f"{100 * r['frames_measured']:.0f} %", lost, _f(r["server_latency_ms_p95_max"]),
            f"{r['frames_dropped']} / {r['frames_repeated']} / {r['frames_skipped']}", kept]) + " |")
    return "\n".join(lines)


LEGEND = """\
- video latency: a frame's arrival at the client minus the moment the last audio sample it shows was sent \
(frames pooled over all sessions of the level).
- server delay: the server's output delay of a session (`delay_ms`: lip-sync look-ahead + render budget); \
look-ahead: how far past the *first* sample of a frame's audio the mouth's audio window reaches; render budget: \
the time the server gives a frame after its audio is complete (measured by the server from the frames it \
rendered, unless fixed with --render-budget); unavoidable: the same counted from the frame's *last* sample, \
as the video latency is (look-ahead − 40 ms): the audio window the mouth needs, which no implementation avoids.
- added p95: video latency p95 − unavoidable, i.e. everything beyond the audio window the mouth needs: the \
render budget, VP8 encode/decode, Opus, transport, aiortc's jitter buffers (both directions), event-loop delays. \
Target: ≤ {target:.0f} ms at 25 fps with the renderer keeping up.
- voice latency: arrival of the echoed voice packet minus the moment its audio was sent (found by \
cross-correlation; lowest normalised correlation over sessions: {corr}).
- audio in: client → server, from the moment the client's first audio sample was sent to the moment the \
server placed it on its session clock (Opus, transport, the server's aiortc audio jitter buffer; median over \
sessions; measured when the server runs in this process or on this host).
- video out: the rest of the median video latency, video latency − (server delay − 40 ms) − audio in: server → client \
video (VP8 encode, transport, the client's jitter buffer and decode).
- A/V offset: a frame's arrival minus the arrival of the voice packet carrying the first sample of its audio \
(positive = video late), both as aiortc hands them to the application.
- fps received: frames over their arrival span, per session; frames measured: frames showing the sent audio that \
arrived (within {tail:g} s after the server's delay past the end of the audio) with a readable index, over the \
frames the audio spans, all sessions; frames lost: gaps in the painted frame indices (+ frames whose index was \
unreadable).
- server p95: the server's own audio-arrival → frame-send p95 (worst session); dropped / repeated / \
skipped: the server's counters summed over sessions (renders that missed their deadline or came too late / \
frames sent again because the next was not ready / frames jumped over). Renderer kept up: dropped, and \
repeated + skipped, each at most {kept:.0f} % of the frames due (one frame forgiven). In probe mode the server \
paints every frame's index, also on the stand-in it sends for a frame not rendered in time, so the latency \
columns measure the pipeline, and this column says whether the mouth was rendered in time."""


def _command_line(argv: Sequence[str] | None) -> str:
    return shlex.join(["python", "-m", "edtalk_live.benchmarks.latency", *(sys.argv[1:] if argv is None else argv)])


def machine_line() -> str:
    """This machine in one line, as the benchmarks' reports start."""
    from edtalk_live.benchmarks.fps import machine_description

    m = machine_description()
    return f"{m['cpu']}, {m.get('memory', '?')} RAM; Python {m['python']}; torch {m['torch']} " \
           f"({m['torch_threads']} threads); GPU: {m.get('gpu', 'none')}"


def report(rows: Sequence[dict[str, Any]], info: ServerInfo, args: argparse.Namespace, argv: Sequence[str] | None,
           audio_note: str, load_start: str, date: str) -> str:
    machine = machine_line()
    corr = min((r["voice_correlation_min"] for r in rows if r["voice_correlation_min"] is not None), default=None)
    lines = [
        f"Machine: {machine}; load average {load_start or '?'} at the start, {_load() or '?'} at the end",
        "",
        f"Server: {info.where}; backend {info.backend}; model {info.model}; render budget "
        + (f"{info.render_budget_ms:.0f} ms" if info.render_budget_ms is not None else "measured by the server")
        + ("; low-latency lip sync" if args.low_latency else ""),
        "",
        f"Clients: aiortc in this process, {args.seconds:g} s of {audio_note} per session, probe mode; {date}",
        "",
        f"Command: `{_command_line(argv)}`",
        "",
        format_table(rows),
        "",
        LEGEND.format(target=TARGET_ADDED_MS, corr="—" if corr is None else f"{corr:.2f}",
                      kept=100 * KEPT_UP_FRACTION, tail=TAIL_S),
    ]
    errors = [(r["sessions"], e) for r in rows for e in r["errors"]]
    if errors:
        lines += ["", "Failed sessions:"] + [f"- {n} sessions: {e}" for n, e in errors[:10]]
    return "\n".join(lines)


# ================================================================================================ CLI


def positive_ints(text: str) -> list[int]:
    """A command-line list like ``1,4,16`` of integers >= 1 (session counts, batch sizes)."""
    try:
        items = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"give integers >= 1, got {text!r}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.latency",
        description="Audio-in -> frame-out latency (p50/p95) and A/V offset for 1, 4 and 16 concurrent sessions, "
                    "measured end to end with real WebRTC clients. Prints a Markdown table.")
    src = p.add_argument_group("server (default: --random test, started in this process)")
    src.add_argument("--server", metavar="URL", help="measure a running server instead of starting one")
    src.add_argument("--weights", metavar="DIR", help="start a server with these official weights (needs --avatar)")
    src.add_argument("--avatar", metavar="IMAGE", help="the avatar image for --weights")
    src.add_argument("--random", choices=("test", "small", "official", "tiny"), default=None,
                     help="start a server with seeded random weights: test (64², fixture widths), small (128²) "
                          "or official (256², published widths)")
    src.add_argument("--family", choices=("edtalk", "lip_pose"), default="edtalk", help="for --random (edtalk)")
    src.add_argument("--server-process", action="store_true",
                     help="start the server in a child process instead of this one")
    src.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime", "tensorrt"),
                     help="renderer of a started server (auto: as `serve` picks it)")
    src.add_argument("--device", default=None, help="torch device of a started server (default: cuda if available)")
    src.add_argument("--render-budget", type=float, default=None, metavar="S",
                     help="a fixed render budget for a started server, seconds (default: the server measures it)")
    src.add_argument("--max-batch", type=int, default=16, metavar="N", help="frames per renderer call (16)")
    p.add_argument("--sessions", type=positive_ints, default=[1, 4, 16], help="concurrency levels (1,4,16)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio sent per session, seconds (10)")
    p.add_argument("--audio", metavar="FILE", help="audio to send (default: a built-in speech-like signal)")
    p.add_argument("--low-latency", action="store_true", help="ask for the low-latency lip sync (40 ms look-ahead)")
    p.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to connect a client (60)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the test audio (0)")
    p.add_argument("--outputs", type=output_list, default=None, metavar="LIST",
                   help=f"also measure one session through each of these outputs at once ({', '.join(OUTPUTS)}; rtmp "
                        "needs a server the benchmark starts: it configures an RTMP target and receives it), "
                        "in a table of its own")
    p.add_argument("--json", metavar="OUT", help="also write every measurement here")
    return p


def output_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in OUTPUTS]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"outputs are a comma-separated list of {', '.join(OUTPUTS)}; got {text!r}")
    return list(dict.fromkeys(items))


def _budget_ms(args: argparse.Namespace) -> float | None:
    return None if args.render_budget is None else args.render_budget * 1000


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.server and (args.weights or args.random or args.server_process):
        p.error("--server measures a running server: do not combine it with --weights, --random or --server-process")
    if args.weights and args.random:
        p.error("give either --weights (with --avatar) or --random, not both")
    if args.weights and not args.avatar:
        p.error("--weights needs --avatar IMAGE")
    if not args.server and not args.weights and not args.random:
        args.random = "test"
    if args.seconds <= 0.5:
        p.error(f"--seconds must be above 0.5, got {args.seconds:g}")
    if args.render_budget is not None and not 0 < args.render_budget < 2:
        p.error(f"--render-budget must be between 0 and 2 seconds, got {args.render_budget:g}")
    args.rtmp_port = args.rtmp_url = None
    if args.outputs and "rtmp" in args.outputs:
        if args.server:
            p.error("--outputs rtmp needs a server the benchmark starts (it configures the RTMP target): not --server")
        args.rtmp_port = _free_port()
        args.rtmp_url = f"rtmp://127.0.0.1:{args.rtmp_port}/{RTMP_PATH}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table on stdout. Returns 0, or 1 when no session of a level worked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    if args.audio:
        from edtalk_live.media.io import load_audio

        audio = load_audio(args.audio, RATE)[: int(args.seconds * RATE)]
        audio_note = Path(args.audio).name
        args.seconds = len(audio) / RATE
    else:
        audio = speech_like(args.seconds, args.seed)
        audio_note = "built-in speech-like audio (noise and chirp bursts with pauses)"
    load_start = _load()
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    with tempfile.TemporaryDirectory(prefix="edtalk-latency-") as tmp:
        rows, levels, info, output_rows = asyncio.run(_bench(args, audio, Path(tmp)))
    out = report(rows, info, args, argv, audio_note, load_start, date)
    if output_rows:
        out += ("\n\nOutputs: one session, received by every output at once, each measured like the WebRTC peer "
                "(video latency from the end of a frame's audio; A/V offset = a frame's arrival - its voice's "
                "arrival, as each receiver hands them over)\n\n" + format_outputs_table(output_rows))
    print(out)
    if args.json:
        data = {"command": _command_line(argv), "date": date, "server": info.to_dict(), "audio": audio_note,
                "seconds": args.seconds, "rows": rows, "outputs": output_rows,
                "levels": [{"sessions": lv.sessions, "wall_s": lv.wall_s, "measures": [asdict(m) for m in lv.measures]}
                           for lv in levels]}
        Path(args.json).write_text(json.dumps(data, indent=1))
        logger.info("wrote %s", args.json)
    return 0 if all(r["sessions_ok"] for r in rows) and not any(r["error"] for r in output_rows) else 1


async def _bench(args: argparse.Namespace, audio: np.ndarray, tmp: Path
                 ) -> tuple[list[dict[str, Any]], list[LevelResult], ServerInfo, list[dict[str, Any]]]:
    if args.server:
        server = _remote_server(args)
    else:
        weights, avatar, note = bench_weights(args, tmp)
        server = (_child_server(weights, avatar, args, note, tmp) if args.server_process
                  else _in_process_server(weights, avatar, args, note))
    options: dict[str, Any] = {"probe": True}
    if args.low_latency:
        options["low_latency"] = True
    rows, levels = [], []
    async with server as info:
        logger.info("server %s: %s, %s", info.url, info.backend, info.model)
        for n in args.sessions:
            await _wait_idle(info.url)
            logger.info("%d session(s): sending %.1f s of audio each", n, len(audio) / RATE)
            level = await run_level(info.url, n, audio, options, args.connect_timeout, info.spy)
            row = summarise(level, info.render_budget_ms)
            logger.info("%d session(s): video p50 %s / p95 %s ms, A/V p50 %s ms, fps %s, kept up %s", n,
                        _f(row["video_latency_ms_p50"]), _f(row["video_latency_ms_p95"]),
                        _f(row["av_offset_ms_p50"]), _f(row["fps_mean"], 1), row["kept_up"])
            levels.append(level)
            rows.append(row)
        output_rows = []
        if args.outputs:
            await _wait_idle(info.url)
            logger.info("outputs %s: one session", ", ".join(args.outputs))
            output_rows = await run_outputs(info.url, audio, options, args.outputs, args.rtmp_port,
                                            args.connect_timeout)
    return rows, levels, info, output_rows


if __name__ == "__main__":
    sys.exit(main())
