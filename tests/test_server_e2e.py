"""The real server on loopback with the fixture weights, driven by the Python WebRTC client."""

from __future__ import annotations

import asyncio
import fractions
import itertools
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import Running  # tests/ is on sys.path (pytest's rootdir conftest)
from conftest import until as _until

import edtalk_live.edtalk as edtalk
from edtalk_live.engines import create_renderer
from edtalk_live.realtime.client import run_client
from edtalk_live.realtime.protocol import SessionOptions
from edtalk_live.realtime.session import Session

pytestmark = pytest.mark.slow


async def _mutated_offer() -> str:
    """A real offer with its ICE credentials removed (aiortc raises inside setRemoteDescription)."""
    import re

    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return re.sub(r"a=ice-(ufrag|pwd):.*\r\n", "", sdp)


def _session_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("session-")]


def _probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = [f for f in c.decode(v)]
        pts = [f.pts for f in frames]
        info = {"frames": len(frames), "audio": bool(c.streams.audio), "time_base": v.time_base, "pts": pts,
                "size": (frames[0].width, frames[0].height)}
    return info


def test_session_streams_video_and_voice(tmp_path, edtalk_weights, face_image, speech):
    """3 s of speech: 25 fps, one frame per 40 ms of audio, no gaps, voice present, clean up afterwards."""
    seconds = 3.0
    out = tmp_path / "recorded.mp4"

    async def main():
        async with Running(edtalk_weights, face_image) as srv:
            result = await run_client(srv.url, speech[: int(seconds * 16000)], out, {"emotion": "happy"})
            await _until(lambda: not srv.server.peers)
            status, health = await srv.get("/health")
            _, metrics = await srv.get("/metrics")
            await _until(lambda: not _session_tasks(), 3)
            leftover = _session_tasks()
            return result, health, metrics, leftover, len(srv.server.peers)

    result, health, metrics, leftover, peers = asyncio.run(main())
    expected = int(seconds * 25)
    assert abs(result.video_frames - expected) <= 3, result.video_frames
    steps = np.diff(result.video_pts)
    # no gap or repeat in the 90 kHz timestamps, but for the first and last few frames (session start-up)
    inner = steps[3:-3]
    assert (inner == 3600).all(), f"gaps or repeats in the 90 kHz timestamps: {steps.tolist()} {result.stats}"
    assert ((steps == 3600) | (steps == 7200)).all() and (steps == 7200).sum() <= 1, steps.tolist()
    assert result.size == (64, 64)
    assert result.audio_samples / result.audio_rate == pytest.approx(seconds, abs=0.15)
    info = _probe(out)
    assert info["audio"], "no audio track in the recording"
    assert abs(info["frames"] - expected) <= 3
    duration = (info["pts"][-1] - info["pts"][0]) * info["time_base"] + 1 / 25
    assert abs(info["frames"] / float(duration) - 25) <= 1
    s = result.stats
    assert s["frames_repeated"] <= 3 and s["frames_dropped"] <= 3, repr(s)
    assert s["latency_ms_p95"] is not None and abs(s["av_offset_ms"]) < 40, s
    # the peer hung up: nothing left behind
    assert peers == 0 and health["sessions"] == 0 and leftover == []
    assert "edtalk_frames_sent_total" in metrics and 'edtalk_latency_seconds_bucket{le="+Inf"}' in metrics
    assert "edtalk_render_batch_size_bucket" in metrics and "edtalk_sessions_started_total 1.0" in metrics


def test_counters_do_not_go_down_when_a_session_ends(edtalk_weights, face_image, speech):
    """Scrape /metrics while a session repeats and drops frames, then after it ended: no counter went down."""

    async def main():
        async with Running(edtalk_weights, face_image) as srv:
            scheduler, calls = srv.server.scheduler, itertools.count()
            render = scheduler.render

            async def slow(*args, **kw):            # every third frame misses its deadline: dropped, repeated
                if next(calls) % 3 == 0:
                    await asyncio.sleep(0.3)
                return await render(*args, **kw)

            scheduler.render = slow
            client = asyncio.create_task(run_client(srv.url, speech[: 3 * 16000], None))
            live = None
            while not client.done():                # the last scrape taken while the session was live
                await asyncio.sleep(0.1)
                scraped = await srv.metrics()
                if scraped[("edtalk_sessions", ())][1] == 1:
                    live = scraped
            await client
            await _until(lambda: not srv.server.peers)
            return live, await srv.metrics()

    live, after = asyncio.run(main())
    assert live is not None and after[("edtalk_sessions", ())][1] == 0
    assert live[("edtalk_frames_repeated_total", ())][1] > 0, "the slow renderer caused no repeat"
    assert live[("edtalk_frames_dropped_total", (("reason", "deadline"),))][1] > 0
    totals = {k: v for k, (kind, v) in live.items()
              if kind in ("counter", "histogram") and not k[0].endswith("_created")}
    assert len(totals) > 20
    went_down = {k: (v, after[k][1]) for k, v in totals.items() if after[k][1] < v}
    assert not went_down, f"counters went down when the session ended: {went_down}"


