"""Capacity: what one live session costs the server in CPU, and how many sessions a core holds.

    python -m edtalk_live.benchmarks.capacity --configs test --backends torch,onnxruntime --sessions 1,2,4

For each model config and backend, ``edtalk-live serve --workers 1`` is started as its own process
with seeded random weights (or ``--weights DIR --avatar IMAGE``, or ``--server URL`` for a running
server), and the number of sessions is ramped through ``--sessions``. Every session is a WebRTC
client in a process of its own (``realtime/client.py`` sending speech-like audio in real time and
receiving video and voice), so the server's process measures only the server. At each level,
once every session is up and ``--warmup`` seconds have passed, the server's ``/metrics`` are read
twice, ``--window`` seconds apart; every figure comes from the difference:

- CPU per session-second: ``process_cpu_seconds_total`` (everything the server process spends: media,
  lip sync, rendering, signaling) over sessions × seconds;
- where it goes: the render thread's CPU time by stage (``edtalk_render_thread_cpu_seconds_total``:
  ``render`` = decoder batches, ``lipsync`` = mel, Audio2Lip and smoothing, ``other``), and the rest of
  the process (``media``: the event loop and aiortc's codec threads: RTP, Opus, VP8, the frame clock);
- frames late: frames sent again because the next was not ready, plus frame slots jumped over, over
  the frames due; a level *keeps up* when at most 1 % are late and every session got 25 fps (±1 %).

"Sessions per core" is 1 / (CPU per session-second) at the largest level that kept up: how many
sessions one core carries when sessions pay what they paid there (the batch grows with the number
of sessions, so the cost per session falls with load). "Held here" is that largest level itself.
A server started here runs on one core and the clients on the others (``--server-cores``, default 1,
where the machine has more cores than that): "held here" is then what one core holds, and the clients
neither take the server's core nor evict its caches, as clients elsewhere would not. Before the first
level the server's idle CPU is measured (no session: it should spend about nothing). The table is
Markdown on stdout; progress goes to stderr.
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edtalk_live.benchmarks.latency import (
    _f,
    _free_port,
    _get_json,
    _wait_idle,
    pin_to,
    positive_ints,
    server_process,
    spawn_server,
    speech_like,
    write_random_weights,
)
from edtalk_live.edtalk.timing import FPS

__all__ = ["LIVE_UNIT", "Level", "Snapshot", "format_table", "live_row", "main", "read_metrics", "snapshot",
           "summarise_level"]

logger = logging.getLogger("edtalk_live.benchmarks.capacity")     # also when run as __main__

#: a level keeps up when at most this fraction of its frames is late ...
LATE_LIMIT = 0.01
#: ... and every session received at least this share of 25 fps
FPS_LIMIT = 0.99


# ================================================================================================ metrics


Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Snapshot:
    """The server's ``/metrics`` samples at one moment (``time.monotonic()``)."""

    at: float
    samples: dict[Key, float]

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str) -> float:
        """``name`` summed over all its label values."""
        return sum(v for (n, _), v in self.samples.items() if n == name)


def read_metrics(text: str, at: float) -> Snapshot:
    """Parse a Prometheus text exposition into a :class:`Snapshot`."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return Snapshot(at, samples)


async def snapshot(url: str) -> Snapshot:
    """The server's ``/metrics`` now."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(f"{url}/metrics") as r:
        text = await r.text()
    return read_metrics(text, time.monotonic())


# ================================================================================================ levels


#: the backend column of the rows measured against benchmarks/aiortc_floor.py (aiortc's own cost)
FLOOR = "aiortc only"


@dataclass
class Level:
    """One level of the ramp: ``sessions`` clients, measured between two snapshots."""

    config: str
    backend: str
    sessions: int
    a: Snapshot | None = field(default=None, repr=False)
    b: Snapshot | None = field(default=None, repr=False)
    sessions_up: int = 0                  # sessions the server had live at both snapshots (the smaller)
    client_errors: list[str] = field(default_factory=list)


