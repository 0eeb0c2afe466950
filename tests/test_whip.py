"""WHIP ingest and WHEP egress (:mod:`edtalk_live.realtime.whip`): the HTTP status codes and headers the RFC and
the draft ask for, 25 fps to an aiortc WHEP viewer, speech published by FFmpeg's ``whip`` muxer moving the lips
that WHEP viewers of the stream see, and a headless Chromium playing a WHEP stream with trickle ICE."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from conftest import Running, until

from edtalk_live.realtime.whip import ice_server_links, parse_sdpfrag

ORIGIN = "http://page.example"


# ------------------------------------------------------------------------------------------ units


def test_sdpfrag_candidates_take_their_section_mid_and_credentials_are_read():
    frag = parse_sdpfrag("a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\na=group:BUNDLE 0 1\r\n"
                         "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n"
                         "a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0\r\n"
                         "a=candidate:2 1 tcp 1518280447 192.0.2.1 9 typ host tcptype active\r\n"
                         "a=end-of-candidates\r\n")
    assert frag.credentials == ("EsAw", "P2uYro0UCOQ4zxjKXaWCBui1") and frag.end
    assert [(c.ip, c.port, c.protocol, c.sdpMid) for c in frag.candidates] == [
        ("192.0.2.1", 61764, "udp", "0"), ("192.0.2.1", 9, "tcp", "0")]
    bare = parse_sdpfrag("a=candidate:1 1 udp 1 192.0.2.9 5000 typ host\n")
    assert bare.candidates[0].sdpMLineIndex == 0 and not bare.end and bare.credentials == (None, None)


@pytest.mark.parametrize("text,error", [("v=0\r\n", "only a= and m= lines"), ("a=candidate:1 1 udp\r\n", "bad ICE"),
                                        ("a=candidate:" + "x" * 2000, "characters long"),
                                        ("a=candidate:1 1 udp 1 1.2.3.4 5 typ host\n" * 65, "more than 64")])
def test_sdpfrag_bad_fragments_raise_one_line_errors(text, error):
    with pytest.raises(ValueError, match=error):
        parse_sdpfrag(text)


def test_ice_server_links_carry_turn_credentials_quoted():
    links = ice_server_links([{"urls": "stun:stun.example.net"},
                              {"urls": ["turn:t.example.net?transport=udp"], "username": "1:u",
                               "credential": 'p"w'}])
    assert links == ['<stun:stun.example.net>; rel="ice-server"',
                     '<turn:t.example.net?transport=udp>; rel="ice-server"; username="1:u"; credential="p\\"w"; '
                     'credential-type="password"']


# ------------------------------------------------------------------------------------------ helpers


class StunResponder(asyncio.DatagramProtocol):
    """A STUN server answering binding requests on loopback (the ICE server the WHIP/WHEP answers link to; the
    server's own peer connections ask it, so it has to answer quickly)."""

    def __init__(self):
        self.transport = None
        self.requests = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        from aioice import stun

        try:
            request = stun.parse_message(data)
        except ValueError:
            return
        self.requests += 1
        response = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                                transaction_id=request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = addr
        response.add_fingerprint()
        self.transport.sendto(bytes(response), addr)


class WhepViewer:
    """An aiortc WHEP player: POSTs a recvonly offer, keeps the video frames (time, pts, RGB) it receives."""

    def __init__(self, url: str, token: str | None = None):
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.frames: list[tuple[float, int, np.ndarray]] = []
        self.audio_samples = 0
        self.location = ""
        self.response: dict = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self, timeout: float = 20.0) -> None:
        from aiortc import RTCSessionDescription

        from edtalk_live.realtime.client import each_frame

        pc = self.pc
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")

        async def read(track):
            def add(frame):
                if track.kind == "video":
                    self.frames.append((time.monotonic(), frame.pts, frame.to_ndarray(format="rgb24")))
                else:
                    self.audio_samples += frame.samples

            await each_frame(track, add)

        pc.on("track", lambda track: self._tasks.append(asyncio.ensure_future(read(track))))
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http, http.post(
                self.url, data=pc.localDescription.sdp, headers={**self.headers, "Content-Type": "application/sdp",
                                                                 "Origin": ORIGIN}) as r:
            body = await r.text()
            self.response = {"status": r.status, "headers": r.headers, "body": body}
        assert r.status == 201, (r.status, body)
        self.location = str(aiohttp.client.URL(self.url).join(aiohttp.client.URL(r.headers["Location"])))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        deadline = time.monotonic() + timeout
        while pc.connectionState != "connected":
            assert time.monotonic() < deadline, f"the WHEP viewer did not connect ({pc.connectionState})"
            await asyncio.sleep(0.05)

    def fps(self, skip: float = 0.5) -> float:
        """Frames a second received, after the first ``skip`` seconds."""
        t = [f[0] for f in self.frames]
        t = [x for x in t if x >= t[0] + skip]
        return (len(t) - 1) / (t[-1] - t[0])

    async def close(self, delete: bool = True) -> int | None:
        status = None
        if delete and self.location:
            async with aiohttp.ClientSession() as http, http.delete(self.location, headers=self.headers) as r:
                status = r.status
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return status


