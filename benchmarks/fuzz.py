"""Hostile input against a running server: mutated offers, and random datagrams at a live session's ports.

    python -m edtalk_live.benchmarks.fuzz --offers 10000 --datagrams 20000

``edtalk-live serve`` is started as its own process (seeded random 64² weights, or ``--server URL``). While
one WebRTC session streams speech, ``--offers`` offers made from a real aiortc offer are posted (lines
dropped or repeated, bytes flipped, cut short, 2,000 duplicate ``a=rtpmap`` lines, broken or hostile JSON
around them; ``--concurrency`` at a time, ``--rate`` a second: a quarter of them are still valid offers,
each a new peer connection, and a flood of those is a capacity question rather than a parser's), and
``--datagrams`` random UDP datagrams (shaped like STUN, DTLS, RTP and RTCP, and plain noise) go to the
session's own ICE candidates. What must hold, and what the table shows: every offer is answered with a
valid answer or a one-line 4xx JSON (never a 5xx, never a hang), no slot stays held once the unconnected
offers time out, the live session keeps 25 fps, and the server lives. The generators are shared with the
CI tests (``tests/test_hardening.py``), which run them at a short size.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import random
import re
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edtalk_live.benchmarks.latency import (
    _f,
    _get_json,
    _wait_idle,
    machine_line,
    server_process,
    speech_like,
    write_random_weights,
)

logger = logging.getLogger(__name__)

RATE = 16000


async def offer_sdp() -> str:
    """A real offer as the Python client makes it: audio sendrecv, video recvonly, the control channel."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def duplicate_rtpmap(sdp: str, copies: int = 2000) -> str:
    """The offer that once froze a server for 30 s: one ``a=rtpmap`` line repeated ``copies`` times."""
    line = next(x for x in sdp.splitlines() if x.startswith("a=rtpmap:"))
    return sdp.replace(line + "\r\n", (line + "\r\n") * copies, 1)


def mutated_offers(sdp: str, n: int, seed: int = 15) -> list[bytes]:
    """``n`` offer bodies made from ``sdp``: lines dropped or duplicated, bytes flipped, cut short, huge
    duplicates, and broken JSON around them (six kinds in turn)."""
    rng = random.Random(seed)
    lines = sdp.split("\r\n")
    out = []
    for i in range(n):
        kind = i % 6
        ls = list(lines)
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                del ls[rng.randrange(len(ls))]
        elif kind == 1:
            j = rng.randrange(len(ls))
            ls[j:j] = [ls[j]] * rng.choice([2, 3, 50, 2000])
        elif kind == 2:
            text = bytearray("\r\n".join(ls).encode())
            for _ in range(rng.randint(1, 8)):
                text[rng.randrange(len(text))] = rng.randrange(256)
            ls = text.decode("utf-8", "replace").split("\r\n")
        elif kind == 3:
            ls = "\r\n".join(ls)[: rng.randrange(len(sdp))].split("\r\n")
        elif kind == 4:
            ls = duplicate_rtpmap(sdp, rng.choice([2, 500, 2000])).split("\r\n")
        body = json.dumps({"type": "offer", "sdp": "\r\n".join(ls)}).encode()
        if kind == 5:           # the JSON itself
            body = rng.choice([body[: rng.randrange(len(body))], b"[" * 10_000 + b"]" * 10_000,
                               b'{"type": "offer", "sdp": ' + b"[" * 5000, bytes(rng.randrange(256) for _ in range(50)),
                               json.dumps({"type": "offer", "sdp": sdp, "avatar": "x" * 5000}).encode(),
                               json.dumps({"type": "offer", "sdp": sdp, "intensity": [[[[1]]]]}).encode()])
        out.append(body)
    return out


def candidate_ports(sdp: str) -> list[tuple[str, int]]:
    """The UDP host candidates ``(address, port)`` of an SDP."""
    found = re.findall(r"^a=candidate:\S+ \d+ udp \d+ (\S+) (\d+) typ host", sdp, flags=re.M | re.I)
    return sorted({(addr, int(port)) for addr, port in found})


