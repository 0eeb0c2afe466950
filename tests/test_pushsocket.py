"""The pushed-speech socket end to end: a bot's TTS audio over a WebSocket drives a session a viewer watches over
WebRTC; playback events with positions, interrupts, errors, tokens, and the session kept while the socket is open."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np
import pytest
from conftest import Running, until

pytestmark = pytest.mark.slow

RATE = 24_000


def _tts(speech: np.ndarray, seconds: float, offset: float = 0.0) -> bytes:
    """``seconds`` of the test speech at 24 kHz (as TTS engines make it), 16-bit PCM."""
    import av

    x = speech[int(offset * 16000): int((offset + seconds) * 16000)]
    frame = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16)[None], format="s16", layout="mono")
    frame.sample_rate = 16000
    out = av.AudioResampler(format="s16", layout="mono", rate=RATE).resample(frame)
    return b"".join(bytes(f.planes[0])[: f.samples * 2] for f in out)


async def _viewer(url: str, options: dict):
    """A WebRTC peer that only receives (no microphone); returns (pc, session id, received video/voice counters)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from edtalk_live.realtime.client import each_frame

    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    got = {"video": [], "voice": []}

    async def read(track):
        def add(frame):
            if track.kind == "video":
                got["video"].append(time.monotonic())
            else:
                got["voice"].append((time.monotonic(), float(np.abs(frame.to_ndarray()).mean())))

        await each_frame(track, add)

    pc.on("track", lambda track: asyncio.ensure_future(read(track)))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer", **options}) as r:
            body = await r.json()
            assert r.status == 200, body
    await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))
    return pc, body["session"], got


async def _events(ws, until_type: str, timeout: float = 10.0) -> list[tuple[float, dict]]:
    out = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            event = json.loads(msg.data)
            out.append((time.monotonic(), event))
            if event["type"] == until_type:
                return out


def test_a_bot_speaks_through_the_socket_and_a_viewer_sees_and_hears_it(edtalk_weights, face_image, speech):
    async def main():
        async with Running(edtalk_weights, face_image, inactivity_timeout=1.0) as srv:
            pc, sid, got = await _viewer(srv.url, {"input": "push", "pose": "still"})
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"{srv.url}/sessions/{sid}/speech?rate={RATE}") as ws:
                    ready = json.loads((await ws.receive()).data)
                    assert ready["type"] == "ready" and ready["session"] == sid and ready["rate"] == RATE
                    await asyncio.sleep(1.5)        # a bot listening: silent, and the session stays
                    assert sid in srv.server.peers
                    pcm = _tts(speech, 2.0)
                    sent = time.monotonic()
                    for k in range(0, len(pcm), 9600):                  # faster than real time
                        await ws.send_bytes(pcm[k:k + 9600])
                    await ws.send_str(json.dumps({"type": "end"}))
                    first = await _events(ws, "playback_finished")
                    # a second utterance, interrupted half a second in
                    await ws.send_bytes(_tts(speech, 2.0, offset=3.0))
                    second = await _events(ws, "playback_started")
                    await asyncio.sleep(0.5)
                    await ws.send_str(json.dumps({"type": "interrupt"}))
                    second += await _events(ws, "playback_finished")
                    # bad messages are answered, the socket stays
                    await ws.send_bytes(b"\x00\x01\x02")
                    odd = json.loads((await ws.receive()).data)
                    await ws.send_str('{"type": "sing"}')
                    unknown = json.loads((await ws.receive()).data)
                    await ws.send_str(json.dumps({"type": "end"}))
                await asyncio.sleep(0.2)
                alive_after_close = sid in srv.server.peers
                await until(lambda: sid not in srv.server.peers, 5.0)
            await pc.close()
            return sent, first, second, odd, unknown, got, alive_after_close

    sent, first, second, odd, unknown, got, alive_after_close = asyncio.run(main())
    kinds = [e["type"] for _, e in first]
    assert kinds == ["queued", "playback_started", "playback_finished"], kinds
    started_at = first[1][0]
    assert started_at - sent < 0.5, "pushed speech is heard within the session's delay"
    done = first[2][1]
    assert done["position"] == pytest.approx(2.0, abs=0.05) and not done["interrupted"]
    assert first[2][0] - started_at == pytest.approx(2.0, abs=0.15), "played in real time"
    cut = second[-1][1]
    assert cut["type"] == "playback_finished" and cut["interrupted"]
    assert cut["position"] == pytest.approx(0.5, abs=0.15)
    assert odd["type"] == "error" and "even number" in odd["error"]
    assert unknown["type"] == "error" and "unknown message" in unknown["error"]
    # the viewer: 25 fps, and the voice loud while the bot spoke and quiet before it
    video = np.asarray(got["video"])
    assert len(video) > 50 and 23 <= (len(video) - 1) / (video[-1] - video[0]) <= 27
    voice = np.asarray(got["voice"])
    loud = voice[(voice[:, 0] > started_at + 0.3) & (voice[:, 0] < started_at + 1.7), 1]
    quiet = voice[voice[:, 0] < sent, 1]
    assert loud.mean() > 10 * max(quiet.mean(), 1.0)
    assert alive_after_close, "what was pushed plays on after the socket closed"