async def request(method: str, url: str, body: str | bytes | None = None, **headers: str):
    async with aiohttp.ClientSession() as http, http.request(method, url, data=body, headers=headers) as r:
        return r.status, r.headers, await r.text()


async def leftovers(srv: Running) -> dict[str, float]:
    """What a server holds: sessions, peer connections not closed, WHEP sinks, WHIP/WHEP resources."""
    m = await srv.metrics()
    return {"sessions": m[("edtalk_sessions", ())][1], "pcs": m[("edtalk_peer_connections", ())][1],
            "whep_sinks": m[("edtalk_sinks", (("kind", "whep"),))][1], "resources": len(srv.server.whip.resources)}


def _server_tasks() -> list[str]:
    """The server's per-session and per-viewer tasks still running."""
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(("session-", "whep-"))]


def allowed(headers) -> set[str]:
    return {m.strip() for m in headers["Allow"].split(",")}


NOTHING = {"sessions": 0, "pcs": 0, "whep_sinks": 0, "resources": 0}


# ------------------------------------------------------------------------------------------ WHEP


@pytest.mark.slow
def test_whep_viewer_of_an_avatar_status_codes_and_25_fps(edtalk_weights, face_image):
    """An aiortc WHEP player watches an avatar: 201 with Location, ETag and Link; trickle PATCH 204 and its
    428/412/422/415; 404, 405, 503 with Retry-After; CORS; a second viewer with the same options shares the
    session; ~25 fps; DELETE 200 leaves nothing behind."""

    async def main():
        loop = asyncio.get_running_loop()
        stun, stun_server = await loop.create_datagram_endpoint(StunResponder, local_addr=("127.0.0.1", 0))
        stun_url = f"stun:127.0.0.1:{stun.get_extra_info('sockname')[1]}"
        out = {"stun_url": stun_url}
        try:
            async with Running(edtalk_weights, face_image, max_sessions=1, ice_servers=({"urls": stun_url},),
                               cors_origins=(ORIGIN,)) as srv:
                endpoint = f"{srv.url}/whep/face64"
                out["options"] = await request("OPTIONS", endpoint)
                out["head"] = await request("HEAD", endpoint)
                out["head_unknown"] = await request("HEAD", f"{srv.url}/whep/nobody")
                out["wrong_type"] = await request("POST", endpoint, "v=0\r\n", **{"Content-Type": "text/plain"})
                out["unknown"] = await request("POST", f"{srv.url}/whep/nobody", "v=0\r\n",
                                               **{"Content-Type": "application/sdp"})
                out["bad_sdp"] = await request("POST", endpoint, "v=0\r\nbogus\r\n",
                                               **{"Content-Type": "application/sdp"})
                out["bad_option"] = await request("POST", f"{endpoint}?emotion=ecstatic", "v=0\r\n",
                                                  **{"Content-Type": "application/sdp"})
                out["put"] = await request("PUT", endpoint)
                out["preflight"] = await request("OPTIONS", endpoint, Origin=ORIGIN,
                                                 **{"Access-Control-Request-Method": "PATCH",
                                                    "Access-Control-Request-Headers": "if-match, content-type"})
                viewer = WhepViewer(endpoint + "?pose=still")
                t0 = time.monotonic()
                await viewer.start()
                out["setup_s"] = time.monotonic() - t0
                out["stun_requests"] = stun_server.requests
                out["created"] = viewer.response
                loc, etag = viewer.location, viewer.response["headers"]["ETag"]
                frag = "a=mid:0\r\na=candidate:1 1 udp 2122260223 192.0.2.77 50000 typ host\r\na=end-of-candidates\r\n"
                sdpfrag = {"Content-Type": "application/trickle-ice-sdpfrag"}
                out["patch"] = await request("PATCH", loc, frag, **sdpfrag, **{"If-Match": etag})
                out["patch_no_match"] = await request("PATCH", loc, frag, **sdpfrag)
                out["patch_stale"] = await request("PATCH", loc, frag, **sdpfrag, **{"If-Match": '"stale"'})
                out["patch_restart"] = await request("PATCH", loc, frag, **sdpfrag, **{"If-Match": "*"})
                out["patch_new_ufrag"] = await request("PATCH", loc, "a=ice-ufrag:new\r\na=ice-pwd:newnewnew\r\n"
                                                       + frag, **sdpfrag, **{"If-Match": etag})
                out["patch_type"] = await request("PATCH", loc, frag, **{"Content-Type": "application/sdp",
                                                                         "If-Match": etag})
                out["patch_unknown"] = await request("PATCH", loc[:-4] + "beef", frag, **sdpfrag,
                                                     **{"If-Match": etag})
                out["put_resource"] = await request("PUT", loc)
                out["get_whip"] = await request("GET", f"{srv.url}/whip/stream")
                same = WhepViewer(endpoint + "?pose=still")     # the same avatar and options: the same session
                await same.start()
                out["shared"] = await leftovers(srv)
                out["shared_delete"] = await same.close()
                second = WhepViewer(endpoint)           # one session is the limit: a second avatar session is 503
                try:
                    await second.start()
                except AssertionError:
                    pass
                out["full"] = second.response
                await second.close(delete=False)
                await asyncio.sleep(3.0)
                out["fps"] = viewer.fps()
                out["audio_s"] = viewer.audio_samples / 48000
                out["live"] = await leftovers(srv)
                out["delete"] = await viewer.close()
                out["after"] = await leftovers(srv)
                out["delete_again"] = await request("DELETE", loc)
                await until(lambda: not _server_tasks(), 3)
                out["tasks"] = _server_tasks()
        finally:
            stun.close()
        return out

    out = asyncio.run(main())
    print(f"WHEP viewer: setup {out['setup_s']:.2f} s, {out['fps']:.2f} fps, {out['audio_s']:.1f} s of voice")
    status, headers, _ = out["options"]
    assert status == 200 and headers["Accept-Post"] == "application/sdp" and "POST" in allowed(headers)
    status, headers, _ = out["head"]
    assert status == 200 and headers["Content-Type"] == "application/sdp"
    assert out["head_unknown"][0] == 404
    assert out["wrong_type"][0] == 415 and out["wrong_type"][1]["Accept-Post"] == "application/sdp"
    assert out["unknown"][0] == 404 and out["bad_sdp"][0] == 400
    assert out["bad_option"][0] == 400 and "ecstatic" in out["bad_option"][2]
    assert out["put"][0] == 405 and "POST" in allowed(out["put"][1])
    status, headers, _ = out["preflight"]
    assert status == 204 and "PATCH" in headers["Access-Control-Allow-Methods"]
    assert "If-Match" in headers["Access-Control-Allow-Headers"] and headers["Access-Control-Allow-Origin"] == ORIGIN

    created = out["created"]["headers"]
    assert created["Content-Type"] == "application/sdp" and "a=sendonly" in out["created"]["body"]
    assert created["Location"].startswith("/whep/face64/") and created["ETag"].startswith('"')
    assert created.getall("Link") == [f'<{out["stun_url"]}>; rel="ice-server"']
    assert created["Access-Control-Allow-Origin"] == ORIGIN
    assert {"Location", "ETag", "Link"} <= {h.strip() for h in created["Access-Control-Expose-Headers"].split(",")}
    assert out["stun_requests"] > 0, "the server's peer connection did not use the configured STUN server"
    assert out["patch"][0] == 204 and "ETag" not in out["patch"][1] and out["patch"][2] == ""
    assert out["patch_no_match"][0] == 428
    assert out["patch_stale"][0] == 412
    assert out["patch_restart"][0] == 422 and out["patch_new_ufrag"][0] == 422
    assert out["patch_type"][0] == 415 and out["patch_type"][1]["Accept-Patch"] == "application/trickle-ice-sdpfrag"
    assert out["patch_unknown"][0] == 404
    assert out["put_resource"][0] == 405 and {"PATCH", "DELETE"} <= allowed(out["put_resource"][1])
    assert out["get_whip"][0] == 405
    assert out["shared"] == {"sessions": 1, "pcs": 2, "whep_sinks": 2, "resources": 2}, out["shared"]
    assert out["shared_delete"] == 200
    assert out["full"]["status"] == 503 and int(out["full"]["headers"]["Retry-After"]) > 0
    assert 23.5 <= out["fps"] <= 26.5, out["fps"]
    assert out["audio_s"] > 2.0
    assert out["live"] == {"sessions": 1, "pcs": 1, "whep_sinks": 1, "resources": 1}, out["live"]
    assert out["delete"] == 200 and out["after"] == NOTHING, out["after"]
    assert out["delete_again"][0] == 404 and out["tasks"] == []


