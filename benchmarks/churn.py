"""Churn: connect and hang up many times; after each call the server must have given everything back.

    python -m edtalk_live.benchmarks.churn --cycles 1000

``edtalk-live serve --workers 1`` is started as its own process with the seeded random 64² ``test`` weights
(or ``--server URL`` is measured), with short timeouts (``--connect-timeout``, ``--inactivity-timeout``, 1 s
each) so that a call that never connects or whose peer vanished frees its slot quickly. Then calls are made one
at a time by an aiortc client in this process, rotating how a call ends (:data:`ENDINGS`):

- ``close``: the client connects, receives video, and closes its peer connection (DTLS close);
- ``bye``: the client connects and sends ``{"type": "bye"}`` on the control channel; the server hangs up;
- ``drop``: the client connects and vanishes: its UDP sockets are closed, nothing is said (the server notices
  that no audio comes: ``--inactivity-timeout``);
- ``unanswered``: the client posts an offer and never applies the answer (``--connect-timeout``);
- ``no_ice``: the offer and the answer lose their ICE candidates, so connectivity checks never start
  (``--connect-timeout``).

Before the first call and after each one, the server's ``/metrics`` are read until what a call holds is back
where it was (:data:`RESOURCES`: live sessions, peer connections not closed, asyncio tasks, threads, open file
descriptors; at most ``--settle`` seconds, 5); how long that took is recorded per ending. The baseline is read
after the warm-up (the first ``--warmup`` of the cycles: thread pools and caches fill there). The server's
resident memory after each cycle (``process_resident_memory_bytes``) is fitted by a line over the cycles after
the warm-up (a Theil-Sen line, robust to a cache that grows once; the least-squares slope is shown too):
the slope is the memory a call leaves behind. The table is Markdown on stdout; progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edtalk_live.benchmarks.capacity import Snapshot, snapshot
from edtalk_live.benchmarks.latency import _f, server_process, speech_like, write_random_weights

__all__ = ["ENDINGS", "RESOURCES", "RSS_LIMIT_KIB", "Cycle", "call", "format_table", "main", "rss_slope",
           "rss_slope_lsq", "strip_candidates", "summarise"]

logger = logging.getLogger("edtalk_live.benchmarks.churn")     # also when run as __main__

#: the ways a call ends, in the order the cycles rotate through them
ENDINGS: tuple[str, ...] = ("close", "bye", "drop", "unanswered", "no_ice")
#: what a call holds on the server, by the metric that counts it; each must be back at its baseline after a call
RESOURCES: dict[str, str] = {
    "sessions": "edtalk_sessions",
    "peer connections": "edtalk_peer_connections",
    "asyncio tasks": "edtalk_asyncio_tasks",
    "threads": "edtalk_threads",
    "file descriptors": "process_open_fds",
}
#: the most resident memory a call may leave behind after the warm-up, KiB per call
RSS_LIMIT_KIB = 20.0
#: the server's timeouts for a call that never connects and for a peer that vanished (``serve`` options)
SERVER_TIMEOUT_S = 1.0


# ================================================================================================ one call


def strip_candidates(sdp: str) -> str:
    """``sdp`` without its ICE candidates (nor the end-of-candidates mark: more could always come)."""
    return "".join(line for line in sdp.splitlines(keepends=True)
                   if not line.startswith(("a=candidate:", "a=end-of-candidates")))


def _vanish(pc) -> None:
    """Close the peer connection's UDP sockets without a word (no DTLS close, no SCTP abort, no RTCP BYE)."""
    for transceiver in pc.getTransceivers():
        transport = transceiver.sender.transport
        connection = getattr(getattr(transport, "transport", None), "_connection", None)
        for protocol in list(getattr(connection, "_protocols", [])):
            protocol.transport.abort()


