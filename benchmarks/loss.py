"""Frames per second and lip sync of a call under packet loss, and of a healthy session beside a failing one.

    sudo python -m edtalk_live.benchmarks.loss                      # 5 minutes at 5 % UDP loss, the `test` model
    sudo python -m edtalk_live.benchmarks.loss --seconds 60 --weights DIR --avatar face.png --json loss.json
    python -m edtalk_live.benchmarks.loss --loss 0 --fault --seconds 60   # a second session that always fails

**Loss.** Our kernels have no ``netem``, so loss is an nftables rule: the benchmark runs itself again under
``unshare --net`` (root), and inside that fresh network namespace adds ``127.0.0.2/8`` to ``lo`` (aioice
gathers no candidate on 127.0.0.1), brings ``lo`` up and drops ``--loss`` % of the UDP packets at random
(``meta l4proto udp numgen random mod 100 < N drop`` on the output hook: every packet, either way, once;
signaling is TCP and is not touched). Server and client run in that namespace, in this process (as
``benchmarks/latency.py`` runs them). The call starts with ``--baseline`` seconds without loss, then the
rule is added for ``--seconds``.

**What is measured**, by the client, per ``--window`` (10 s) of the sent audio; the sessions run in probe
mode (each frame carries its index) and the returned voice is matched to the sent audio by
cross-correlation (``benchmarks/latency.py``'s analysis):

- fps delivered: frames showing the window's audio that reached the client at all, per second; fps on
  time: those that arrived by 0.5 s after they left the server. aiortc's video receive buffer waits for a
  packet whose retransmission was lost too until another loss makes it ask again, then hands over one
  frame per arriving packet: it stays behind by the frames that came meanwhile, and the lag only grows
  (a browser's does not), so "on time" judges this client as much as the server.
- lips − voice: a frame's media time (its timestamp) minus that of the voice sample carrying the first
  sent sample its mouth shows, both counted from their track's first packet: how a receiver that plays by
  timestamps pairs them. Lost incoming audio placed wrongly would shift it; the client's buffers do not.
  "vs no loss" subtracts the baseline's median.

The voice is received with the server's audio buffer (``run_client(audio_prefetch=1)``), since aiortc's
own would hold it 300 ms after the first loss.

**Fault** (``--fault``): a second session runs beside the measured one, and the renderer fails on its
every frame (:class:`Poison`: CUDA's out-of-memory error, raised inside the batch); the table then also
shows what that session received. The Markdown report goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edtalk_live.benchmarks.latency import (
    FRAME_SAMPLES,
    RATE,
    TAIL_S,
    _f,
    _in_process_server,
    _load,
    _placed_voice,
    _to_16k,
    _valid_indices,
    analyse_session,
    bench_weights,
    machine_line,
    speech_like,
    voice_blocks,
)

logger = logging.getLogger(__name__)

#: set in the environment of the copy of the benchmark that runs inside the lossy namespace
INSIDE_ENV = "EDTALK_LIVE_LOSS_NAMESPACE"
#: the nftables table the rules live in (in the benchmark's own namespace: nothing else sees it)
TABLE = "edtalk_loss"
#: the issue's figures: at 5 % loss the call holds this many fps in every window, lips within this of no loss
MIN_FPS = 20.0
MAX_AV_SYNC_MS = 40.0


# ================================================================================================ faults


class Poison:
    """Fault injection into a renderer object: ``render`` raises CUDA's out-of-memory error for any batch holding a
    frame with the head exactly at ``rest_pose``, while :attr:`active`: the frames of a session that asked for
    ``pose: "still"`` (an idle head is never exactly there; prepared avatars may be shared between sessions,
    so the rows are told apart by their pose). The scheduler's batches of every session go through it.
    """

    def __init__(self, renderer, rest_pose: torch.Tensor):
        self.active = True
        self.raised = 0                    # renderer calls made to fail
        render = renderer.render
        rest = torch.as_tensor(rest_pose, dtype=torch.float32).reshape(1, -1)

        def poisoned_render(avatars, lip, pose):
            if self.active and bool((pose == rest).all(dim=1).any()):
                self.raised += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected fault)")
            return render(avatars, lip, pose)

        renderer.render = poisoned_render


# ================================================================================================ namespace


def unavailable() -> str | None:
    """Why a lossy network namespace cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (a network namespace of its own with an nftables rule)"
    for tool in ("unshare", "ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install util-linux iproute2 nftables)"
    return None


def _run(*cmd: str, stdin: str | None = None) -> str:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def setup_namespace() -> None:
    """In a fresh network namespace: loopback up with 127.0.0.2, and a table counting UDP packets (no loss yet)."""
    _run("ip", "addr", "add", "127.0.0.2/8", "dev", "lo")
    _run("ip", "link", "set", "lo", "up")
    _run("nft", "-f", "-", stdin=f"""
table inet {TABLE} {{
    chain out {{
        type filter hook output priority 0; policy accept;
        meta l4proto udp counter comment "udp"
    }}
}}
""")


def start_loss(percent: float) -> None:
    """Drop ``percent`` % of the UDP packets from now on (whole percents: ``numgen`` draws integers)."""
    _run("nft", "add", "rule", "inet", TABLE, "out", "meta", "l4proto", "udp", "numgen", "random", "mod", "100",
         "<", str(round(percent)), "counter", "drop", "comment", '"loss"')


def udp_counts() -> dict[str, int]:
    """Packets counted by the rules so far: ``{"udp": all UDP packets sent, "loss": those dropped}``."""
    counts = {"udp": 0, "loss": 0}
    for item in json.loads(_run("nft", "-j", "list", "table", "inet", TABLE))["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") in counts:
            counter = next((e["counter"] for e in rule["expr"] if "counter" in e), {})
            counts[rule["comment"]] = int(counter.get("packets", 0))
    return counts


# ================================================================================================ measuring


def media_sync(result, sent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per received frame (probe mode, readable index): its index, and the lips against the voice as their
    timestamps pair them, in ms: the frame's media time (pts) minus the media time of the voice sample carrying
    the first sent sample the frame's mouth shows (found by cross-correlating the returned voice, placed by its
    timestamps, with the sent audio; NaN where that sample was not found). Both tracks' times count from their
    first packet, both sent at session time 0, so 0 is in sync; the loss starts after them.
    """
    from edtalk_live.realtime.probe import read_index

    anchor = (result.stats or {}).get("audio_anchor")
    read = getattr(result, "video_index", [])          # read as the frames arrived (run_client's read_probe)
    indices = np.asarray(read if read and len(read) == len(result.video_arrival) else
                         [read_index(f) for f in result.frames], np.int64)
    keep = _valid_indices(indices)
    pts = np.asarray(result.video_pts, np.float64)[keep]
    indices = indices[keep]
    av = np.full(len(indices), np.nan)
    if anchor is None or not result.received_audio:
        return indices, np.asarray(result.video_arrival)[keep], av
    voice, _, _ = _placed_voice(result)
    _, blocks, _ = voice_blocks(_to_16k(voice, result.audio_rate), sent)
    if not blocks:
        return indices, np.asarray(result.video_arrival)[keep], av
    # blocks follow each other in the returned voice: only those whose span can hold k0 + their lag are tried
    # (a long call has thousands of blocks and frames)
    ends = np.asarray([b.end for b in blocks])
    lo_lag, hi_lag = min(b.lag for b in blocks), max(b.lag for b in blocks)
    for n, (i, p) in enumerate(zip(indices, pts, strict=True)):
        k0 = FRAME_SAMPLES * int(i) - anchor            # the first sent sample frame i shows
        for m in range(int(np.searchsorted(ends, k0 + lo_lag, side="right")), len(blocks)):
            b = blocks[m]
            if b.start > k0 + hi_lag:
                break
            j = k0 + b.lag                              # the returned voice's sample carrying it
            if b.start <= j < b.end:
                av[n] = (p / 90_000 - j / RATE) * 1000
                break
    return indices, np.asarray(result.video_arrival)[keep], av


def windows(result, sent: np.ndarray, baseline_s: float, window_s: float) -> list[dict[str, Any]]:
    """Per ``window_s`` of the sent audio: the frames showing it that arrived, per second (``fps``: what the
    stream delivered; ``fps_on_time``: those that arrived within the window's span after the server's delay
    and the client's jitter buffer, 0.5 s), and the lips against the voice (:func:`media_sync`); ``loss``
    says whether the window lies after the baseline."""
    anchor = (result.stats or {}).get("audio_anchor") or 0
    delay = float((result.stats or {}).get("delay_ms") or 0) / 1000
    indices, arrival, av = media_sync(result, sent)
    first_sent = (FRAME_SAMPLES * indices - anchor) / RATE           # seconds into the sent audio
    due = result.send_start + delay + first_sent                     # when the server sent it (its clock = ours)
    rows = []
    for k in range(int(len(sent) / RATE // window_s)):
        t0, t1 = k * window_s, (k + 1) * window_s
        inside = (first_sent >= t0) & (first_sent < t1)
        sync = av[inside & ~np.isnan(av)]
        frames = len(set(indices[inside].tolist()))
        on_time = len(set(indices[inside & (arrival <= due + 0.5)].tolist()))
        rows.append({"start_s": t0, "end_s": t1, "loss": t0 >= baseline_s - 1e-9, "frames": frames,
                     "fps": frames / window_s, "fps_on_time": on_time / window_s,
                     "av_offset_ms_p50": float(np.median(sync)) if len(sync) else None,
                     "av_offset_ms_max": float(np.abs(sync).max()) if len(sync) else None,
                     "av_measured": int(len(sync))})
    return rows


async def _call(args: argparse.Namespace, weights: Path, avatar: Path, note: str) -> dict[str, Any]:
    """One call (and, with ``--fault``, a poisoned second session), measured."""
    from edtalk_live.realtime.client import run_client

    audio = speech_like(args.baseline + args.seconds, args.seed)
    server_args = argparse.Namespace(sessions=[2], render_budget=None, max_batch=16, backend=args.backend,
                                     device=args.device)
    async with _in_process_server(weights, avatar, server_args, note) as info:
        server = info.spy.server
        poison = Poison(server.renderer, next(iter(server.avatars.values())).rest_pose) if args.fault else None
        before = {"udp": 0, "loss": 0}

        def begin_loss(_channel) -> None:          # called by the client when the baseline's audio was sent
            before.update(udp_counts())
            start_loss(args.loss)

        control = [(args.baseline, begin_loss)] if args.loss > 0 else None
        # the voice gets the server's receive buffer (aiortc's would hold it 300 ms after the first loss); the
        # tail leaves time for the frames aiortc's video buffer holds back after packets lost twice: about a
        # tenth of the call, at most its 512 packets (~20 s at 64²; see RESULTS.md)
        tail = TAIL_S + min(0.1 * args.seconds, 22.0) if args.loss > 0 else TAIL_S
        main = asyncio.create_task(run_client(info.url, audio, None, options={"probe": True}, keep_frames=True,
                                              record_window=False, tail=tail,
                                              control=control, audio_prefetch=1))
        poisoned = None
        if poison is not None:
            poisoned = asyncio.create_task(run_client(info.url, audio[: int((len(audio) / RATE - 2) * RATE)], None,
                                                      options={"probe": True, "pose": "still"}))
        result = await main
        other = await poisoned if poisoned is not None else None
        counts = udp_counts() if args.loss > 0 else {"udp": 0, "loss": 0}
        counts = {k: counts[k] - before[k] for k in counts}
        measure = analyse_session(result, audio)
        if measure.error:
            raise RuntimeError(f"the call could not be measured: {measure.error}")
        rows = windows(result, audio, args.baseline, args.window)
        base = [r["av_offset_ms_p50"] for r in rows if not r["loss"] and r["av_offset_ms_p50"] is not None]
        late = [r["fps"] - r["fps_on_time"] for r in rows]
        baseline_av = float(np.median(base)) if base else None
        for r in rows:
            r["av_sync_ms"] = (None if baseline_av is None or r["av_offset_ms_p50"] is None
                               else r["av_offset_ms_p50"] - baseline_av)
        out = {"backend": info.backend, "model": info.model, "baseline_av_offset_ms": baseline_av,
               "windows": [r for r in rows if r["loss"] or args.loss == 0],
               "baseline": [r for r in rows if not r["loss"]] if args.loss > 0 else [],
               "udp_packets": counts["udp"], "udp_dropped": counts["loss"], "server": result.stats,
               "frames_lost": measure.frames_lost, "video_latency_ms_p50": _pct(measure.video_latency_ms, 50),
               "video_latency_ms_max": max(measure.video_latency_ms, default=None), "late_fps_max": max(late)}
        if other is not None:
            events = [r for r in other.replies if r.get("type") == "error" and r.get("code")]
            out["fault"] = {"injected_failures": poison.raised, "events": events, "server": other.stats,
                            "frames_received": other.video_frames,
                            "fps": other.video_frames / other.sent_seconds if other.sent_seconds else 0.0}
        return out


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


# ================================================================================================ report


def format_table(data: dict[str, Any]) -> str:
    head = ["window (s)", "UDP loss", "fps delivered", "fps on time", "lips − voice p50 (ms)",
            "vs no loss (ms)", "max \\|lips − voice\\| (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    for r in data["baseline"] + data["windows"]:
        lines.append("| " + " | ".join([
            f"{r['start_s']:g}–{r['end_s']:g}", f"{data['loss']:g} %" if r["loss"] and data["loss"] else "none",
            f"{r['fps']:.1f}", f"{r['fps_on_time']:.1f}", _f(r["av_offset_ms_p50"]), _f(r["av_sync_ms"]),
            _f(r["av_offset_ms_max"])]) + " |")
    return "\n".join(lines)


def format_fault(data: dict[str, Any]) -> str:
    f, s = data["fault"], data["server"]
    fps = [r["fps"] for r in data["windows"] + data["baseline"]]
    head = ["healthy session fps (min / mean over windows)", "healthy dropped / repeated", "failing session: frames "
            "received per s", "its frames failed / repeated", "its error events", "renderer calls failed"]
    row = [f"{min(fps):.1f} / {np.mean(fps):.1f}", f"{s.get('frames_dropped')} / {s.get('frames_repeated')}",
           f"{f['fps']:.1f}", f"{f['server'].get('frames_failed')} / {f['server'].get('frames_repeated')}",
           str(len(f["events"])), str(f["injected_failures"])]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|",
                      "| " + " | ".join(row) + " |"])


def report(data: dict[str, Any]) -> str:
    s = data["server"]
    dropped = (f"{data['udp_dropped']} of {data['udp_packets']} UDP packets dropped "
               f"({100 * data['udp_dropped'] / max(data['udp_packets'], 1):.1f} %, both ways, after the baseline)"
               if data["loss"] else "no packet loss")
    lines = [
        f"Machine: {data['machine']}; load average {data['load_start'] or '?'} at the start, "
        f"{data['load_end'] or '?'} at the end",
        "",
        f"Server: in this process; backend {data['backend']}; model {data['model']}; {data['date']}",
        "",
        "Call: " + (f"{data['baseline_s']:g} s without loss, then {data['seconds']:g} s at {data['loss']:g} % UDP loss"
                    if data["loss"] else f"{data['baseline_s'] + data['seconds']:g} s") +
        f", built-in speech-like audio, probe mode; {dropped}; server: {s.get('frames_repeated')} frames repeated, "
        f"{s.get('frames_skipped')} skipped, {s.get('frames_dropped')} dropped, {s.get('audio_gap_ms')} ms of "
        f"incoming audio lost and filled with silence, A/V offset at the server {s.get('av_offset_ms')} ms "
        f"(max {s.get('av_offset_ms_max')} ms); at the client: video latency p50 {_f(data['video_latency_ms_p50'])} "
        f"ms, max {_f(data['video_latency_ms_max'])} ms; frames lost {data['frames_lost']}",
        "",
        f"Command: `{data['command']}`",
        "",
        format_table(data),
    ]
    if "fault" in data:
        lines += ["", "A second session beside it whose every frame the renderer fails on (injected CUDA "
                  "out-of-memory error):", "", format_fault(data)]
    return "\n".join(lines)


def verdict(data: dict[str, Any]) -> list[str]:
    """What fell short of the issue's figures (>= 20 fps in every window, lips within 40 ms of no loss)."""
    bad = []
    for r in data["windows"]:
        if r["fps"] < MIN_FPS:
            bad.append(f"{r['start_s']:g}–{r['end_s']:g} s: {r['fps']:.1f} fps")
        if r["av_sync_ms"] is not None and abs(r["av_sync_ms"]) > MAX_AV_SYNC_MS:
            bad.append(f"{r['start_s']:g}–{r['end_s']:g} s: lips {r['av_sync_ms']:.0f} ms off their no-loss offset")
    return bad


# ================================================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edtalk_live.benchmarks.loss",
        description="fps and lip sync of a call under UDP packet loss (nftables, in a network namespace of its "
                    "own; needs root), per 10 s window. Prints a Markdown table.")
    p.add_argument("--seconds", type=float, default=300.0, help="call length under loss, seconds (300)")
    p.add_argument("--loss", type=float, default=5.0, help="UDP packets dropped, percent (5; 0: no namespace)")
    p.add_argument("--baseline", type=float, default=10.0, help="seconds without loss first (10)")
    p.add_argument("--window", type=float, default=10.0, help="measuring window, seconds (10)")
    p.add_argument("--fault", action="store_true", help="also run a second session whose every frame fails")
    p.add_argument("--weights", metavar="DIR", help="weights folder (with --avatar); default: --random test")
    p.add_argument("--avatar", metavar="IMAGE", help="the avatar image for --weights")
    p.add_argument("--random", choices=("test", "small", "official", "tiny"), default="test",
                   help="seeded random weights when no --weights: test (64²), small (128²), official (256²)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime", "tensorrt"))
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the test audio (0)")
    p.add_argument("--json", metavar="OUT", help="also write every measurement here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (in a lossy namespace of its own when ``--loss`` > 0); 0 when every window met the
    issue's figures, 1 when one did not, 2 for a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.weights and not args.avatar:
        parser.error("--weights needs --avatar IMAGE")
    if not (0 <= args.loss < 100 and args.seconds >= args.window > 0 and args.baseline >= 0):
        parser.error("give 0 <= --loss < 100 and --seconds >= --window > 0, --baseline >= 0")
    if args.loss > 0 and args.baseline < args.window:
        parser.error("--baseline must span at least one --window: lips are judged against it")
    if args.loss > 0 and not os.environ.get(INSIDE_ENV):
        why = unavailable()
        if why:
            parser.error(f"packet loss {why}")
        argv = list(sys.argv[1:] if argv is None else argv)
        env = {**os.environ, INSIDE_ENV: "1"}
        return subprocess.run(["unshare", "--net", sys.executable, "-m", "edtalk_live.benchmarks.loss", *argv],
                              env=env).returncode
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    if args.loss > 0:
        setup_namespace()
    load_start = _load()
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    with tempfile.TemporaryDirectory(prefix="edtalk-loss-") as tmp:
        weights, avatar, note = bench_weights(args, Path(tmp))
        logger.info("call: %g s without loss, then %g s at %g %% UDP loss%s", args.baseline, args.seconds, args.loss,
                    " (and a failing session)" if args.fault else "")
        t0 = time.monotonic()
        data = asyncio.run(_call(args, weights, avatar, note))
    command = shlex.join(["python", "-m", "edtalk_live.benchmarks.loss", *(sys.argv[1:] if argv is None else argv)])
    data.update(command=command, date=date, machine=machine_line(), load_start=load_start, load_end=_load(),
                loss=args.loss, seconds=args.seconds, baseline_s=args.baseline, wall_s=time.monotonic() - t0)
    bad = verdict(data)
    data["short_of_target"] = bad
    print(report(data))
    if bad:
        print("\nShort of the target: " + "; ".join(bad))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