# ------------------------------------------------------------------------------------------ WHIP (aiortc)


async def aiortc_publisher(url: str, samples: np.ndarray | None, video: bool = False):
    """An aiortc WHIP client sending ``samples`` (16 kHz speech; None: no audio section) and, with ``video``, a
    video section; returns ``(status, headers, body, pc)`` (the peer connection connecting when 201)."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from edtalk_live.realtime.client import FileAudioTrack

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if samples is not None:
        pc.addTrack(FileAudioTrack(samples))
    if video:
        pc.addTransceiver("video", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    status, headers, body = await request("POST", url, pc.localDescription.sdp, **{"Content-Type": "application/sdp"})
    if status == 201:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    return status, headers, body, pc


def _vanish(pc) -> None:
    """Make a peer connection go silent without a word (its UDP sockets closed under aiortc): a peer gone away."""
    for transceiver in pc.getTransceivers()[:1]:
        connection = transceiver.receiver.transport.transport._connection
        for protocol in connection._protocols:
            protocol.transport.close()


@pytest.mark.slow
def test_whip_stream_rules_viewers_by_session_id_and_lifetimes(edtalk_weights, face_image, speech):
    """WHIP: a bad name 400, no audio 422, a name taken 409; viewers by the stream's session id; the viewer limit
    503; a viewer that vanishes is removed after the inactivity timeout; a stream whose speech stopped ends
    after it, with its viewers, leaving nothing behind."""

    async def main():
        out = {}
        async with Running(edtalk_weights, face_image, inactivity_timeout=1.5, max_viewers=2) as srv:
            whip = f"{srv.url}/whip/talk"
            out["bad_name"] = (await request("POST", f"{srv.url}/whip/a%20b", "v=0\r\n",
                                             **{"Content-Type": "application/sdp"}))[0]
            status, _, out["no_audio_body"], pc = await aiortc_publisher(whip, None, video=True)
            out["no_audio"] = status
            await pc.close()
            status, headers, _, publisher = await aiortc_publisher(whip + "?pose=still", speech[: 3 * 16000],
                                                                   video=True)
            out["publish"], out["publish_location"] = status, headers.get("Location", "")
            out["taken"] = (await aiortc_publisher(whip, speech[:1600]))[0]
            sid = srv.server.whip.streams["talk"]
            viewers = [WhepViewer(f"{srv.url}/whep/{sid}"), WhepViewer(f"{srv.url}/whep/talk")]
            for v in viewers:
                await v.start()
            extra = WhepViewer(f"{srv.url}/whep/talk")
            try:
                await extra.start()
            except AssertionError:
                pass
            out["third"] = extra.response["status"], extra.response["headers"].get("Retry-After")
            await extra.close(delete=False)
            out["with_two"] = await leftovers(srv)
            _vanish(viewers[0].pc)
            t0 = time.monotonic()
            await until(lambda: len(srv.server.whip.resources) < 3, 8)
            out["vanished_s"] = time.monotonic() - t0
            out["with_one"] = await leftovers(srv)
            t0 = time.monotonic()
            await until(lambda: not srv.server.peers and not srv.server.whip.resources, 10)   # speech ends at 3 s
            out["ended_s"] = time.monotonic() - t0
            out["after"] = await leftovers(srv)
            await until(lambda: not _server_tasks(), 3)
            out["tasks"] = _server_tasks()
            out["viewer_state"] = viewers[1].pc.connectionState
            for v in viewers:
                await v.close(delete=False)
            await publisher.close()
        return out

    out = asyncio.run(main())
    print(f"WHIP rules: vanished viewer removed after {out['vanished_s']:.1f} s, stream ended "
          f"{out['ended_s']:.1f} s later")
    assert out["bad_name"] == 400
    assert out["no_audio"] == 422 and "audio" in out["no_audio_body"]
    assert out["publish"] == 201 and out["publish_location"].startswith("/whip/talk/")
    assert out["taken"] == 409
    assert out["third"][0] == 503 and out["third"][1]
    assert out["with_two"] == {"sessions": 1, "pcs": 3, "whep_sinks": 2, "resources": 3}, out["with_two"]
    assert out["with_one"] == {"sessions": 1, "pcs": 2, "whep_sinks": 1, "resources": 2}, out["with_one"]
    assert out["vanished_s"] < 5.0
    assert out["after"] == NOTHING and out["viewer_state"] == "closed", (out["after"], out["viewer_state"])
    assert out["tasks"] == [], out["tasks"]


# ------------------------------------------------------------------------------------------ WHIP (FFmpeg)

SECRET = "a-test-secret-of-at-least-32-bytes-long"

#: run in its own process: PyAV holds the GIL while FFmpeg's whip muxer waits for the HTTP answer, which would
#: stall a server in the same process
PUBLISHER = r"""
import sys, time, wave
import av, numpy as np