async def call(url: str, ending: str, hold: float = 0.2, timeout: float = 10.0) -> None:
    """One call to ``url`` that ends as ``ending`` (:data:`ENDINGS`); raises when it did not get as far as the
    ending needs (no answer, no connection, no video within ``timeout``). A connected call receives video for
    ``hold`` seconds after its first frame."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    from edtalk_live.realtime.client import FileAudioTrack

    if ending not in ENDINGS:
        raise ValueError(f"unknown ending {ending!r}; choose from {', '.join(ENDINGS)}")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(FileAudioTrack(speech_like(hold + timeout + 1.0)))
    pc.addTransceiver("video", direction="recvonly")
    channel = pc.createDataChannel("control")
    video, closed, opened = asyncio.Event(), asyncio.Event(), asyncio.Event()
    channel.on("open", opened.set)
    readers: list[asyncio.Task] = []

    async def read(track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                if track.kind == "video":
                    video.set()

    pc.on("track", lambda track: readers.append(asyncio.ensure_future(read(track))))

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("closed", "failed"):
            closed.set()

    try:
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        if ending == "no_ice":
            offer = strip_candidates(offer)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, http.post(
                f"{url}/offer", json={"sdp": offer, "type": "offer"}) as r:
            answer = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(f"offer refused ({r.status}): {answer.get('error', answer)}")
        if ending == "unanswered":
            return
        sdp = strip_candidates(answer["sdp"]) if ending == "no_ice" else answer["sdp"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=answer["type"]))
        if ending == "no_ice":
            return
        await asyncio.wait_for(video.wait(), timeout)
        await asyncio.sleep(hold)
        if ending == "bye":
            await asyncio.wait_for(opened.wait(), timeout)
            channel.send(json.dumps({"type": "bye"}))
            await asyncio.wait_for(closed.wait(), timeout)      # the server hung up
        elif ending == "drop":
            _vanish(pc)
    finally:
        with contextlib.suppress(Exception):
            await pc.close()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


# ================================================================================================ the cycles


@dataclass
class Cycle:
    """One call and what the server held after it."""

    index: int
    ending: str
    call_s: float = 0.0
    settle_s: float = 0.0                   # from the call's end until every resource was back at its baseline
    back: bool = True                       # every resource back within the time allowed
    excess: dict[str, float] = field(default_factory=dict)   # resource -> over its baseline when time ran out
    rss_kib: float = 0.0                    # the server's resident memory once settled
    error: str = ""                         # the call itself failed


def _resources(s: Snapshot) -> dict[str, float]:
    missing = [metric for metric in RESOURCES.values() if (metric, ()) not in s.samples]
    if missing:         # a missing gauge would read as 0: always "back at its baseline"
        raise RuntimeError(f"the server's /metrics has no {', '.join(missing)}")
    return {name: s.get(metric) for name, metric in RESOURCES.items()}


async def _settle(url: str, baseline: dict[str, float] | None, timeout: float, poll: float = 0.05
                  ) -> tuple[float, dict[str, float], Snapshot]:
    """Read ``/metrics`` until every resource is at most its ``baseline`` (None: until no session is live and
    nothing changed between two reads) or ``timeout`` passed; returns the seconds it took, what was still over
    the baseline, and the last snapshot."""
    t0 = time.monotonic()
    previous = None
    while True:
        s = await snapshot(url)
        now = _resources(s)
        if baseline is None:
            excess = {"sessions": now["sessions"]} if now["sessions"] else {}
            if not excess and now == previous:
                return time.monotonic() - t0, {}, s
            previous = now
        else:
            excess = {k: now[k] - baseline[k] for k in RESOURCES if now[k] > baseline[k]}
            if not excess:
                return time.monotonic() - t0, {}, s
        if time.monotonic() - t0 > timeout:
            return time.monotonic() - t0, excess, s
        await asyncio.sleep(poll)


async def run_cycles(url: str, cycles: int, warmup: int, settle: float = 5.0, hold: float = 0.2
                     ) -> tuple[list[Cycle], dict[str, float]]:
    """``cycles`` calls, one at a time, rotating :data:`ENDINGS`; returns them and the baseline (read after the
    first ``warmup`` calls)."""
    records: list[Cycle] = []
    baseline: dict[str, float] | None = None
    if warmup == 0:
        _, _, s = await _settle(url, None, settle)
        baseline = _resources(s)
    for i in range(cycles):
        ending = ENDINGS[i % len(ENDINGS)]
        c = Cycle(i, ending)
        t0 = time.monotonic()
        try:
            await call(url, ending, hold=hold)
        except Exception as e:  # noqa: BLE001 - recorded; the cycle still checks the server
            c.error = f"{type(e).__name__}: {e}"[:200]
            logger.warning("cycle %d (%s): %s", i, ending, c.error)
        c.call_s = time.monotonic() - t0
        c.settle_s, c.excess, s = await _settle(url, baseline, settle)
        c.back = not c.excess
        c.rss_kib = s.get("process_resident_memory_bytes") / 1024
        if i + 1 == warmup:
            _, _, s = await _settle(url, None, settle)
            baseline = _resources(s)
            logger.info("baseline after %d warm-up cycles: %s", warmup,
                        ", ".join(f"{k} {v:g}" for k, v in baseline.items()))
        records.append(c)
        if (i + 1) % 50 == 0 or i + 1 == cycles:
            logger.info("%d/%d cycles; RSS %.1f MiB", i + 1, cycles, c.rss_kib / 1024)
    assert baseline is not None
    return records, baseline


# ================================================================================================ figures


def rss_slope(rss_kib: Sequence[float], max_points: int = 2000) -> float:
    """KiB per cycle: the Theil-Sen slope (the median of the slopes between every two cycles) of the resident
    memory after each cycle. A leak grows memory by the same amount every call, and this is its slope; one
    step up (an allocator's cache growing once, e.g. ONNX Runtime's arena for a larger batch on a busy
    machine) moves it much less than it moves a least-squares line (:func:`rss_slope_lsq`). At most
    ``max_points`` cycles, evenly spaced, are used."""
    y = np.asarray(rss_kib, dtype=float)
    if len(y) < 2:
        return 0.0
    x = np.arange(len(y), dtype=float)
    if len(y) > max_points:
        keep = np.linspace(0, len(y) - 1, max_points).round().astype(int)
        x, y = x[keep], y[keep]
    i, j = np.triu_indices(len(y), 1)
    return float(np.median((y[j] - y[i]) / (x[j] - x[i])))


def rss_slope_lsq(rss_kib: Sequence[float]) -> float:
    """KiB per cycle: the slope of the least-squares line through the resident memory after each cycle."""
    if len(rss_kib) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(rss_kib), dtype=float), np.asarray(rss_kib, dtype=float), 1)[0])


def summarise(records: Sequence[Cycle], baseline: dict[str, float], warmup: int) -> dict[str, Any]:
    """Per ending: cycles, failed calls, the slowest return to the baseline; overall: the memory slope after the
    warm-up, and per resource whether every measured cycle came back, with the largest excess."""
    measured = [c for c in records if c.index >= warmup]
    endings = {}
    for ending in ENDINGS:
        cs = [c for c in measured if c.ending == ending]
        settle = [c.settle_s for c in cs]
        endings[ending] = {"cycles": len(cs), "errors": sum(bool(c.error) for c in cs),
                           "settle_s_max": max(settle, default=None),
                           "settle_s_p50": float(np.median(settle)) if settle else None,
                           "call_s_mean": float(np.mean([c.call_s for c in cs])) if cs else None,
                           "back": all(c.back for c in cs)}
    resources = {name: {"baseline": baseline[name],
                        "back": all(name not in c.excess for c in measured),
                        "max_excess": max((c.excess.get(name, 0.0) for c in measured), default=0.0)}
                 for name in RESOURCES}
    rss = [c.rss_kib for c in measured]
    slope = rss_slope(rss)
    return {"cycles": len(records), "warmup": warmup, "endings": endings, "resources": resources,
            "rss_slope_kib_per_cycle": slope, "rss_slope_lsq_kib_per_cycle": rss_slope_lsq(rss),
            "rss_kib_first": rss[0] if rss else None,
            "rss_kib_last": rss[-1] if rss else None, "errors": sum(bool(c.error) for c in measured),
            "passed": (slope <= RSS_LIMIT_KIB and all(r["back"] for r in resources.values())
                       and not any(c.error for c in measured))}


def format_table(summary: dict[str, Any]) -> str:
    """The two Markdown tables: per ending, then the memory and each resource."""
    lines = ["| ending | cycles | failed calls | call (s, mean) | back to baseline (s, p50) | "
             "back to baseline (s, max) | all back |", "|---|---:|---:|---:|---:|---:|---|"]
    for ending, e in summary["endings"].items():
        lines.append(f"| {ending} | {e['cycles']} | {e['errors']} | {_f(e['call_s_mean'], 2)} | "
                     f"{_f(e['settle_s_p50'], 2)} | {_f(e['settle_s_max'], 2)} | {'yes' if e['back'] else 'no'} |")
    lines += ["", "| after the warm-up | value | limit | ok |", "|---|---:|---|---|"]
    slope = summary["rss_slope_kib_per_cycle"]
    lines.append(f"| RSS growth (KiB / cycle, Theil-Sen line; {_f(summary['rss_kib_first'] / 1024, 1)} → "
                 f"{_f(summary['rss_kib_last'] / 1024, 1)} MiB) | {slope:.2f} | ≤ {RSS_LIMIT_KIB:g} | "
                 f"{'yes' if slope <= RSS_LIMIT_KIB else 'no'} |")
    lines.append(f"| RSS growth (KiB / cycle, least-squares line) | {summary['rss_slope_lsq_kib_per_cycle']:.2f} "
                 "| (shown) | |")
    for name, r in summary["resources"].items():
        lines.append(f"| {name} back to baseline ({r['baseline']:g}) after every cycle | max excess "
                     f"{r['max_excess']:g} | 0 | {'yes' if r['back'] else 'no'} |")
    return "\n".join(lines)


# ================================================================================================ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edtalk_live.benchmarks.churn", description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=1000, help="calls to make, rotating the endings (1000)")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="share of the cycles before the baseline is read and the memory fit starts (0.1)")
    p.add_argument("--server", metavar="URL",
                   help="measure a running server (start it with --offer-rate 0 and short --connect-timeout and "
                        "--inactivity-timeout)")
    p.add_argument("--backend", default="auto", help="backend of the server started here (auto)")
    p.add_argument("--timeout", type=float, default=SERVER_TIMEOUT_S,
                   help="--connect-timeout and --inactivity-timeout of the server started here, seconds (1)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds a cycle may take to give everything back (5)")
    p.add_argument("--hold", type=float, default=0.2, help="seconds a connected call receives video (0.2)")
    p.add_argument("--json", metavar="OUT", help="also write every cycle here")
    return p


async def _bench(args: argparse.Namespace, warmup: int) -> tuple[list[Cycle], dict[str, float], str]:
    if args.server:
        url = args.server.rstrip("/")
        records, baseline = await run_cycles(url, args.cycles, warmup, args.settle, args.hold)
        return records, baseline, url
    with tempfile.TemporaryDirectory(prefix="edtalk-churn-") as tmp:
        weights, avatar = write_random_weights(Path(tmp) / "weights", "test")
        timeouts = ["--connect-timeout", f"{args.timeout:g}", "--inactivity-timeout", f"{args.timeout:g}"]
        async with server_process(weights, avatar, Path(tmp), backend=args.backend, max_sessions=8,
                                  extra=timeouts) as (url, proc, health, _config):
            logger.info("server %s (pid %d): %s", url, proc.pid, health.get("backend", "?"))
            records, baseline = await run_cycles(url, args.cycles, warmup, args.settle, args.hold)
            return records, baseline, (f"`serve --workers 1` child process, backend {health.get('backend', '?')}, "
                                       f"`test` config (64², seeded random weights), --connect-timeout and "
                                       f"--inactivity-timeout {args.timeout:g} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cycles; print the tables on stdout. Returns 0 when every figure is within its limit, else 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cycles < len(ENDINGS):
        parser.error(f"--cycles must be at least {len(ENDINGS)} (one of each ending), got {args.cycles}")
    if not 0 <= args.warmup < 1:
        parser.error(f"--warmup is a share of the cycles in [0, 1), got {args.warmup:g}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("edtalk_live.benchmarks").setLevel(logging.INFO)
    warmup = int(args.cycles * args.warmup)
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.monotonic()
    records, baseline, server = asyncio.run(_bench(args, warmup))
    wall = time.monotonic() - t0
    summary = summarise(records, baseline, warmup)
    command = "python -m edtalk_live.benchmarks.churn " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
          f"Python {platform.python_version()}; load average {load} at the start; {date}")
    print(f"Server: {server}")
    print(f"Command: `{command}`; {args.cycles} cycles ({warmup} warm-up) in {wall / 60:.1f} min\n")
    print(format_table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "date": date, "server": server,
                                               "wall_s": wall, "summary": summary,
                                               "cycles": [asdict(c) for c in records]}, indent=1))
        logger.info("wrote %s", args.json)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