def random_datagrams(n: int, seed: int = 15) -> list[bytes]:
    """``n`` datagrams of 1-1500 bytes: random bytes whose first byte makes them look like STUN (0-3), DTLS
    (20-63), RTP/RTCP (128-191, RTCP payload types 200-206 among them) or nothing known."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = int(rng.choice([1, 4, 12, 20, 28, 100, 500, 1200, 1500])) if i % 3 else int(rng.integers(1, 1501))
        data = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        first = (int(rng.integers(0, 4)), int(rng.integers(20, 64)), int(rng.integers(128, 192)),
                 int(rng.integers(0, 256)))[i % 4]
        data[0] = first
        if first >= 128 and size > 1:
            data[1] = int(rng.choice([96, 111, 200, 201, 205, 206, int(rng.integers(0, 256))]))
        if first < 4 and size >= 8:
            data[4:8] = b"\x21\x12\xa4\x42"                # STUN's magic cookie: parsed as STUN
        out.append(bytes(data))
    return out


async def send_datagrams(targets: Sequence[tuple[str, int]], datagrams: Sequence[bytes], rate: float) -> int:
    """Send every datagram to every target at ``rate`` datagrams a second in all; the number sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent, start = 0, time.monotonic()
    try:
        for i, data in enumerate(datagrams):
            for target in targets:
                try:
                    sock.sendto(data, target)
                    sent += 1
                except OSError:
                    pass
            await asyncio.sleep(max(0.0, start + (i + 1) * len(targets) / rate - time.monotonic()))
    finally:
        sock.close()
    return sent