url, wav, cert, key, token, lead, seconds = sys.argv[1:8]
with wave.open(wav) as w:
    pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")[: int(float(seconds) * 16000)]
pcm = np.concatenate([np.zeros(int(float(lead) * 16000), np.int16), pcm, np.zeros(8000, np.int16)])
mono = av.AudioFrame.from_ndarray(pcm.reshape(1, -1).copy(), format="s16", layout="mono")
mono.sample_rate = 16000
resampler = av.AudioResampler(format="s16", layout="stereo", rate=48000)
stereo = np.concatenate([f.to_ndarray() for f in resampler.resample(mono) + resampler.resample(None)], axis=1)
options = {"cert_file": cert, "key_file": key}
if token:
    options["authorization"] = token
out = av.open(url, "w", format="whip", options=options)
video = out.add_stream("libx264", rate=25, options={"profile": "baseline", "tune": "zerolatency",
                                                    "preset": "ultrafast", "g": "25", "bf": "0"})
video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
audio = out.add_stream("libopus", rate=48000, layout="stereo")
t0, n, sent, shown = time.monotonic(), 960, 0, 0
while sent + n <= stereo.shape[1] // 2:
    frame = av.AudioFrame.from_ndarray(stereo[:, 2 * sent: 2 * (sent + n)].copy(), format="s16", layout="stereo")
    frame.sample_rate, frame.pts = 48000, sent
    out.mux(audio.encode(frame))
    while shown * 1920 <= sent:
        image = av.VideoFrame.from_ndarray(np.full((64, 64, 3), shown % 200, np.uint8), format="rgb24")
        image.pts = shown
        out.mux(video.encode(image))
        shown += 1
    sent += n
    time.sleep(max(0.0, t0 + sent / 48000 - time.monotonic()))