def summarise_level(level: Level) -> dict[str, Any]:
    """The figures of one level from its two snapshots (see the module docstring)."""
    a, b = level.a, level.b
    row: dict[str, Any] = {"config": level.config, "backend": level.backend, "sessions": level.sessions,
                           "sessions_up": level.sessions_up, "client_errors": level.client_errors}
    if a is None or b is None or level.sessions_up < 1:
        return {**row, "kept_up": False}
    seconds = b.at - a.at

    def delta(name: str, **labels: str) -> float:
        return b.get(name, **labels) - a.get(name, **labels)

    n = level.sessions_up
    session_seconds = n * seconds
    cpu = delta("process_cpu_seconds_total")
    stages = {s: delta("edtalk_render_thread_cpu_seconds_total", stage=s) for s in ("render", "lipsync", "other")}
    sent = delta("edtalk_frames_sent_total")
    repeated = delta("edtalk_frames_repeated_total")
    skipped = delta("edtalk_frames_skipped_total")
    rendered = delta("edtalk_frames_rendered_total")
    batches = delta("edtalk_render_batches_total")
    due = sent + skipped
    late = (repeated + skipped) / due if due else 1.0
    fps = sent / session_seconds if session_seconds else 0.0

    def per_session(x: float) -> float:
        return 1000 * x / session_seconds

    row.update({
        "seconds": seconds,
        "cpu_ms_per_session_s": per_session(cpu),
        "cores": cpu / seconds if seconds else 0.0,
        "render_ms_per_session_s": per_session(stages["render"]),
        "lipsync_ms_per_session_s": per_session(stages["lipsync"]),
        "other_ms_per_session_s": per_session(stages["other"]),
        "media_ms_per_session_s": per_session(cpu - sum(stages.values())),
        "fps": fps,
        "late_fraction": late,
        "frames_due": due,
        "mean_batch": rendered / batches if batches else 0.0,
        "kept_up": level.sessions_up == level.sessions and late <= LATE_LIMIT and fps >= FPS * FPS_LIMIT,
    })
    return row


def split_cores(server_cores: int) -> tuple[set[int] | None, set[int] | None]:
    """The cores for the server and for the clients: the first ``server_cores`` of this process's cores for
    the server, the rest for the clients (a client in production runs elsewhere: here it must neither take
    the server's cores nor evict its caches). ``(None, None)`` (no pinning) for 0, or where the machine has
    no more cores than that, or cannot pin."""
    if server_cores <= 0 or not hasattr(os, "sched_getaffinity"):
        return None, None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) <= server_cores:
        return None, None
    return set(cores[:server_cores]), set(cores[server_cores:])


