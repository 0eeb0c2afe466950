"""Soak: N live sessions for half an hour, judged every 10 s: frame rate, lips against voice, event-loop lag, buffers.

    python -m edtalk_live.benchmarks.soak                                   # 2 sessions x 30 minutes, `test` model
    python -m edtalk_live.benchmarks.soak --sessions 2 --minutes 3 --weights DIR --avatar face.png --json soak.json

``edtalk-live serve --workers 1`` is started as its own process (seeded random 64² weights unless ``--weights``),
on one core when the machine has more (``--server-cores``, as ``benchmarks/capacity.py``), and every session is a
WebRTC client in a process of its own on the other cores (``realtime/client.py``), sending speech-like audio in
real time for the whole run (generated at that length: nothing repeats, so the returned voice matches the sent
audio at one place only). The sessions run in probe mode: each frame carries its index ``i``, and frame ``i`` shows
the mouth of session samples ``[640 i, 640 (i+1))``, so the index *is* the audio sample the lips show. Per
``--window`` (10 s) of the sent audio, each client measures (``benchmarks/loss.py``'s :func:`windows`):

- fps delivered: frames showing the window's audio that arrived; fps on time: those that arrived within 0.5 s of
  leaving the server (a stream falling behind shows here first);
- lips − voice: a frame's media time minus the media time of the returned voice sample carrying the first sent
  sample its mouth shows (found by cross-correlation), both from their track's first packet: how a receiver
  playing by timestamps pairs them (the window's median); drift: the slope of a straight line fitted to the
  windows' medians over time, ms per minute;
- the server's per-session counters and buffer sizes (a ``stats`` control message each window).

The benchmark reads the server's ``/metrics`` every window: the event-loop lag p99 (from the window's share of
``edtalk_event_loop_lag_seconds``), the largest per-session buffers (``edtalk_session_buffer_max``) and the
server's resident memory. The run passes when every window of every session has 25 ± 1 fps delivered and on time,
|lips − voice| <= 40 ms, drift <= 1 ms/min, the fps on time of the last 30 s is no more than 0.5 below the first
30 s's, loop-lag p99 <= 20 ms in every window, and every buffer stays within :data:`BUFFER_BOUNDS`. The Markdown
report goes to stdout (a summary per session with its worst window, and the server's), progress to stderr;
``--json`` keeps every window.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edtalk_live.benchmarks.capacity import Snapshot, snapshot, split_cores
from edtalk_live.benchmarks.latency import (
    TAIL_S,
    _f,
    _load,
    bench_weights,
    machine_line,
    pin_to,
    server_process,
    speech_like,
)
from edtalk_live.benchmarks.loss import windows
from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE
from edtalk_live.realtime.metrics import BufferSizes

logger = logging.getLogger(__name__)

#: the issue's figures: 25 ± 1 fps in every window, lips within 40 ms of the voice drifting <= 1 ms per minute,
#: event-loop lag p99 <= 20 ms in every window, no fps decay (the last 30 s against the first)
FPS_TOLERANCE = 1.0
MAX_OFFSET_MS = 40.0
MAX_DRIFT_MS_PER_MIN = 1.0
MAX_LOOP_LAG_P99_S = 0.020
MAX_FPS_DECAY = 0.5
DECAY_WINDOWS = 3
#: the most each per-session buffer (:meth:`edtalk_live.realtime.session.Session.buffer_sizes`) may hold at any
#: time, whatever the session's length: a few times what one frame's pipeline needs (the output delay is at most
#: 1.2 s: the look-ahead and a render budget of at most 1 s), or the buffer's own fixed capacity
BUFFER_BOUNDS: dict[str, int] = {
    "frames": 50,                        # rendered, not yet sent: 2 s of video
    "audio_unplayed": 2 * SAMPLE_RATE,   # received, not yet played back: 2 s
    "lip_samples": SAMPLE_RATE,          # the lip sync's raw samples (about 1.5k in use)
    "lip_mel_frames": 200,               # its mel frames (a few dozen)
    "lip_frames": 25,                    # its coefficients awaiting output (a few)
    "sink_queue": 2 * FPS,               # chunks waiting in a sink (WebRTC: 2 frames, 400 ms of voice)
    "scheduler_queue": 50,               # the session's frames waiting for the renderer
    "arrivals": 400,                     # audio arrivals kept for the latency (a deque of 400)
    "tasks": 60,                         # its tasks: producer, audio in, renders in flight
    "video_late_log": 512,               # the video track's timing log (trimmed at 512)
}


# ================================================================================================ one client


def _client_main(args: argparse.Namespace) -> int:
    """One session (a process of its own): send speech-like audio for ``--seconds``, ask for the server's stats
    every window, read each frame's index as it arrives; then measure the windows and write them as JSON."""
    from edtalk_live.realtime.client import run_client

    audio = speech_like(args.seconds, args.seed)
    polls = [(args.window * k, {"type": "stats"}) for k in range(1, int(args.seconds // args.window) + 1)]
    result = asyncio.run(run_client(args.client, audio, None, options={"probe": True}, read_probe=True,
                                    record_window=False, tail=TAIL_S, control=polls, connect_timeout=60.0,
                                    audio_prefetch=1))
    rows = windows(result, audio, 0.0, args.window)
    stats = [r["stats"] for r in result.replies if r.get("type") == "stats" and "stats" in r]
    # the server's counters over each window: the poll at its end minus the one at its start
    before: dict[str, Any] = {}
    for row, poll in zip(rows, stats, strict=False):
        for key in ("frames_repeated", "frames_skipped", "frames_dropped"):
            row[key] = int(poll.get(key) or 0) - int(before.get(key) or 0)
        row["buffers"] = poll.get("buffers", {})
        before = poll
    Path(args.out).write_text(json.dumps({
        "session": result.session, "send_start": result.send_start, "windows": rows, "server": result.stats,
        "buffers_seen": [s.get("buffers", {}) for s in stats], "video_frames": result.video_frames}))
    return 0


# ================================================================================================ measuring


def histogram_quantile(q: float, a: Snapshot, b: Snapshot, name: str) -> float | None:
    """The ``q`` quantile of histogram ``name`` over what was observed between snapshots ``a`` and ``b``
    (linear within a bucket, as Prometheus' ``histogram_quantile``; the largest finite bound past it)."""
    buckets = sorted((float(dict(labels)["le"]), v - a.samples.get((n, labels), 0.0))
                     for (n, labels), v in b.samples.items() if n == f"{name}_bucket")
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_bound, prev_count = bound, count
    return prev_bound


def server_window(a: Snapshot, b: Snapshot, t0: float) -> dict[str, Any]:
    """What the server's ``/metrics`` say about the window between snapshots ``a`` and ``b``."""
    buffers = {dict(labels)["buffer"]: v for (n, labels), v in b.samples.items() if n == BufferSizes.NAME}
    return {"start_s": a.at - t0, "end_s": b.at - t0,
            "sessions": int(min(a.get("edtalk_sessions"), b.get("edtalk_sessions"))),
            "loop_lag_p99_ms": _ms(histogram_quantile(0.99, a, b, "edtalk_event_loop_lag_seconds")),
            "loop_lag_samples": b.get("edtalk_event_loop_lag_seconds_count") - a.get(
                "edtalk_event_loop_lag_seconds_count"),
            "rss_mb": b.get("process_resident_memory_bytes") / 2**20, "buffers": buffers}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def session_summary(data: dict[str, Any]) -> dict[str, Any]:
    """One session's windows summed up: the worst of each figure, the drift, the fps decay."""
    rows = data["windows"]
    p50 = [(r["start_s"], r["av_offset_ms_p50"]) for r in rows if r["av_offset_ms_p50"] is not None]
    drift = None
    if len(p50) >= 2:
        t, y = np.asarray(p50, np.float64).T
        half = (rows[0]["end_s"] - rows[0]["start_s"]) / 2
        drift = float(np.polyfit((t + half) / 60, y, 1)[0])        # against each window's middle, in minutes
    on_time = [r["fps_on_time"] for r in rows]
    n = min(DECAY_WINDOWS, len(rows) // 2)
    buffers: dict[str, int] = {}
    for seen in data.get("buffers_seen", []):
        for k, v in seen.items():
            buffers[k] = max(buffers.get(k, 0), int(v))
    worst_fps = min(rows, key=lambda r: min(r["fps"], r["fps_on_time"])) if rows else None
    worst_av = max((r for r in rows if r["av_offset_ms_p50"] is not None), key=lambda r: abs(r["av_offset_ms_p50"]),
                   default=None)
    return {
        "session": data["session"], "windows": len(rows),
        "fps_min": min((r["fps"] for r in rows), default=None), "fps_max": max((r["fps"] for r in rows), default=None),
        "fps_on_time_min": min(on_time, default=None),
        "worst_fps_window": None if worst_fps is None else worst_fps["start_s"],
        "fps_first": float(np.mean(on_time[:n])) if n else None,
        "fps_last": float(np.mean(on_time[-n:])) if n else None,
        "av_p50_min": min((y for _, y in p50), default=None), "av_p50_max": max((y for _, y in p50), default=None),
        "worst_av_window": None if worst_av is None else worst_av["start_s"],
        "av_frame_max": max((r["av_offset_ms_max"] for r in rows if r["av_offset_ms_max"] is not None), default=None),
        "av_measured": sum(r["av_measured"] for r in rows),
        "drift_ms_per_min": drift,
        "frames_repeated": sum(r.get("frames_repeated", 0) for r in rows),
        "frames_skipped": sum(r.get("frames_skipped", 0) for r in rows),
        "frames_dropped": sum(r.get("frames_dropped", 0) for r in rows),
        "buffers_max": buffers,
    }


def verdict(data: dict[str, Any]) -> list[str]:
    """What fell short of the issue's figures (see the module docstring); empty when none did."""
    bad = []
    for s, summary in zip(data["sessions"], data["summaries"], strict=True):
        name = f"session {summary['session'][:8]}"
        if len(s["windows"]) < data["expected_windows"]:
            bad.append(f"{name}: {len(s['windows'])} of {data['expected_windows']} windows measured")
        for r in s["windows"]:
            at = f"{name} {r['start_s']:g}–{r['end_s']:g} s"
            for key in ("fps", "fps_on_time"):
                if abs(r[key] - FPS) > FPS_TOLERANCE:
                    bad.append(f"{at}: {key.replace('_', ' ')} {r[key]:.1f}")
            if r["av_offset_ms_p50"] is None or r["av_measured"] < FPS:      # a second of voiced frames at least
                bad.append(f"{at}: lips against voice not measured ({r['av_measured']} frames)")
            elif abs(r["av_offset_ms_p50"]) > MAX_OFFSET_MS:
                bad.append(f"{at}: lips − voice {r['av_offset_ms_p50']:.0f} ms")
        if summary["drift_ms_per_min"] is None or abs(summary["drift_ms_per_min"]) > MAX_DRIFT_MS_PER_MIN:
            bad.append(f"{name}: drift {_f(summary['drift_ms_per_min'], 2)} ms/min")
        if summary["fps_first"] is not None and summary["fps_first"] - summary["fps_last"] > MAX_FPS_DECAY:
            bad.append(f"{name}: fps on time fell from {summary['fps_first']:.2f} to {summary['fps_last']:.2f}")
        bad += [f"{name}: buffer {k} reached {v} (bound {BUFFER_BOUNDS[k]})"
                for k, v in summary["buffers_max"].items() if k in BUFFER_BOUNDS and v > BUFFER_BOUNDS[k]]
    full = [w for w in data["server_windows"] if w["sessions"] == data["sessions_wanted"]]
    if not full:
        bad.append("no window of the server's metrics with every session live")
    for w in full:
        lag = w["loop_lag_p99_ms"]
        if lag is None or lag > MAX_LOOP_LAG_P99_S * 1000:
            bad.append(f"server {w['start_s']:.0f}–{w['end_s']:.0f} s: event-loop lag p99 {_f(lag, 1)} ms")
        bad += [f"server {w['start_s']:.0f}–{w['end_s']:.0f} s: buffer {k} at {v:g} (bound {BUFFER_BOUNDS[k]})"
                for k, v in w["buffers"].items() if k in BUFFER_BOUNDS and v > BUFFER_BOUNDS[k]]
    return bad


# ================================================================================================ running


async def _soak(args: argparse.Namespace, weights: Path, avatar: Path, tmp: Path) -> dict[str, Any]:
    server_cpus, client_cpus = split_cores(args.server_cores)
    seconds = args.minutes * 60
    async with server_process(weights, avatar, tmp, backend=args.backend, max_sessions=args.sessions,
                              device=args.device, cpus=server_cpus) as (url, proc, health, config):
        logger.info("server %s (pid %d): %s, %s %s²; %d sessions x %g min", url, proc.pid, health.get("backend"),
                    config.get("family"), config.get("size"), args.sessions, args.minutes)
        outs = [tmp / f"client-{i}.json" for i in range(args.sessions)]
        logs = [tmp / f"client-{i}.log" for i in range(args.sessions)]
        procs = []
        for i in range(args.sessions):
            cmd = [sys.executable, "-m", "edtalk_live.benchmarks.soak", "--client", url, "--seconds", f"{seconds:g}",
                   "--window", f"{args.window:g}", "--seed", str(args.seed + i), "--out", str(outs[i])]
            with open(logs[i], "wb") as log:    # a file, not a pipe: half an hour of warnings must not block it
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                              preexec_fn=pin_to(client_cpus)))
        try:
            snaps = await _watch(url, procs, args)
        finally:
            for p in procs:
                try:
                    await asyncio.to_thread(p.wait, timeout=seconds + 600)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        sessions = []
        for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
            if p.returncode != 0 or not out.exists():
                tail = logs[i].read_text(errors="replace")[-2000:]
                raise RuntimeError(f"client {i} exited with {p.returncode}:\n{tail}")
            sessions.append(json.loads(out.read_text()))
        t0 = snaps[0].at if snaps else 0.0
        return {"backend": health.get("backend", "?"), "model": f"{config.get('family')}, {config.get('size')}²",
                "server_pid": proc.pid, "server_cpus": sorted(server_cpus) if server_cpus else None,
                "client_cpus": sorted(client_cpus) if client_cpus else None, "sessions": sessions,
                "server_windows": [server_window(a, b, t0) for a, b in zip(snaps, snaps[1:], strict=False)]}


async def _watch(url: str, procs: Sequence[subprocess.Popen], args: argparse.Namespace) -> list[Snapshot]:
    """The server's metrics every window while the clients run, from the moment every session is live."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(p.poll() is not None for p in procs):
            return []
        try:
            if (await snapshot(url)).get("edtalk_sessions") >= args.sessions:
                break
        except Exception:  # noqa: BLE001 - the server is busy starting sessions: ask again
            pass
        await asyncio.sleep(0.2)
    else:
        logger.warning("not every session came up within 120 s")
    snaps = [await snapshot(url)]
    logger.info("%d sessions live", args.sessions)
    while any(p.poll() is None for p in procs):
        await asyncio.sleep(max(0.0, snaps[0].at + args.window * len(snaps) - time.monotonic()))
        snaps.append(await snapshot(url))
        if len(snaps) % 6 == 1:
            w = server_window(snaps[-2], snaps[-1], snaps[0].at)
            logger.info("%.0f s: %d sessions, loop lag p99 %s ms, RSS %.0f MB", w["end_s"], w["sessions"],
                        _f(w["loop_lag_p99_ms"], 1), w["rss_mb"])
        if snaps[-1].get("edtalk_sessions") == 0:
            break
    return snaps


# ================================================================================================ report


def format_sessions(summaries: Sequence[dict[str, Any]]) -> str:
    head = ["session", "windows", "fps delivered min / max", "fps on time min (worst window, s)",
            "fps on time first → last 30 s", "lips − voice p50 min / max (ms)", "max \\|lips − voice\\| any frame (ms)",
            "drift (ms/min)", "repeated / skipped / dropped"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in summaries:
        lines.append("| " + " | ".join([
            s["session"][:8], str(s["windows"]), f"{_f(s['fps_min'], 1)} / {_f(s['fps_max'], 1)}",
            f"{_f(s['fps_on_time_min'], 1)} ({_f(s['worst_fps_window'])})",
            f"{_f(s['fps_first'], 2)} → {_f(s['fps_last'], 2)}", f"{_f(s['av_p50_min'], 1)} / {_f(s['av_p50_max'], 1)}",
            _f(s["av_frame_max"]), _f(s["drift_ms_per_min"], 3),
            f"{s['frames_repeated']} / {s['frames_skipped']} / {s['frames_dropped']}"]) + " |")
    return "\n".join(lines)


def format_server(data: dict[str, Any]) -> str:
    full = [w for w in data["server_windows"] if w["sessions"] == data["sessions_wanted"]]
    lags = [w["loop_lag_p99_ms"] for w in full if w["loop_lag_p99_ms"] is not None]
    worst = max(full, key=lambda w: w["loop_lag_p99_ms"] or 0.0) if full else None
    rss = [w["rss_mb"] for w in full]
    head = ["windows (all sessions live)", "event-loop lag p99, median window / worst window (ms)", "worst window (s)",
            "RSS first → last window (MB)", "RSS largest (MB)"]
    row = [str(len(full)), f"{_f(float(np.median(lags)) if lags else None, 1)} / {_f(max(lags, default=None), 1)}",
           "—" if worst is None else f"{worst['start_s']:.0f}–{worst['end_s']:.0f}",
           f"{_f(rss[0] if rss else None)} → {_f(rss[-1] if rss else None)}", _f(max(rss, default=None))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head), "| " + " | ".join(row) + " |", "",
             "| buffer (per session) | bound | largest seen: server gauge / sessions' stats | first window "
             "| last window |",
             "|---|---:|---:|---:|---:|"]
    for k, bound in BUFFER_BOUNDS.items():
        gauge = [w["buffers"].get(k) for w in full if k in w["buffers"]]
        stats = [s["buffers_max"].get(k) for s in data["summaries"] if k in s["buffers_max"]]
        lines.append(f"| {k} | {bound} | {_f(max(gauge, default=None))} / {_f(max(stats, default=None))} | "
                     f"{_f(gauge[0] if gauge else None)} | {_f(gauge[-1] if gauge else None)} |")
    return "\n".join(lines)


def report(data: dict[str, Any]) -> str:
    cores = (f"server on core(s) {data['server_cpus']}, clients on {data['client_cpus']}" if data["server_cpus"]
             else "server and clients not pinned")
    return "\n".join([
        f"Machine: {data['machine']}; load average {data['load_start'] or '?'} at the start, "
        f"{data['load_end'] or '?'} at the end",
        "",
        f"Server: `serve --workers 1` process; backend {data['backend']}; model {data['model']} ({data['note']}); "
        f"{cores}; {data['date']}",
        "",
        f"Sessions: {data['sessions_wanted']} × {data['minutes']:g} min of built-in speech-like audio, probe mode, "
        f"each client a process of its own; judged per {data['window']:g} s window",
        "",
        f"Command: `{data['command']}`",
        "",
        format_sessions(data["summaries"]),
        "",
        format_server(data),
    ])


# ================================================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edtalk_live.benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=2, help="sessions at once (2)")
    p.add_argument("--minutes", type=float, default=30.0, help="length of every session, minutes (30)")
    p.add_argument("--window", type=float, default=10.0, help="measuring window, seconds (10)")
    p.add_argument("--weights", metavar="DIR", help="weights folder (with --avatar); default: --random test")
    p.add_argument("--avatar", metavar="IMAGE", help="the avatar image for --weights")
    p.add_argument("--random", choices=("test", "small", "official", "tiny"), default="test",
                   help="seeded random weights when no --weights: test (64²), small (128²), official (256²)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime", "tensorrt"))
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--server-cores", type=int, default=1, metavar="N",
                   help="run the server on N cores and the clients on the others (1; 0: no pinning)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the test audio (0)")
    p.add_argument("--json", metavar="OUT", help="also write every window here")
    # one client process (started by the benchmark itself)
    p.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak; 0 when every window met the issue's figures, 1 when one did not, 2 for a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.client:
        return _client_main(args)
    if bool(args.weights) != bool(args.avatar):
        parser.error("--weights and --avatar go together")
    if not (args.sessions >= 1 and args.window > 0 and args.minutes * 60 >= 2 * args.window):
        parser.error("give --sessions >= 1, --window > 0 and --minutes spanning at least two windows")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    load_start = _load()
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    with tempfile.TemporaryDirectory(prefix="edtalk-soak-") as tmp:
        weights, avatar, note = bench_weights(args, Path(tmp))
        data = asyncio.run(_soak(args, weights, avatar, Path(tmp)))
    command = shlex.join(["python", "-m", "edtalk_live.benchmarks.soak", *(sys.argv[1:] if argv is None else argv)])
    data.update(command=command, date=date, machine=machine_line(), load_start=load_start, load_end=_load(),
                note=note, minutes=args.minutes, window=args.window, sessions_wanted=args.sessions,
                expected_windows=int(args.minutes * 60 // args.window), bounds=BUFFER_BOUNDS)
    data["summaries"] = [session_summary(s) for s in data["sessions"]]
    bad = verdict(data)
    data["short_of_target"] = bad
    print(report(data))
    print("\nVerdict: " + ("every window met the figures" if not bad else
                           f"short of the target ({len(bad)}): " + "; ".join(bad[:20])))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