out.close()
print(f"published {sent / 48000:.2f} s", flush=True)
"""


def _ecdsa_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate and key (PEM) for FFmpeg's DTLS: the RSA one FFmpeg makes itself
    fails the handshake with aiortc."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edtalk-live whip test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7)).sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture(scope="module")
def loud_weights(tmp_path_factory, edtalk_weights) -> Path:
    """The fixture weights with Audio2Lip's output scaled up 30 times: the random networks' mouth then moves the
    picture by a few gray levels a frame instead of 0.1 (as tests/test_live_equals_render.py does)."""
    import shutil

    import torch

    dest = tmp_path_factory.mktemp("loud_weights")
    for item in edtalk_weights.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy)(item, dest / item.name)
    ckpt = torch.load(edtalk_weights / "Audio2Lip.pt", weights_only=True)
    for name in ("mapping.weight", "mapping.bias"):
        ckpt["audio2lip"][name] = ckpt["audio2lip"][name] * 30.0
    torch.save(ckpt, dest / "Audio2Lip.pt")
    return dest


def _mouth_motion(frames: list[np.ndarray]) -> np.ndarray:
    """Mean absolute change (levels) of the mouth region from each frame to the next."""
    stack = np.stack(frames).astype(np.float32)
    h, w = stack.shape[1:3]
    mouth = stack[:, int(h * 0.55): int(h * 0.9), int(w * 0.25): int(w * 0.75)]
    return np.abs(np.diff(mouth, axis=0)).mean(axis=(1, 2, 3))


@pytest.mark.slow
def test_ffmpeg_whip_speech_moves_the_lips_two_whep_viewers_see(tmp_path, loud_weights, face_image, testdata):
    """FFmpeg's whip muxer (PyAV) publishes silence then speech (H.264 baseline + Opus 48 kHz stereo, bearer
    token); two WHEP viewers of the stream share its one session; the mouth moves in speech, not in silence; the
    publisher's DELETE at the end leaves nothing behind."""
    from edtalk_live.realtime.access import make_token

    if "whip" not in __import__("av").formats_available:
        pytest.skip("this PyAV's FFmpeg has no whip muxer (FFmpeg 8 or later)")
    cert, key = _ecdsa_certificate(tmp_path)
    token = make_token(SECRET)
    lead, seconds = 2.5, 4.0

    async def main():
        out = {}
        async with Running(loud_weights, face_image, token_secret=SECRET) as srv:
            url = f"{srv.url}/whip/talk?pose=still"
            t0 = time.monotonic()
            publisher = await asyncio.create_subprocess_exec(
                sys.executable, "-c", PUBLISHER, url, str(testdata / "mouth_source.wav"), str(cert), str(key),
                token, str(lead), str(seconds), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                await until(lambda: "talk" in srv.server.whip.streams, 20)
                out["whip_s"] = time.monotonic() - t0
                assert "talk" in srv.server.whip.streams, "FFmpeg's WHIP POST did not arrive"
                out["no_token"] = [(await request("POST", f"{srv.url}/{path}", "v=0\r\n",
                                                  **{"Content-Type": "application/sdp"}))[0]
                                   for path in ("whep/talk", "whip/other")]
                viewers = [WhepViewer(f"{srv.url}/whep/talk", token) for _ in range(2)]
                for v in viewers:
                    await v.start()
                out["viewers_s"] = time.monotonic() - t0
                await asyncio.sleep(1.0)
                out["live"] = await leftovers(srv)
                out["started"] = (await srv.metrics())[("edtalk_sessions_started_total", ())][1]
                log, _ = await asyncio.wait_for(publisher.communicate(), lead + seconds + 20)
                out["log"] = log.decode(errors="replace")[-3000:]
                out["rc"] = publisher.returncode
                await until(lambda: not srv.server.peers and not srv.server.whip.resources, 10)
                out["after"] = await leftovers(srv)
                out["viewers_closed"] = [v.pc.connectionState for v in viewers]
                for v in viewers:
                    await v.close(delete=False)
            finally:
                if publisher.returncode is None:
                    publisher.kill()
                    await publisher.wait()
        out["frames"] = [v.frames for v in viewers]
        return out

    out = asyncio.run(main())
    assert out["rc"] == 0, out["log"]
    assert out["no_token"] == [401, 401]
    assert out["live"] == {"sessions": 1, "pcs": 3, "whep_sinks": 2, "resources": 3}, out["live"]
    assert out["after"] == NOTHING, out["after"]
    assert out["viewers_closed"] == ["closed", "closed"], out["viewers_closed"]
    first, second = out["frames"]
    assert len(first) > 25 * seconds and len(second) > 25 * seconds, (len(first), len(second))
    # one render for both: the frames with the same timestamp are the same picture (two VP8 encodes of it)
    same = sorted({pts for _, pts, _ in first} & {pts for _, pts, _ in second})
    by_pts = [{pts: image for _, pts, image in frames} for frames in (first, second)]
    gaps = [np.abs(by_pts[0][p].astype(int) - by_pts[1][p].astype(int)).mean() for p in same]
    gap = float(np.mean(gaps))
    motion = _mouth_motion([image for _, _, image in first])
    still, talking = float(np.median(motion[:10])), float(np.percentile(motion, 90))
    print(f"WHIP: stream up {out['whip_s']:.2f} s after FFmpeg started, two viewers at {out['viewers_s']:.2f} s; "
          f"mouth change {still:.2f} levels/frame in silence, {talking:.2f} in speech (p90); viewers differ by "
          f"{gap:.2f} levels (at most {max(gaps):.2f}) over {len(same)} shared frames")
    assert out["started"] == 1, "the two viewers did not share the stream's session"
    assert len(same) > 50 and gap < 3.0
    assert talking > max(4 * still, 1.0), (still, talking)


# ------------------------------------------------------------------------------------------ WHEP (Chromium)

#: a WHEP player with trickle ICE: the offer goes at once, the candidates follow in PATCHes once the resource's
#: URL and entity-tag are known (RFC 9725 section 4.3.2, as the WHEP draft)
WHEP_PAGE = """<!doctype html><meta charset="utf-8"><title>WHEP</title><video id="v" autoplay muted playsinline></video>
<script>
window.whep = {state: "new", patches: [], error: null};
async function play(endpoint) {
  const w = window.whep, pc = new RTCPeerConnection();
  w.pc = pc;
  pc.addTransceiver("video", {direction: "recvonly"});
  pc.addTransceiver("audio", {direction: "recvonly"});
  pc.ontrack = (e) => { const v = document.getElementById("v");
    if (!v.srcObject) v.srcObject = new MediaStream(); v.srcObject.addTrack(e.track); };
  pc.onconnectionstatechange = () => { w.state = pc.connectionState; };
  const queue = [];
  const flush = async () => {
    if (!w.resource || !queue.length) return;
    const batch = queue.splice(0), sdp = pc.localDescription.sdp;
    const cands = batch.filter((c) => c && c.candidate), end = batch.includes(null);
    const line = (name) => (sdp.match(new RegExp("^a=" + name + ":(.*)$", "m")) || [])[1];
    const frag = `a=ice-ufrag:${line("ice-ufrag")}\\r\\na=ice-pwd:${line("ice-pwd")}\\r\\n` +
      `${sdp.match(/^m=.*$/m)[0]}\\r\\na=mid:${line("mid")}\\r\\n` +
      cands.map((c) => `a=${c.candidate}\\r\\n`).join("") + (end ? "a=end-of-candidates\\r\\n" : "");
    const r = await fetch(w.resource, {method: "PATCH", body: frag,
      headers: {"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": w.etag}});
    w.patches.push({status: r.status, candidates: cands.length, end});
  };
  pc.onicecandidate = (e) => { queue.push(e.candidate); flush(); };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    w.offerCandidates = (pc.localDescription.sdp.match(/^a=candidate:/gm) || []).length;
    const r = await fetch(endpoint, {method: "POST", body: pc.localDescription.sdp,
                                     headers: {"Content-Type": "application/sdp"}});
    w.status = r.status;
    if (r.status !== 201) throw new Error(`${r.status}: ${await r.text()}`);
    w.resource = new URL(r.headers.get("Location"), endpoint).href;
    w.etag = r.headers.get("ETag");
    await pc.setRemoteDescription({type: "answer", sdp: await r.text()});
    flush();
  } catch (e) { w.error = String(e); }
}
async function framesDecoded() {
  let n = 0;
  (await whep.pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") n = s.framesDecoded;
  });
  return n;
}
async function stop() {
  const r = await fetch(whep.resource, {method: "DELETE"});
  whep.pc.close();
  return r.status;
}
</script>"""


@pytest.mark.slow
@pytest.mark.browser
def test_chromium_plays_a_whep_stream_with_trickle_ice(tmp_path, edtalk_weights, face_image):
    """A page on another origin plays an avatar over WHEP in headless Chromium: the offer leaves without
    candidates, they follow in PATCHes (204) the server adds, the video decodes at ~25 fps, DELETE ends it."""
    import test_browser as tb  # the Chromium and DevTools helpers of the browser page's test
    from aiohttp import web

    from edtalk_live.realtime.serve import build_server
    from edtalk_live.realtime.server import ServerSettings

    if tb.CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    tb._require_working_chromium()
    report: dict = {}

    async def drive(base: str, server) -> None:
        async def page(_request):
            return web.Response(text=WHEP_PAGE, content_type="text/html")

        page_app = web.Application()
        page_app.router.add_get("/", page)
        page_runner = web.AppRunner(page_app)
        await page_runner.setup()
        await web.TCPSite(page_runner, "127.0.0.1", page_port).start()
        browser = tb.Chromium(tmp_path / "profile", tb._fake_mic_wav(tmp_path / "mic.wav", np.zeros(16000)))
        cdp = None
        try:
            port = await browser.devtools_port()
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    target = next(t for t in await r.json() if t.get("type") == "page")
                cdp = tb.Cdp(await http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0))
                await cdp.call("Runtime.enable")
                await cdp.call("Page.enable")
                await cdp.call("Page.navigate", url=f"http://127.0.0.1:{page_port}/")
                await tb.wait_for(cdp, "typeof play === 'function'", 10, "the page")
                t0 = time.monotonic()
                await cdp.evaluate(f"play({base + '/whep/face64'!r})")
                await tb.wait_for(cdp, "whep.state === 'connected' || whep.error", 20, "the WHEP connection")
                report["connect_s"] = time.monotonic() - t0
                await tb.wait_for(cdp, "framesDecoded().then((n) => n > 25)", 20, "decoded frames")
                report["frames_s"] = time.monotonic() - t0
                n0, t1 = await cdp.evaluate("framesDecoded()"), time.monotonic()
                await asyncio.sleep(3.0)
                n1, t2 = await cdp.evaluate("framesDecoded()"), time.monotonic()
                report["fps"] = (n1 - n0) / (t2 - t1)
                report["page"] = await cdp.evaluate("JSON.parse(JSON.stringify({status: whep.status, error: "
                                                    "whep.error, patches: whep.patches, offer: whep.offerCandidates, "
                                                    "etag: whep.etag}))")
                (res,) = server.whip.resources.values()
                transport = res.pc.getTransceivers()[0].sender.transport.transport
                report["server_remote_candidates"] = len(transport.getRemoteCandidates())
                report["delete"] = await cdp.evaluate("stop()")
                for _ in range(50):
                    if not server.peers and not server.whip.resources:
                        break
                    await asyncio.sleep(0.1)
                report["left"] = (len(server.peers), len(server.whip.resources))
                report["exceptions"] = cdp.page_exceptions()
        finally:
            if cdp is not None:
                await cdp.close()
            browser.close()
            await page_runner.cleanup()

    page_port = __import__("conftest").free_port()
    server = build_server(edtalk_weights, face_image, backend="torch", device="cpu", align=False, cache=False,
                          settings=ServerSettings(cors_origins=(f"http://127.0.0.1:{page_port}",)))
    runner = tb.ServerThread(server)
    (tmp_path / "profile").mkdir()
    try:
        base = runner.start()
        asyncio.run(asyncio.wait_for(drive(base, server), 90))
    finally:
        runner.stop()
    print(f"Chromium WHEP: {report}")
    page = report["page"]
    assert page["error"] is None and page["status"] == 201 and page["etag"], page
    assert page["offer"] == 0, "the offer was meant to leave before any candidate was gathered"
    assert page["patches"] and all(p["status"] == 204 for p in page["patches"]), page["patches"]
    assert sum(p["candidates"] for p in page["patches"]) > 0 and page["patches"][-1]["end"], page["patches"]
    assert report["server_remote_candidates"] > 0, "the trickled candidates did not reach the server's ICE agent"
    assert 22 <= report["fps"] <= 27, report["fps"]
    assert report["delete"] == 200 and report["left"] == (0, 0)
    assert report["exceptions"] == []