async def post_offers(url: str, bodies: Sequence[bytes], concurrency: int, rate: float
                      ) -> list[tuple[int, bytes, float]]:
    """POST every body to ``url/offer``, ``concurrency`` at a time and ``rate`` a second at most:
    ``(status, reply, seconds)`` each (status 0: no answer within 10 s)."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    start = time.monotonic()

    async def one(http, i: int, body: bytes) -> tuple[int, bytes, float]:
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        async with sem:
            t0 = time.perf_counter()
            try:
                async with http.post(f"{url}/offer", data=body, headers={"Content-Type": "application/json"}) as r:
                    return r.status, await r.read(), time.perf_counter() - t0
            except (aiohttp.ClientError, TimeoutError) as e:
                return 0, str(e).encode(), time.perf_counter() - t0

    async with aiohttp.ClientSession(timeout=timeout) as http:
        return await asyncio.gather(*(one(http, i, b) for i, b in enumerate(bodies)))


def check_replies(results: Sequence[tuple[int, bytes, float]]) -> list[str]:
    """What is wrong with the answers (nothing: an empty list): a 5xx or no answer, or an error reply that is
    not a one-line JSON object with an ``error`` under 512 bytes."""
    problems = []
    for status, reply, _ in results:
        if status == 200:
            continue
        if not 400 <= status < 500:
            problems.append(f"status {status}: {reply[:120]!r}")
            continue
        try:
            ok = b"\n" not in reply and len(reply) < 512 and "error" in json.loads(reply)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"status {status} with reply {reply[:120]!r}")
    return problems


async def run(url: str, offers: int, datagrams: int, concurrency: int, seed: int, rate: float = 50.0
              ) -> dict[str, Any]:
    from edtalk_live.realtime.client import run_client

    sdp = await offer_sdp()
    bodies = mutated_offers(sdp, offers, seed)
    noise = random_datagrams(datagrams, seed)
    answers: list[str] = []
    # long enough for the offers at `rate` a second, and the datagrams at 2,000 a second
    seconds = max(6.0, offers / rate + 4, datagrams / 2000 + 4)
    audio = np.tile(speech_like(10.0, seed), int(seconds // 10) + 1)[: int(seconds * RATE)]
    live = asyncio.create_task(run_client(url, audio, None, {}, on_answer=answers.append))
    deadline = time.monotonic() + 30
    while not answers and time.monotonic() < deadline and not live.done():
        await asyncio.sleep(0.05)
    targets = candidate_ports(answers[0]) if answers else []
    t0 = time.monotonic()
    results, sent = await asyncio.gather(post_offers(url, bodies, concurrency, rate),
                                         send_datagrams(targets, noise, 2000.0) if targets else asyncio.sleep(0, 0))
    attack_s = time.monotonic() - t0
    session = await live
    await _wait_idle(url, timeout=60)
    health = await _get_json(f"{url}/health")
    statuses = collections.Counter(s for s, _, _ in results)
    times = [t for _, _, t in results]
    fps = session.video_frames / session.sent_seconds if session.sent_seconds else 0.0
    return {"offers": offers, "rate": rate, "statuses": dict(sorted(statuses.items())),
            "problems": check_replies(results),
            "answer_p50_ms": 1000 * float(np.median(times)) if times else None,
            "answer_p99_ms": 1000 * float(np.percentile(times, 99)) if times else None,
            "answer_max_ms": 1000 * max(times) if times else None, "attack_s": attack_s,
            "datagrams_sent": sent, "targets": len(targets), "live_fps": fps,
            "live_frames": session.video_frames, "live_seconds": session.sent_seconds,
            "sessions_after": health.get("sessions"), "health_after": health.get("status")}


def verdict(r: dict[str, Any]) -> list[str]:
    """The failed requirements (none: an empty list)."""
    bad = [f"{len(r['problems'])} offers answered wrongly, e.g. {r['problems'][0]}"] if r["problems"] else []
    if r["sessions_after"] != 0:
        bad.append(f"{r['sessions_after']} session slots still held after the unconnected offers timed out")
    if r["answer_max_ms"] is not None and r["answer_max_ms"] > 2000:
        bad.append(f"an offer took {r['answer_max_ms']:.0f} ms to answer")
    if r["live_fps"] < 24.0:
        bad.append(f"the live session got {r['live_fps']:.1f} fps")
    if r["targets"] and not r["datagrams_sent"]:
        bad.append("no datagram was sent")
    return bad


def format_table(r: dict[str, Any]) -> str:
    statuses = ", ".join(f"{s or 'none'}: {n}" for s, n in r["statuses"].items())
    return "\n".join([
        "| offers (a second) | answers by status | wrong answers | answer p50 / p99 / max (ms) "
        "| datagrams sent (targets) | live session fps | slots held after |",
        "|---:|---|---:|---|---:|---:|---:|",
        f"| {r['offers']:,} ({r['rate']:g}) | {statuses} | {len(r['problems'])} | {_f(r['answer_p50_ms'], 1)} / "
        f"{_f(r['answer_p99_ms'], 1)} / {_f(r['answer_max_ms'])} | {r['datagrams_sent']:,} ({r['targets']}) | "
        f"{r['live_fps']:.1f} | {r['sessions_after']} |"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edtalk_live.benchmarks.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", metavar="URL", help="a running server (default: start `serve` with random weights)")
    p.add_argument("--offers", type=int, default=10_000, help="mutated offers to post (10000)")
    p.add_argument("--datagrams", type=int, default=20_000, help="random datagrams to each ICE candidate (20000)")
    p.add_argument("--concurrency", type=int, default=4, help="offers in flight at once (4)")
    p.add_argument("--rate", type=float, default=50.0,
                   help="offers a second at most (50: fifty times what serve lets one address send)")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--json", metavar="OUT", help="also write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    async def go() -> dict[str, Any]:
        if args.server:
            return await run(args.server.rstrip("/"), args.offers, args.datagrams, args.concurrency, args.seed,
                             args.rate)
        with tempfile.TemporaryDirectory(prefix="edtalk-fuzz-") as tmp:
            weights, avatar = write_random_weights(Path(tmp) / "w", "test")
            # unconnected offers are reclaimed after 2 s here (15 s by default), so the slots come back in the run;
            # about one offer in 4 is still valid and holds a slot until then: room for all of them, so that the
            # answers measure the parsing, not the session cap (whose 503 tests/test_hardening.py checks)
            async with server_process(weights, avatar, Path(tmp), max_sessions=args.offers // 4 + 16,
                                      extra=["--connect-timeout", "2"]) as (url, _proc, _health, _config):
                return await run(url, args.offers, args.datagrams, args.concurrency, args.seed, args.rate)

    result = asyncio.run(go())
    command = "python -m edtalk_live.benchmarks.fuzz " + " ".join(sys.argv[1:] if argv is None else argv)
    print(machine_line())
    print(f"Command: `{command}`\n")
    print(format_table(result))
    bad = verdict(result)
    print("\n" + ("Verdict: every requirement held." if not bad else "Verdict: " + "; ".join(bad)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