def test_bad_requests_get_clear_errors_and_server_keeps_serving(edtalk_weights, face_image, speech):
    async def main():
        async with Running(edtalk_weights, face_image) as srv:
            out = {}
            out["not_json"] = await srv.post("/offer", "this is not json")
            out["no_sdp"] = await srv.post("/offer", json.dumps({"type": "offer"}))
            out["no_media"] = await srv.post("/offer", json.dumps({"type": "offer", "sdp": "v=0\r\nbogus\r\n"}))
            out["bad_sdp"] = await srv.post("/offer", json.dumps({"type": "offer", "sdp": await _mutated_offer()}))
            out["big"] = await srv.post("/offer", json.dumps({"type": "offer", "sdp": "x" * 70_000}))
            bad_emotion = run_client(srv.url, speech[:8000], None, {"emotion": "ecstatic"})
            try:
                await bad_emotion
                out["emotion"] = None
            except Exception as e:  # noqa: BLE001
                out["emotion"] = str(e)
            # a control channel fed garbage answers with errors and the session keeps going
            result = await run_client(
                srv.url, speech[: 2 * 16000], None,
                control=[(0.2, {"type": "dance"}), (0.3, {"type": "emotion", "name": "ecstatic"}),
                         (0.4, {"type": "emotion", "name": "sad"}), (0.5, {"type": "pose", "mode": "still"})])
            out["result"] = result
            await _until(lambda: not srv.server.peers)
            out["peers"] = len(srv.server.peers)
            return out

    out = asyncio.run(main())
    for key in ("not_json", "no_sdp", "no_media", "bad_sdp"):
        status, body = out[key]
        assert status == 400 and body["error"], (key, status, body)
    assert "bad SDP" in out["bad_sdp"][1]["error"]
    assert out["big"][0] == 413
    assert out["emotion"] is not None and "unknown emotion 'ecstatic'" in out["emotion"]
    assert abs(out["result"].video_frames - 50) <= 3       # the garbage-sending session still got its frames
    assert out["peers"] == 0


def test_control_channel_replies(edtalk_weights, face_image, speech):
    async def main():
        async with Running(edtalk_weights, face_image) as srv:
            return await run_client(srv.url, speech[: 2 * 16000], None, control=[
                (0.05, "this is not JSON {"), (0.1, {"type": "dance"}), (0.2, {"type": "emotion", "name": "sad"}),
                (0.3, {"type": "intensity", "value": 5}), (0.4, {"type": "interrupt"}),
                (0.5, {"type": "pause"}), (0.6, {"type": "resume"}), (0.7, {"type": "pose", "mode": "clip"})])

    result = asyncio.run(main())
    kinds = [(r["type"], r.get("for"), r.get("error", "")) for r in result.replies]
    assert ("error", None, "control message is not valid JSON") in kinds
    assert ("error", None, "unknown control message type 'dance'; known: emotion, intensity, pose, pause, "
            "resume, interrupt, stats, bye") in kinds
    assert ("ok", "emotion", "") in kinds
    assert any(t == "error" and "intensity must be between 0 and 2" in e for t, _, e in kinds)
    assert any(t == "error" and "needs a pose clip" in e for t, _, e in kinds)
    assert ("ok", "interrupt", "") in kinds and ("ok", "pause", "") in kinds and ("ok", "resume", "") in kinds
    stats = [r for r in result.replies if r["type"] == "stats"]
    assert stats and stats[-1]["stats"]["frames_sent"] > 0


def test_session_limit_answers_503(edtalk_weights, face_image, speech):
    async def main():
        async with Running(edtalk_weights, face_image, max_sessions=1) as srv:
            first = asyncio.create_task(run_client(srv.url, speech[: 2 * 16000], None))
            while not srv.server.peers:
                await asyncio.sleep(0.02)
            second = None
            try:
                await run_client(srv.url, speech[:8000], None)
            except Exception as e:  # noqa: BLE001
                second = str(e)
            await first
            third = await run_client(srv.url, speech[:8000], None)     # a slot is free again
            return second, third

    second, third = asyncio.run(main())
    assert second is not None and "503" in second and "server full" in second
    assert third.video_frames > 0


@pytest.mark.parametrize("emotion,intensity,low_latency", [(None, 1.0, False), ("happy", 0.5, False),
                                                          (None, 1.0, True)])