# ------------------------------------------------------------------------------------------ --workers


async def _fake_worker(index: int, sessions: set[str]):
    """A stand-in for a worker's WHIP/WHEP routes: it holds the sessions named, makes streams, records requests."""
    from aiohttp import web
    from multidict import CIMultiDict

    seen: list[tuple[str, str, str | None, bytes]] = []
    streams: set[str] = set()

    async def endpoint(request):
        kind, name = request.path.split("/")[1], request.match_info["name"]
        seen.append((request.method, request.path, request.headers.get("If-Match"), await request.read()))
        if kind == "whip" and name in streams:
            return web.json_response({"error": "taken"}, status=409)
        if kind == "whep" and name not in sessions | streams | {"face"}:
            return web.json_response({"error": "not here"}, status=404)
        streams.add(name) if kind == "whip" else None
        return web.Response(status=201, body=b"v=0\r\n", headers=CIMultiDict([
            ("Content-Type", "application/sdp"), ("Location", f"/{kind}/{name}/{index}-{len(seen):04x}"),
            ("ETag", '"e"'), ("Link", '<stun:a.example>; rel="ice-server"'),
            ("Link", '<stun:b.example>; rel="ice-server"')]))

    async def resource(request):
        seen.append((request.method, request.path, request.headers.get("If-Match"), await request.read()))
        return web.Response(status=204 if request.method == "PATCH" else 200)

    app = web.Application()
    for kind in ("whip", "whep"):
        app.router.add_post(f"/{kind}/{{name}}", endpoint)
        app.router.add_route("*", f"/{kind}/{{name}}/{{id}}", resource)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1], seen


