"""Faults stay with their session: a renderer that fails on one session's frames leaves the others at 25 fps,
and the call holds under packet loss (issue: reliability, faults).

The split-and-retry of a failing batch itself is tested with a fake renderer in tests/test_scheduler.py;
a worker process that dies, in tests/test_workers.py. Here: two live sessions on the real server, one of
them poisoned; and a session inside a network namespace of its own that drops 5 % of its UDP packets.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from conftest import Running, until  # tests/ is on sys.path (pytest's rootdir conftest)

from edtalk_live.benchmarks.loss import MAX_AV_SYNC_MS, MIN_FPS, Poison, unavailable
from edtalk_live.realtime.client import run_client
from edtalk_live.realtime.protocol import RENDER_FAILED

pytestmark = pytest.mark.slow


def test_a_failing_session_leaves_the_other_at_25_fps(edtalk_weights, face_image, speech):
    """Two live sessions; the renderer fails on every frame of the second (its head still) for 4 s (CUDA's
    out-of-memory error, inside the batch). The first keeps 25 fps with no frame late; the second gets one
    error event, keeps receiving frames (its last one repeated) and renders again once the fault is gone."""
    seconds, fault_s = 8.0, 4.0
    audio = speech[: int(seconds * 16000)]

    async def main():
        async with Running(edtalk_weights, face_image) as srv:
            poison = Poison(srv.server.renderer, next(iter(srv.server.avatars.values())).rest_pose)

            async def heal():
                await until(lambda: poison.raised, 30)
                await asyncio.sleep(fault_s)
                poison.active = False

            healing = asyncio.create_task(heal())
            healthy, poisoned = await asyncio.gather(run_client(srv.url, audio, None, {}),
                                                     run_client(srv.url, audio, None, {"pose": "still"}))
            await healing
            await until(lambda: not srv.server.peers)
            return healthy, poisoned, poison.raised, await srv.metrics(), srv.server.scheduler.stats

    healthy, poisoned, raised, metrics, stats = asyncio.run(main())
    assert raised > 0, "the fault was never injected"

    # the healthy session: 25 fps over the whole window, no frame late, no error
    h = healthy.stats
    assert healthy.video_frames >= 24 * seconds, (healthy.video_frames, h)
    assert h["frames_failed"] == 0 and h["frames_dropped"] <= 3 and h["frames_repeated"] <= 3, h
    assert not [r for r in healthy.replies if r.get("type") == "error"], healthy.replies

    # the poisoned session: one error event for its one streak, frames all along, rendering again at the end
    p = poisoned.stats
    events = [r for r in poisoned.replies if r.get("type") == "error"]
    assert len(events) == 1 and events[0]["code"] == RENDER_FAILED and events[0]["reason"] == "out_of_memory", events
    assert poisoned.video_frames >= 24 * seconds, (poisoned.video_frames, p)
    assert p["frames_failed"] >= 25 * (fault_s - 1), p
    assert p["frames_repeated"] >= p["frames_failed"] - 3, p          # its slots showed the last good frame
    assert not p["render_failing"] and p["frames_rendered"] >= 25 * (seconds - fault_s - 2), p

    failures = metrics[("edtalk_render_failures_total", (("reason", "out_of_memory"),))][1]
    assert failures >= p["frames_failed"], metrics
    assert metrics[("edtalk_frames_dropped_total", (("reason", "error"),))][1] == p["frames_failed"]
    assert stats.failing == {}, "the ended session is forgotten"


# ------------------------------------------------------------------------------------------ packet loss


def test_call_holds_under_five_percent_packet_loss(tmp_path, edtalk_weights, face_image):
    """60 s of a call whose UDP packets are dropped at 5 % both ways, after 10 s without: >= 20 fps delivered in
    every 10 s window, lips and voice within 40 ms of the no-loss baseline. ``benchmarks/loss.py`` runs the same
    at full length."""
    why = unavailable()
    if why:
        pytest.skip(why)
    out = tmp_path / "loss.json"
    cmd = [sys.executable, "-m", "edtalk_live.benchmarks.loss", "--seconds", "60", "--loss", "5",
           "--weights", str(edtalk_weights), "--avatar", str(face_image), "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    windows = report["windows"]
    assert len(windows) == 6, windows
    assert report["udp_dropped"] > 0, "the nftables rule dropped nothing"
    for w in windows:
        assert w["fps"] >= MIN_FPS, w
        assert w["av_measured"] > 100 and abs(w["av_sync_ms"]) <= MAX_AV_SYNC_MS, w
    assert report["server"]["frames_repeated"] <= 0.01 * 25 * 70, report["server"]


def test_a_failing_audio_to_lip_call_is_retried_and_the_session_goes_on(edtalk_weights, face_image, speech):
    """Audio2Lip raises for 2 s (say, out of device memory): the session sends one error event, shows its last
    frame meanwhile, and once the call works again its mouth moves on (the failed pops changed nothing)."""
    seconds = 6.0
    audio = speech[: int(seconds * 16000)]

    async def main():
        async with Running(edtalk_weights, face_image) as srv:
            batcher = srv.server.lip_batcher
            real = batcher.audio_to_lip
            state = {"calls_failed": 0, "fail_until": None}
            loop = asyncio.get_running_loop()

            def flaky(windows):
                now = loop.time()
                if state["fail_until"] is None:
                    state["fail_until"] = now + 2.0
                if now < state["fail_until"]:
                    state["calls_failed"] += 1
                    raise MemoryError("Audio2Lip: out of memory (injected)")
                return real(windows)

            batcher.audio_to_lip = flaky
            result = await run_client(srv.url, audio, None, {})
            return result, state

    result, state = asyncio.run(main())
    assert state["calls_failed"] > 10
    events = [r for r in result.replies if r.get("type") == "error"]
    assert len(events) == 1 and events[0]["code"] == RENDER_FAILED and events[0]["reason"] == "out_of_memory", events
    assert result.video_frames >= 24 * seconds, (result.video_frames, result.stats)
    assert result.stats["frames_rendered"] >= 25 * (seconds - 3), result.stats
    assert not result.stats["render_failing"], result.stats


def test_the_client_skips_a_lost_video_packet_instead_of_falling_behind():
    """One-packet VP8 frames at 25 fps (a key frame every 2 s), packet 10 lost for good: aiortc's own buffer
    hands over nothing until 128 packets wait behind the gap, then one frame per packet (5 s behind for the
    rest of the call); the client's buffer gives up on the gap after 150 ms, asks for a keyframe, hands over
    nothing undecodable meanwhile, and every frame from the next key frame on, as it arrives."""
    from aiortc.jitterbuffer import JitterBuffer
    from aiortc.rtp import RtpPacket

    from edtalk_live.realtime.client import _video_buffer_class, is_keyframe

    key, delta = b"\x10\x02\x00\x9d\x01\x2a" + bytes(10), b"\x11\x02\x00" + bytes(10)
    assert is_keyframe(key) and not is_keyframe(delta)
    assert is_keyframe(b"\x00\x00\x00\x01\x67\x42") and not is_keyframe(b"\x00\x00\x00\x01\x41\x9a")

    def feed(buffer) -> tuple[list[tuple[int, int]], int]:
        out, plis = [], 0                              # (packet on whose arrival a frame came out, the frame)
        for seq in range(300):
            if seq == 10:
                continue
            packet = RtpPacket(payload_type=96, sequence_number=seq, timestamp=3600 * seq)
            packet._data = key if seq % 50 == 0 else delta    # what aiortc's receiver sets: the VP8 frame
            pli, frame = buffer.add(packet)
            plis += pli
            if frame is not None:
                out.append((seq, frame.timestamp // 3600))
        return out, plis

    theirs, _ = feed(JitterBuffer(capacity=128, is_video=True))
    ours, plis = feed(_video_buffer_class()())
    # a frame comes out when the next one begins (frame k on packet k + 1); after the loss aiortc's lags for good
    assert theirs[-1][0] - theirs[-1][1] > 100, theirs[-3:]
    assert ours[:9] == [(k + 1, k) for k in range(9)], ours[:12]
    assert ours[9:] == [(k + 1, k) for k in range(50, 299)], ours[8:14]
    assert 1 <= plis <= 3, plis                          # asked once at the skip (again each second until a key)