def test_streamed_frames_match_offline_frames(edtalk_weights, face_image, speech, emotion, intensity, low_latency):
    """The session pipeline (lip sync in sliding windows, scheduler) gives the frames ``render`` computes."""
    from edtalk_live.avatar.prepare import prepare_avatar, read_face
    from edtalk_live.avatar.speech import lips_for_audio, lipsync_config
    from edtalk_live.media.weights import find_weights, load_preset
    from edtalk_live.realtime.scheduler import FrameScheduler

    frames_n = 30
    wav = speech[: frames_n * 640]
    w = find_weights(edtalk_weights)
    model = edtalk.load_model(w.gen, audio2lip=w.audio2lip)
    renderer = create_renderer("torch", model=model, device="cpu")
    avatar = prepare_avatar(renderer, read_face(face_image, align=False))
    presets = {"happy": load_preset(w.presets["happy"])}

    # offline: what `edtalk-live render --still [--emotion happy --intensity 0.5] [--low-latency]` computes
    lip = lips_for_audio(renderer.audio_to_lip, wav, frames_n, avatar.rest_lip, lipsync_config(low_latency))
    exp = avatar.expression(presets[emotion] if emotion else None, intensity)
    offline = renderer.render(renderer.prepare_expression(avatar.source, exp), lip,
                              avatar.rest_pose.expand(frames_n, -1))

    async def stream():
        scheduler = FrameScheduler(renderer, max_batch=8)
        await scheduler.start()
        options = SessionOptions(avatar=avatar.name, emotion=emotion, intensity=intensity, pose="still",
                                 low_latency=low_latency)
        session = Session("0" * 32, renderer, scheduler, avatar, options, presets, render_budget=5.0)
        session.start()
        await asyncio.sleep(0.3)                            # silence first, as a live stream has it
        frame = av.AudioFrame.from_ndarray((wav * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, 0, fractions.Fraction(1, 16000)
        session.push_audio(frame)                           # the speech, anchored on a frame boundary
        lead = session.audio.anchor_pos // 640
        want = range(lead, lead + frames_n)
        for _ in range(400):
            await asyncio.sleep(0.02)
            if all(i in session.frames for i in want):
                break
        got = {i - lead: session.frames[i] for i in want if i in session.frames}
        await session.close()
        await scheduler.stop()
        return got

    got = asyncio.run(stream())
    assert sorted(got) == list(range(frames_n))
    for i, image_i in got.items():
        diff = np.abs(image_i.astype(int) - offline[i].astype(int)).max()
        assert diff <= 1, f"frame {i} differs by {diff} levels"


def test_silence_gives_resting_mouth(edtalk_weights, face_image):
    """No audio at all: frames are rendered from silence with the rest mouth, steadily at 25 fps."""
    from edtalk_live.avatar.prepare import prepare_avatar, read_face
    from edtalk_live.media.weights import find_weights
    from edtalk_live.realtime.scheduler import FrameScheduler

    w = find_weights(edtalk_weights)
    model = edtalk.load_model(w.gen, audio2lip=w.audio2lip)
    renderer = create_renderer("torch", model=model, device="cpu")
    assets = prepare_avatar(renderer, read_face(face_image, align=False, name="face"))
    seen: list[torch.Tensor] = []

    async def run():
        scheduler = FrameScheduler(renderer)
        await scheduler.start()
        session = Session("1" * 32, renderer, scheduler, assets, SessionOptions(avatar="face", pose="still"), {})
        original = scheduler.render

        async def spy(avatar, lip, pose, **kw):
            seen.append(torch.as_tensor(lip).clone())
            return await original(avatar, lip, pose, **kw)

        scheduler.render = spy
        session.start()
        await asyncio.sleep(1.0)
        await session.close()
        await scheduler.stop()

    asyncio.run(run())
    assert len(seen) >= 15
    for lip in seen:
        torch.testing.assert_close(lip, assets.rest_lip, atol=1e-6, rtol=0)


def test_silent_peer_is_reclaimed(edtalk_weights, face_image, speech):
    """A peer that stops sending audio but never hangs up is closed by the inactivity timer."""

    async def main():
        async with Running(edtalk_weights, face_image, inactivity_timeout=1.0) as srv:
            client = asyncio.create_task(run_client(srv.url, speech[:8000], None, tail=4.0))
            await _until(lambda: srv.server.peers, 10)
            await _until(lambda: not srv.server.peers, 6)
            reclaimed = not srv.server.peers and not client.done()
            await _until(lambda: not _session_tasks(), 3)
            leftover = _session_tasks()
            await client
            return reclaimed, leftover

    reclaimed, leftover = asyncio.run(main())
    assert reclaimed, "the session was not reclaimed while the peer stayed silent"
    assert leftover == []


def test_udp_port_range(edtalk_weights, face_image, speech):
    async def main():
        async with Running(edtalk_weights, face_image, udp_ports=(42100, 42120)) as srv:
            seen = srv.record_answers()
            await run_client(srv.url, speech[:8000], None)
            return seen

    (sdp,) = asyncio.run(main())
    lines = [line for line in sdp.splitlines() if line.startswith("a=candidate:") and "typ host" in line]
    ports = [int(line.split()[5]) for line in lines]
    assert ports and all(42100 <= p <= 42120 for p in ports), ports


def test_paste_back_session_streams_the_photo(edtalk_weights, testdata, speech):
    """Session option paste_back: the stream has the photo's size, the face blended back in."""
    from PIL import Image

    photo = testdata / "uncrop_face.jpg"
    w, h = Image.open(photo).size

    async def main():
        async with Running(edtalk_weights, photo, align=True) as srv:
            return await run_client(srv.url, speech[:16000], None, {"paste_back": True}, keep_frames=True)

    result = asyncio.run(main())
    assert result.video_frames >= 20
    assert result.size == (w - w % 2, h - h % 2)
    frame = result.frames[-1]
    original = np.asarray(Image.open(photo).convert("RGB"))[: frame.shape[0], : frame.shape[1]]
    # far from the face (bottom rows) the stream shows the photo, up to video coding noise
    assert np.abs(frame[-100:].astype(int) - original[-100:].astype(int)).mean() < 6


def test_render_budget_starts_from_the_renderer_timed_at_start_up(edtalk_weights, face_image):
    """A new server times one frame's device work before the first session: the budget starts there (never
    below the silence fill's jitter margin + a producer tick + that work), not at a fixed value."""
    from edtalk_live.realtime.session import PRODUCER_TICK_S

    async def main():
        async with Running(edtalk_weights, face_image) as srv:
            budget = srv.server.budget
            assert budget.floor > srv.server.settings.jitter_margin + PRODUCER_TICK_S
            assert budget.floor <= budget.initial == budget.current(load=1) < 0.5
            return budget.floor, budget.initial

    floor, initial = asyncio.run(main())
    # a fixed budget is taken as given: no start-up timing
    async def fixed():
        async with Running(edtalk_weights, face_image, render_budget=0.2) as srv:
            return srv.server.render_budget(), srv.server.budget.floor

    budget, fixed_floor = asyncio.run(fixed())
    assert budget == 0.2 and fixed_floor == pytest.approx(0.05 + PRODUCER_TICK_S)


def test_session_budget_rises_when_frames_are_late_and_falls_when_the_load_does(edtalk_weights, face_image):
    """A session whose frames miss their slot raises its render budget (and delay) a frame at a time until they
    are on time; when the server's measured budget is lower again and the avatar is silent, it comes down."""
    from edtalk_live.avatar.prepare import prepare_avatar, read_face
    from edtalk_live.media.weights import find_weights
    from edtalk_live.realtime.scheduler import FrameScheduler

    w = find_weights(edtalk_weights)
    model = edtalk.load_model(w.gen, audio2lip=w.audio2lip)
    renderer = create_renderer("torch", model=model, device="cpu")
    assets = prepare_avatar(renderer, read_face(face_image, align=False, name="face"))
    slow = {"s": 0.06}

    async def run():
        scheduler = FrameScheduler(renderer)
        await scheduler.start()
        session = Session("2" * 32, renderer, scheduler, assets, SessionOptions(avatar="face", pose="still"), {},
                          render_budget=0.08, jitter_margin=0.03,
                          budget_fn=lambda: 0.08 if slow["s"] == 0 else 0.2)   # what the server would measure
        original = scheduler.render

        async def loaded(avatar, lip, pose, **kw):      # a busy device: each frame takes 60 ms more
            await asyncio.sleep(slow["s"])
            return await original(avatar, lip, pose, **kw)

        scheduler.render = loaded
        session.start()

        pulling = asyncio.create_task(asyncio.sleep(3600))
        await asyncio.sleep(12.0)
        raised, changes = session.render_budget, session.stats.budget_changes
        late_before = session.out.repeated
        await asyncio.sleep(2.0)
        late_after = session.out.repeated - late_before
        slow["s"] = 0.0                                   # the load is gone
        await asyncio.sleep(9.0)
        lowered = session.render_budget
        pulling.cancel()
        await session.close()
        await scheduler.stop()
        return raised, changes, late_after, lowered

    raised, changes, late_after, lowered = asyncio.run(run())
    assert raised >= 0.08 + 0.06 and changes >= 2
    assert late_after <= 2, "after rising, the frames are on time"
    assert lowered < raised and lowered >= 0.08