def test_supervisor_routes_whip_and_whep_to_the_worker_that_holds_them():
    """``--workers``: a new stream goes to the least-loaded worker, a resource's PATCH and DELETE to the worker
    its id names, a WHEP POST to the worker of its stream or session (asked in turn when unknown); Link headers
    come through; a full server answers 503."""
    import argparse

    from aiohttp import web

    from edtalk_live.realtime.workers import Supervisor

    async def main():
        fakes = [await _fake_worker(0, {"5e" * 16}), await _fake_worker(1, set())]
        args = argparse.Namespace(host="127.0.0.1", port=0, max_sessions=10, offer_rate=None, offer_burst=5,
                                  cors_origin=None, token_secret=None)
        sup = Supervisor(args, 2)
        for w, (_, port, _) in zip(sup.workers, fakes, strict=True):
            w.port, w.state = port, "ok"
        sup.workers[0].sessions = 5                     # worker 1 is the least loaded
        sup._http = aiohttp.ClientSession()
        runner = web.AppRunner(sup.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        sdp = {"Content-Type": "application/sdp"}
        out = {}
        try:
            out["whip"] = await request("POST", f"{base}/whip/talk", "offer", **sdp)
            out["whip_again"] = await request("POST", f"{base}/whip/talk", "offer", **sdp)
            location = out["whip"][1]["Location"]
            out["patch"] = await request("PATCH", base + location, "a=end-of-candidates\r\n",
                                         **{"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": '"e"'})
            out["delete_other"] = await request("DELETE", f"{base}/whip/talk/0-0001")
            out["no_worker"] = await request("DELETE", f"{base}/whip/talk/7-0001")
            out["no_index"] = await request("DELETE", f"{base}/whip/talk/beef")
            out["whep_stream"] = await request("POST", f"{base}/whep/talk", "offer", **sdp)
            out["whep_session"] = await request("POST", f"{base}/whep/{'5e' * 16}", "offer", **sdp)
            out["whep_unknown"] = await request("POST", f"{base}/whep/nobody", "offer", **sdp)
            out["loads"] = [w.sessions for w in sup.workers]
            out["whep_avatar"] = await request("POST", f"{base}/whep/face", "offer", **sdp)
            out["loads_avatar"] = [w.sessions for w in sup.workers]
            sup.workers[0].sessions = 8
            out["full"] = await request("POST", f"{base}/whip/other", "offer", **sdp)
        finally:
            await runner.cleanup()
            await sup._http.close()
            for fake_runner, _, _ in fakes:
                await fake_runner.cleanup()
        return out, [seen for _, _, seen in fakes]

    out, (seen0, seen1) = asyncio.run(main())
    status, headers, _ = out["whip"]
    assert status == 201 and headers["Location"].startswith("/whip/talk/1-")
    assert headers.getall("Link") == ['<stun:a.example>; rel="ice-server"', '<stun:b.example>; rel="ice-server"']
    assert out["whip_again"][0] == 409                  # the same worker, which has the stream
    assert out["patch"][0] == 204 and ("PATCH", out["whip"][1]["Location"], '"e"', b"a=end-of-candidates\r\n") in seen1
    assert out["delete_other"][0] == 200 and ("DELETE", "/whip/talk/0-0001", None, b"") in seen0
    assert out["no_worker"][0] == 404 and out["no_index"][0] == 404
    assert out["whep_stream"][0] == 201 and out["whep_stream"][1]["Location"].startswith("/whep/talk/1-")
    assert out["whep_session"][0] == 201 and out["whep_session"][1]["Location"].startswith("/whep/5e5e")
    assert [m for m, p, *_ in seen1 if p == f"/whep/{'5e' * 16}"] == ["POST"]      # asked first: 404
    assert out["whep_unknown"][0] == 404
    assert out["loads"] == [5, 1]                       # the stream's session counted on worker 1, no other
    assert out["whep_avatar"][0] == 201 and out["loads_avatar"] == [5, 2]         # an avatar's session
    assert out["full"][0] == 503 and out["full"][1]["Retry-After"] == "5"


@pytest.mark.slow
def test_two_workers_serve_whep_viewers_patch_and_delete_on_their_workers(tmp_path, edtalk_weights, face_image):
    """``edtalk-live serve --workers 2``: two WHEP viewers of the avatar land on the two workers; each one's
    trickle PATCH and DELETE reach its own worker (a wrong one would answer 404); nothing is left after."""
    import signal

    import test_workers as tw

    served = tw._Served(edtalk_weights, face_image, tmp_path / "serve.log")

    async def scenario():
        await served.until(lambda s, b: s == 200, 90, "both workers up")
        viewers = []
        for n in (1, 2):
            viewers.append(WhepViewer(f"{served.url}/whep/{face_image.stem}"))
            await viewers[-1].start()
            await served.until(lambda s, b, n=n: b["sessions"] == n, 10, "the viewer's session counted")
        body = await served.until(lambda s, b: tw._sessions(b) == [1, 1], 5, "one session on each worker")
        workers = sorted(v.response["headers"]["Location"].split("/")[-1].split("-")[0] for v in viewers)
        frag = "a=mid:0\r\na=candidate:1 1 udp 2122260223 192.0.2.77 50000 typ host\r\n"
        patches = [(await request("PATCH", v.location, frag, **{"Content-Type": "application/trickle-ice-sdpfrag",
                                                                 "If-Match": v.response["headers"]["ETag"]}))[0]
                   for v in viewers]
        await asyncio.sleep(1.0)
        fps = [v.fps(skip=0.2) for v in viewers]
        deletes = [await v.close() for v in viewers]
        await served.until(lambda s, b: b["sessions"] == 0, 5, "both sessions gone")
        return workers, patches, fps, deletes, body

    family: set[int] = set()
    try:
        workers, patches, fps, deletes, body = asyncio.run(scenario())
        family = tw._descendants(served.proc.pid)
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(30) == 0, served.tail()
    finally:
        served.kill_all(family)
    print(f"two workers: viewers at {[round(f, 1) for f in fps]} fps")
    assert workers == ["0", "1"], workers
    assert patches == [204, 204] and deletes == [200, 200]
    assert all(f > 20 for f in fps), fps