def test_the_socket_refuses_what_it_cannot_serve(edtalk_weights, face_image):
    from edtalk_live.realtime.access import make_token

    async def main():
        async with Running(edtalk_weights, face_image, token_secret="s3cret-" * 8) as srv:
            token = make_token("s3cret-" * 8, ttl_s=60)
            auth = {"Authorization": f"Bearer {token}"}
            codes = {}
            async with aiohttp.ClientSession() as http:
                async def status(path, headers=None):
                    async with http.get(srv.url + path, headers=headers) as r:
                        return r.status

                from aiortc import RTCPeerConnection
                pcs = []
                sids = {}
                for name, options in (("mic", {}), ("push", {"input": "push"})):
                    pc = RTCPeerConnection()
                    pc.addTransceiver("audio", direction="sendrecv")
                    pc.addTransceiver("video", direction="recvonly")
                    await pc.setLocalDescription(await pc.createOffer())
                    async with http.post(f"{srv.url}/offer", headers=auth,
                                         json={"sdp": pc.localDescription.sdp, "type": "offer", **options}) as r:
                        sids[name] = (await r.json())["session"]
                    pcs.append(pc)
                codes["no token"] = await status(f"/sessions/{sids['push']}/speech")
                codes["unknown"] = await status("/sessions/" + "0" * 32 + "/speech", auth)
                codes["mic"] = await status(f"/sessions/{sids['mic']}/speech", auth)
                codes["rate"] = await status(f"/sessions/{sids['push']}/speech?rate=7", auth)
                async with http.ws_connect(f"{srv.url}/sessions/{sids['push']}/speech?token={token}") as ws:
                    codes["ready"] = json.loads((await ws.receive()).data)["type"]
                    codes["second"] = await status(f"/sessions/{sids['push']}/speech", auth)
                bad = await http.post(f"{srv.url}/offer", headers=auth, json={"sdp": "v=0", "type": "offer",
                                                                              "input": "keyboard"})
                codes["bad option"] = (bad.status, (await bad.json())["error"])
            for pc in pcs:
                await pc.close()
            return codes

    codes = asyncio.run(main())
    assert codes["no token"] == 401 and codes["unknown"] == 404 and codes["mic"] == 409 and codes["rate"] == 400
    assert codes["ready"] == "ready" and codes["second"] == 409
    assert codes["bad option"][0] == 400 and "mic, push" in codes["bad option"][1]


def test_the_workers_supervisor_relays_the_socket_to_the_session_s_worker(tmp_path, edtalk_weights, face_image, speech):
    """``serve --workers 2``: sessions on both workers, each bot's socket reaches its own session through the
    supervisor, both ways; an unknown session is a 404 there."""
    import signal

    from test_workers import _Served

    served = _Served(edtalk_weights, face_image, tmp_path / "serve.log")

    async def main():
        await served.until(lambda status, body: status == 200 and body.get("status") == "ok", 180, "two workers up")
        pcs, results = [], []
        async with aiohttp.ClientSession() as http:
            async with http.get(served.url + "/sessions/" + "0" * 32 + "/speech") as r:
                unknown = r.status
            for _ in range(2):
                pc, sid, got = await _viewer(served.url, {"input": "push"})
                pcs.append(pc)
                async with http.ws_connect(f"{served.url}/sessions/{sid}/speech?rate={RATE}") as ws:
                    ready = json.loads((await ws.receive()).data)
                    await ws.send_bytes(_tts(speech, 1.0))
                    await ws.send_str(json.dumps({"type": "end"}))
                    events = await _events(ws, "playback_finished", timeout=20)
                    results.append((sid, ready, events))
        _, body = await served.health()
        for pc in pcs:
            await pc.close()
        return unknown, results, body

    try:
        unknown, results, body = asyncio.run(main())
    finally:
        served.proc.send_signal(signal.SIGINT)
        served.proc.wait(30)
    assert unknown == 404
    assert sorted(w["sessions"] for w in body["workers"]) == [1, 1], body
    for sid, ready, events in results:
        assert ready["session"] == sid
        finished = events[-1][1]
        assert finished["position"] == pytest.approx(1.0, abs=0.05) and not finished["interrupted"]