def _clients(url: str, n: int, seconds: float, options: dict[str, Any],
             cpus: set[int] | None = None) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "edtalk_live.benchmarks.capacity", "--client", url, "--seconds", f"{seconds:.2f}",
           "--options", json.dumps(options)]
    return [subprocess.Popen([*cmd, "--seed", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=pin_to(cpus)) for i in range(n)]


async def _sessions(url: str) -> int:
    with contextlib.suppress(Exception):
        return int((await snapshot(url)).get("edtalk_sessions"))
    return -1


async def _wait_sessions(url: str, want: int, timeout: float, procs: Sequence[subprocess.Popen] = ()) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await _sessions(url) == want:
            return True
        if procs and all(p.poll() is not None for p in procs):
            return False
        await asyncio.sleep(0.2)
    return False


async def run_level(url: str, level: Level, warmup: float, window: float, connect_allowance: float,
                    options: dict[str, Any], client_cpus: set[int] | None = None) -> Level:
    """Start ``level.sessions`` client processes (on ``client_cpus``), measure between two snapshots, wait for
    the clients to end."""
    n = level.sessions
    procs = _clients(url, n, connect_allowance + warmup + window + 1.0, options, client_cpus)
    try:
        if not await _wait_sessions(url, n, connect_allowance, procs):
            logger.warning("%d sessions: only %d came up within %.0f s", n, max(await _sessions(url), 0),
                           connect_allowance)
        await asyncio.sleep(warmup)
        level.a = await snapshot(url)
        await asyncio.sleep(window)
        level.b = await snapshot(url)
        level.sessions_up = int(min(level.a.get("edtalk_sessions"), level.b.get("edtalk_sessions")))
    finally:
        for p in procs:
            try:
                out, err = await asyncio.to_thread(p.communicate, timeout=connect_allowance + window + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            if p.returncode != 0:
                level.client_errors.append(err.decode(errors="replace").strip().splitlines()[-1:][0]
                                           if err.strip() else f"client exited with {p.returncode}")
    return level


async def _idle_cpu(url: str, seconds: float) -> float:
    """Cores the server uses with no session, over ``seconds``."""
    a = await snapshot(url)
    await asyncio.sleep(seconds)
    b = await snapshot(url)
    return (b.get("process_cpu_seconds_total") - a.get("process_cpu_seconds_total")) / (b.at - a.at)


# ================================================================================================ report


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["config", "backend", "sessions", "CPU / session-s (ms)", "server cores", "render (ms)", "lip sync (ms)",
            "other render-thread (ms)", "media (ms)", "fps", "late", "mean batch", "kept up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 10 + ["---"]) + "|"]
    for r in rows:
        if "cpu_ms_per_session_s" not in r:
            lines.append(f"| {r['config']} | {r['backend']} | {r['sessions']} | " + " | ".join(["—"] * 9)
                         + f" | no ({r['sessions_up']} up) |")
            continue
        lines.append("| " + " | ".join([
            r["config"], r["backend"], str(r["sessions"]), _f(r["cpu_ms_per_session_s"]), _f(r["cores"], 2),
            _f(r["render_ms_per_session_s"]), _f(r["lipsync_ms_per_session_s"]), _f(r["other_ms_per_session_s"]),
            _f(r["media_ms_per_session_s"]), _f(r["fps"], 1), f"{100 * r['late_fraction']:.1f} %",
            _f(r["mean_batch"], 1), "yes" if r["kept_up"] else "no"]) + " |")
    return "\n".join(lines)


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config and backend: the largest level that kept up, its cost, and the sessions one core holds."""
    out = []
    for key in dict.fromkeys((r["config"], r["backend"]) for r in rows):
        kept = [r for r in rows if (r["config"], r["backend"]) == key and r["kept_up"]]
        best = max(kept, key=lambda r: r["sessions"]) if kept else None
        floor = next((r for r in rows if best and key[1] != FLOOR and r["backend"] == FLOOR
                      and r["config"] == key[0] and r["sessions"] == best["sessions"] and r["kept_up"]), None)
        out.append({"config": key[0], "backend": key[1],
                    "held_here": best["sessions"] if best else 0,
                    "cpu_ms_per_session_s": best["cpu_ms_per_session_s"] if best else None,
                    "sessions_per_core": 1000 / best["cpu_ms_per_session_s"] if best else None,
                    "floor_ms_per_session_s": floor["cpu_ms_per_session_s"] if floor else None})
    return out


def format_summary(items: Sequence[dict[str, Any]], idle: dict[str, float]) -> str:
    lines = ["| config | backend | idle server (cores) | held here (sessions, ≤ 1 % late) | CPU / session-s there (ms) "
             f"| sessions per core at 25 fps | {FLOOR} there (ms) | × {FLOOR} |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in items:
        cores = idle.get(s["config"] + "/" + s["backend"])
        cpu, floor = s["cpu_ms_per_session_s"], s.get("floor_ms_per_session_s")
        ratio = f"{cpu / floor:.2f}×" if cpu and floor else "—"
        lines.append(f"| {s['config']} | {s['backend']} | {_f(cores, 3)} | {s['held_here']} | {_f(cpu)} | "
                     f"{_f(s['sessions_per_core'], 1)} | {_f(floor)} | {ratio} |")
    return "\n".join(lines)


# ================================================================================================ bench


LIVE_UNIT = "sessions at 25 fps (≤ 1 % late)"


def live_row(weights: Path, avatar: Path | None, what: str, backend: str, sessions: Sequence[int],
             warmup: float = 2.0, window: float = 5.0, connect_allowance: float = 30.0):
    """The live path for ``edtalk-live bench``: ``serve`` with this model and backend, sessions ramped through
    ``sessions`` until a level does not keep up; a :class:`~edtalk_live.benchmarks.pipeline.PipelineRow`
    with the most sessions that kept up (0 when one did not), the mean batch there, and its CPU cost."""
    from edtalk_live.benchmarks.pipeline import PipelineRow

    row = PipelineRow(what, backend, 0, None, LIVE_UNIT)

    async def ramp() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="edtalk-bench-live-") as tmp:
            async with server_process(weights, avatar, Path(tmp), backend=backend,
                                      max_sessions=max(sessions)) as (url, _p, _h, _c):
                for n in sessions:
                    await _wait_idle(url)
                    level = await run_level(url, Level(what, backend, n), warmup, window, connect_allowance, {})
                    rows.append(summarise_level(level))
                    logger.info("%s: %d session(s): kept up %s", what, n, rows[-1]["kept_up"])
                    if not rows[-1]["kept_up"]:
                        break
        return rows

    try:
        rows = asyncio.run(ramp())
    except (RuntimeError, OSError) as e:
        row.error = " ".join(str(e).split())[:160]
        return row
    kept = [r for r in rows if r["kept_up"]]
    best = max(kept, key=lambda r: r["sessions"]) if kept else None
    row.value = float(best["sessions"]) if best else 0.0
    if best:
        row.batch = max(1, round(best["mean_batch"]))
        row.note = (f"{best['cpu_ms_per_session_s']:.0f} ms server CPU per session-second there "
                    f"({1000 / best['cpu_ms_per_session_s']:.1f} sessions per core); clients on this machine")
    else:
        first = rows[0] if rows else {}
        row.note = (f"{len(sessions) and sessions[0]} session(s): {100 * first.get('late_fraction', 1.0):.0f} % of "
                    f"frames late, {first.get('fps', 0.0):.1f} fps")
    return row


# ================================================================================================ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edtalk_live.benchmarks.capacity",
                                description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("server (default: started here with seeded random weights per --configs)")
    src.add_argument("--server", metavar="URL", help="measure a running server (one backend, as it was started)")
    src.add_argument("--weights", metavar="DIR", help="start servers with these weights (needs --avatar)")
    src.add_argument("--avatar", metavar="IMAGE", help="the avatar image for --weights")
    src.add_argument("--configs", type=lambda t: [c for c in t.split(",") if c], default=["test"],
                     help="random-weight configs: test (64²), small (128²), official (256²) (default: test)")
    src.add_argument("--backends", type=lambda t: [b for b in t.split(",") if b], default=["onnxruntime", "torch"],
                     help="backends to start servers with (default: onnxruntime,torch)")
    src.add_argument("--device", default=None, help="torch device of a started server (default: cuda if available)")
    src.add_argument("--max-batch", type=int, default=16, metavar="N", help="frames per renderer call (16)")
    src.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                     help="one more argument for `serve` (repeat), e.g. --serve-arg=--render-threads=2")
    p.add_argument("--server-cores", type=int, default=1, metavar="N",
                   help="run a started server on N cores and the clients on the others (1: what one core "
                        "holds; 0: no pinning; ignored without more cores than N)")
    p.add_argument("--baseline", action="store_true",
                   help=f"also ramp the same sessions against a server that computes nothing ('{FLOOR}': "
                        "benchmarks/aiortc_floor.py, the same media), per config")
    p.add_argument("--sessions", type=positive_ints, default=[1, 2, 4], help="levels of the ramp (1,2,4)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds after all sessions are up before measuring (3)")
    p.add_argument("--window", type=float, default=10.0, help="seconds measured per level (10)")
    p.add_argument("--connect-allowance", type=float, default=30.0,
                   help="seconds for all sessions of a level to come up (30)")
    p.add_argument("--idle", type=float, default=5.0, help="seconds to measure the idle server first (5; 0: skip)")
    p.add_argument("--low-latency", action="store_true", help="sessions ask for the low-latency lip sync")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (0)")
    p.add_argument("--json", metavar="OUT", help="also write every measurement here")
    # one client process (started by the benchmark itself)
    p.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=20.0, help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    return p


def _client_main(args: argparse.Namespace) -> int:
    """One session: send speech-like audio in real time, receive the answer, print what came back as JSON."""
    from edtalk_live.realtime.client import run_client

    audio = speech_like(args.seconds, args.seed)
    result = asyncio.run(run_client(args.client, audio, None, options=json.loads(args.options),
                                    connect_timeout=60.0, tail=0.2))
    print(json.dumps({"session": result.session, "video_frames": result.video_frames,
                      "audio_seconds": result.audio_samples / max(result.audio_rate, 1)}))
    return 0


@contextlib.asynccontextmanager
async def _servers(args: argparse.Namespace, tmp: Path, config: str, backend: str):
    if args.server:
        yield args.server.rstrip("/")
        return
    if args.weights:
        weights, avatar = Path(args.weights), Path(args.avatar)
    else:
        weights, avatar = write_random_weights(tmp / config, config, seed=args.seed)
    log_dir = tmp / f"{config}-{backend}"
    log_dir.mkdir(parents=True, exist_ok=True)
    async with server_process(weights, avatar, log_dir, backend=backend, max_sessions=max(args.sessions),
                              max_batch=args.max_batch, device=args.device, extra=args.serve_arg,
                              cpus=split_cores(args.server_cores)[0]) as (url, _proc, _health, _config):
        yield url


@contextlib.asynccontextmanager
async def floor_process(size: int, log_dir: Path, cpus: set[int] | None = None):
    """:mod:`~edtalk_live.benchmarks.aiortc_floor` (the same media, nothing computed) as its own process; yields
    its URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "edtalk_live.benchmarks.aiortc_floor", "--port", str(port), "--size", str(size)]
    async with spawn_server(cmd, port, log_dir, cpus) as (url, _proc, _health, _config):
        yield url


async def _ramp(url: str, config: str, backend: str, args: argparse.Namespace, options: dict[str, Any],
                rows: list[dict[str, Any]]) -> None:
    for n in args.sessions:
        await _wait_idle(url)
        logger.info("%s / %s: %d session(s)", config, backend, n)
        level = await run_level(url, Level(config, backend, n), args.warmup, args.window,
                                args.connect_allowance, options, split_cores(args.server_cores)[1])
        row = summarise_level(level)
        rows.append(row)
        logger.info("%d session(s): %s ms CPU per session-second, %.1f %% late, kept up: %s", n,
                    _f(row.get("cpu_ms_per_session_s")), 100 * row.get("late_fraction", 1.0), row["kept_up"])
        for e in level.client_errors:
            logger.warning("client: %s", e)


async def _bench(args: argparse.Namespace, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, float], list[str]]:
    rows: list[dict[str, Any]] = []
    idle: dict[str, float] = {}
    described: list[str] = []
    configs = ["server"] if args.server else (["weights"] if args.weights else args.configs)
    backends = ["server"] if args.server else args.backends
    options = {"low_latency": True} if args.low_latency else {}
    for config in configs:
        size = None
        for backend in backends:
            async with _servers(args, tmp, config, backend) as url:
                health = await _get_json(f"{url}/health", timeout=10.0)
                size = (await _get_json(f"{url}/config", timeout=10.0)).get("size", size)
                described.append(f"{config} / {backend}: {health.get('backend', '?')}")
                logger.info("server %s: %s", url, described[-1])
                if args.idle > 0:
                    await _wait_idle(url)
                    await asyncio.sleep(1.0)
                    idle[f"{config}/{backend}"] = await _idle_cpu(url, args.idle)
                    logger.info("idle server: %.3f cores", idle[f"{config}/{backend}"])
                await _ramp(url, config, backend, args, options, rows)
        if args.baseline and size:
            log_dir = tmp / f"{config}-floor"
            log_dir.mkdir(parents=True, exist_ok=True)
            async with floor_process(int(size), log_dir, split_cores(args.server_cores)[0]) as url:
                described.append(f"{config} / {FLOOR}: benchmarks/aiortc_floor.py, a still {size}² picture, "
                                 "the voice echoed")
                await _ramp(url, config, FLOOR, args, options, rows)
    return rows, idle, described


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables on stdout. Returns 0, or 1 when no level kept up."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.client:
        return _client_main(args)
    if bool(args.weights) != bool(args.avatar):
        parser.error("--weights and --avatar go together")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("edtalk_live.benchmarks").setLevel(logging.INFO)
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="edtalk-capacity-") as tmp:
        rows, idle, described = asyncio.run(_bench(args, Path(tmp)))
    command = "python -m edtalk_live.benchmarks.capacity " + shlex.join(sys.argv[1:] if argv is None else argv)
    items = summary(rows)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
          f"Python {platform.python_version()}; load average {load} at the start; {date}")
    print("Servers: " + "; ".join(described))
    server_cpus, client_cpus = (None, None) if args.server else split_cores(args.server_cores)
    print("Cores: " + (f"server on {sorted(server_cpus)}, clients on {sorted(client_cpus)}" if server_cpus
                       else "not pinned (server and clients share every core)"))
    print(f"Command: `{command}`\n")
    print(format_table(rows))
    print()
    print(format_summary(items, idle))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "date": date, "servers": described,
                                               "idle_cores": idle, "rows": rows, "summary": items}, indent=1))
        logger.info("wrote %s", args.json)
    return 0 if any(s["held_here"] for s in items) else 1


if __name__ == "__main__":
    sys.exit(main())
