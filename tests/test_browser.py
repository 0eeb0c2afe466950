"""One real-browser test: headless Chromium runs ``clients/web`` against the real server.

The server (parity fixture weights, 64×64 avatar, torch on the CPU) runs in a background thread
with its own event loop. Chromium gets a fake microphone that plays speech from a wav file and is
driven over the DevTools protocol (a tiny client on aiohttp's websocket, no Selenium/Playwright):
Start, wait for decoded video frames, read the stats panel, change the emotion, provoke a control
error and an offer error, Stop, and check that the server has no session left.

Skips with a reason when Chromium or the ``../shared`` fixtures are absent.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.access(p, os.X_OK)), None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"),
]

OVERALL_TIMEOUT = 60.0          # seconds for the whole browser session
FRAMES_WANTED = 25              # decoded video frames before the page counts as streaming


# ---------------------------------------------------------------------------------------- server


class ServerThread:
    """An :class:`~edtalk_live.realtime.server.AvatarServer` served on 127.0.0.1:<free port> by its own loop in a
    thread."""

    def __init__(self, server):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="edtalk-server", daemon=True)
        self.runner = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> str:
        from aiohttp import web

        async def up() -> str:
            self.runner = web.AppRunner(self.server.app())
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            host, port = self.runner.addresses[0][:2]
            return f"http://{host}:{port}"

        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(up(), self.loop).result(timeout)
        return self.url

    def stop(self, timeout: float = 20.0) -> None:
        try:
            if self.runner is not None:
                asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
            if not self.thread.is_alive():
                self.loop.close()


# ---------------------------------------------------------------------------------------- browser


class Chromium:
    """Headless Chromium with a fake microphone (a wav file), reachable over the DevTools protocol."""

    def __init__(self, profile: Path, audio_wav: Path):
        self.profile = profile
        self.log = profile.parent / "chromium.log"
        args = [
            CHROMIUM,
            "--headless=new",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",               # the chosen port is written to DevToolsActivePort
            "--use-fake-ui-for-media-stream",           # grant the microphone without a prompt
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={audio_wav}",   # loops: the mic never goes silent
            "--autoplay-policy=no-user-gesture-required",
            "--allow-loopback-in-peer-connection",      # ICE may pair on 127.0.0.1 too
            "--disable-features=WebRtcHideLocalIpsWithMdns",   # plain host candidates: aioice gets real IPs
            "--no-sandbox",                             # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--password-store=basic",
            "--mute-audio",
            "about:blank",
        ]
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in close()
        # its own process group: close() ends the browser and every helper process it started
        self.proc = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def devtools_port(self, timeout: float = 20.0) -> int:
        path = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Chromium exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                first = path.read_text().splitlines()[0]
                return int(first)
            except (OSError, IndexError, ValueError):
                await asyncio.sleep(0.1)
        raise AssertionError(f"Chromium wrote no DevToolsActivePort in {timeout:g} s:\n{self.log_tail()}")

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
            else:   # the browser is gone: end helpers it may have left in its group
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            self._log_file.close()


class Cdp:
    """A minimal DevTools protocol client: commands by id, events collected in a list."""

    def __init__(self, ws):
        self.ws = ws
        self._next = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        import aiohttp

        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                future = self._pending.pop(data.get("id"), None)
                if future is None:
                    if "method" in data:
                        self.events.append(data)
                elif "error" in data:
                    future.set_exception(RuntimeError(f"DevTools error: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("the DevTools connection closed"))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        await self.ws.send_str(json.dumps({"id": self._next, "method": method, "params": params}))
        return await asyncio.wait_for(future, 15)

    async def evaluate(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (as a user gesture, promises awaited); returns its JSON value."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True, userGesture=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise AssertionError(f"page error evaluating {expression!r}: {text}")
        return result["result"].get("value")

    def page_exceptions(self) -> list[str]:
        return [e["params"]["exceptionDetails"].get("exception", {}).get("description", "?")
                for e in self.events if e["method"] == "Runtime.exceptionThrown"]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


PAGE_STATE = """JSON.stringify({state: window.edtalk && edtalk.state, status: document.getElementById('status')
    && document.getElementById('status').textContent, lastError: window.edtalk && edtalk.lastError,
    browser: window.edtalk && edtalk.browserStats, stats: window.edtalk && edtalk.lastStats})"""


async def wait_for(cdp: Cdp, expression: str, timeout: float, what: str) -> Any:
    """Poll ``expression`` in the page until it is truthy; on timeout fail with the page's state."""
    deadline = time.monotonic() + timeout
    while True:
        value = await cdp.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; page: "
                                 f"{await cdp.evaluate(PAGE_STATE)}")
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------- helpers


def _fake_mic_wav(path: Path, speech: np.ndarray, rate_in: int = 16000, rate: int = 48000) -> Path:
    """Speech as 48 kHz mono 16-bit PCM (what Chromium's fake capture device plays natively)."""
    import wave

    t = np.arange(int(len(speech) * rate / rate_in)) / rate
    x = np.interp(t, np.arange(len(speech)) / rate_in, speech)
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def _require_working_chromium() -> None:
    """Skip when the ``chromium`` found is only a stub (Ubuntu's snap wrapper without snapd)."""
    try:
        out = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"{CHROMIUM} does not run: {e}")
    if out.returncode != 0 or "chrom" not in out.stdout.lower():
        pytest.skip(f"{CHROMIUM} does not run: {(out.stdout + out.stderr).strip()[-300:]}")


def _free_port_check() -> None:
    """Fail early with a clear message when loopback TCP is unusable (sandboxed runners)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))


# ---------------------------------------------------------------------------------------- the test


def test_browser_page_streams_and_controls(tmp_path: Path, edtalk_weights: Path, face_image: Path,
                                           speech: np.ndarray) -> None:
    import aiohttp

    from edtalk_live.realtime.serve import build_server
    from edtalk_live.realtime.server import ServerSettings

    _require_working_chromium()
    _free_port_check()
    extra = {"align": False, "cache": False}          # the fixture image is already an aligned 64×64 crop
    server = build_server(edtalk_weights, face_image, backend="torch", device="cpu",
                          settings=ServerSettings(max_sessions=2), **extra)
    wav = _fake_mic_wav(tmp_path / "mic.wav", speech[: 6 * 16000])
    report: dict[str, Any] = {}

    async def drive(base: str, browser: Chromium) -> None:
        port = await browser.devtools_port()
        async with aiohttp.ClientSession() as http:
            async def health() -> dict:
                async with http.get(f"{base}/health") as r:
                    return await r.json()

            async with http.get(f"{base}/config") as r:
                config = await r.json()
            assert config["emotions"], "the edtalk fixture has emotion presets"
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            page = next(t for t in targets if t.get("type") == "page")
            ws = await http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            cdp = Cdp(ws)
            try:
                await cdp.call("Runtime.enable")
                await cdp.call("Page.enable")
                await cdp.call("Page.navigate", url=f"{base}/")

                # the page loads its config: dropdowns filled from /config, Start enabled
                await wait_for(cdp, "window.edtalk && edtalk.state === 'idle'", 10, "the page to load /config")
                options = await cdp.evaluate("[...document.querySelectorAll('#emotion option')].map(o => o.value)")
                assert options == ["", *config["emotions"]]
                assert await cdp.evaluate("document.getElementById('avatar-select').value") == config["avatars"][0]

                # Start: microphone, offer, answer, video frames decoded by the browser
                t0 = time.monotonic()
                await cdp.evaluate("document.getElementById('start').click()")
                await wait_for(cdp, "edtalk.state === 'connected'", 20, "the WebRTC connection")
                report["connect_s"] = time.monotonic() - t0
                await wait_for(cdp, f"edtalk.framesDecoded() > {FRAMES_WANTED}", 20, "decoded video frames")
                report["frames_s"] = time.monotonic() - t0
                assert await cdp.evaluate("edtalk.lastError") is None
                assert (await health())["sessions"] == 1

                # the stats panel: server latency and fps, browser-side decoding
                await wait_for(cdp, "edtalk.lastStats && edtalk.lastStats.latency_ms_p50 !== null "
                               "&& edtalk.lastStats.fps_sent !== undefined", 10, "server stats with a latency")
                panel = await cdp.evaluate(
                    "Object.fromEntries([...document.querySelectorAll('.stats dd')].map(d => [d.id, d.textContent]))")
                report["panel"] = panel
                for key in ("stat-latency-p50", "stat-latency-p95", "stat-av-offset", "stat-fps-sent",
                            "stat-frames-sent", "stat-frames-decoded", "stat-fps-received", "stat-resolution"):
                    assert panel[key] != "–", f"{key} is empty: {panel}"
                assert 0 < float(panel["stat-latency-p50"].split()[0]) < 3000
                assert float(panel["stat-fps-sent"]) > 10
                assert panel["stat-resolution"].startswith("64×64"), panel["stat-resolution"]
                assert int(panel["stat-frames-sent"]) > FRAMES_WANTED

                # an emotion chosen in the dropdown goes over the data channel and is acknowledged
                emotion = config["emotions"][0]
                await cdp.evaluate(f"""(() => {{ const s = document.getElementById('emotion');
                    s.value = {json.dumps(emotion)}; s.dispatchEvent(new Event('change')); }})()""")
                await wait_for(cdp, "edtalk.lastAck && edtalk.lastAck.type === 'ok' "
                               "&& edtalk.lastAck.for === 'emotion'", 5, "the emotion to be acknowledged")
                assert (await cdp.evaluate("edtalk.replies"))["error"] == 0
                assert await cdp.evaluate("edtalk.lastError") is None

                # the other controls send what the server expects, and the server applies it
                for what, action in [
                    ("intensity", "const s = document.getElementById('intensity'); s.value = '1.5'; "
                                  "s.dispatchEvent(new Event('input'));"),
                    ("pose", "const s = document.getElementById('pose'); s.value = 'still'; "
                             "s.dispatchEvent(new Event('change'));"),
                    ("pause", "document.getElementById('pause').click();"),
                    ("resume", "document.getElementById('pause').click();"),
                    ("interrupt", "document.getElementById('interrupt').click();"),
                ]:
                    await cdp.evaluate(f"(() => {{ {action} }})()")
                    await wait_for(cdp, f"edtalk.lastAck && edtalk.lastAck.for === '{what}'", 5,
                                   f"the {what} reply")
                    reply = await cdp.evaluate("edtalk.lastAck")
                    assert reply["type"] == "ok", reply
                    if what == "pause":
                        assert reply["stats"]["paused"] is True
                        assert await cdp.evaluate("document.getElementById('pause').textContent") == "Resume"
                    if what == "resume":
                        assert reply["stats"]["paused"] is False
                assert reply["stats"]["pose"] == "still"
                assert (await cdp.evaluate("edtalk.replies"))["error"] == 0
                # the delayed voice comes back to the browser as well
                assert (await cdp.evaluate("edtalk.browserStats.audioPackets || 0")) > 0

                # a data-channel error reply shows in the status line
                await cdp.evaluate("edtalk.sendControl({type: 'dance'})")
                await wait_for(cdp, "edtalk.lastError", 5, "the control error")
                status = await cdp.evaluate("document.getElementById('status').textContent")
                assert "unknown control message type 'dance'" in status, status

                # Stop: the peer connection is closed and the server reclaims the session
                frames_before_stop = await cdp.evaluate("edtalk.framesDecoded()")
                await cdp.evaluate("document.getElementById('start').click()")
                assert await cdp.evaluate("edtalk.state") == "idle"
                assert await cdp.evaluate("document.getElementById('avatar').srcObject") is None
                t_stop = time.monotonic()
                while (await health())["sessions"] != 0:
                    assert time.monotonic() - t_stop < 15, "the server kept the session after Stop"
                    await asyncio.sleep(0.2)
                report["reclaim_s"] = time.monotonic() - t_stop
                report["frames_decoded"] = frames_before_stop

                # an offer the server refuses (4xx): its error text shows in the status line
                await cdp.evaluate("""(() => { const s = document.getElementById('avatar-select');
                    s.append(new Option('nobody', 'nobody')); s.value = 'nobody'; })()""")
                await cdp.evaluate("document.getElementById('start').click()")
                await wait_for(cdp, "edtalk.state === 'failed'", 10, "the refused offer")
                status = await cdp.evaluate("document.getElementById('status').textContent")
                assert "(400)" in status and "unknown avatar 'nobody'" in status, status
                assert (await health())["sessions"] == 0

                # a session the server ends (inactivity, shutdown) shows as a failure on the page
                first_avatar = json.dumps(config["avatars"][0])
                await cdp.evaluate(f"document.getElementById('avatar-select').value = {first_avatar}")
                await cdp.evaluate("document.getElementById('start').click()")
                await wait_for(cdp, "edtalk.state === 'connected' && edtalk.framesDecoded() > 0", 20,
                               "the second connection")
                sid = await cdp.evaluate("edtalk.session")
                t_close = time.monotonic()
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                    server.close_peer(sid, "closed by the test"), runner.loop))
                await wait_for(cdp, "edtalk.state === 'failed'", 15, "the page to notice the closed session")
                report["server_close_noticed_s"] = time.monotonic() - t_close
                status = await cdp.evaluate("document.getElementById('status').textContent")
                report["server_close_status"] = status
                assert "closed" in status or "failed" in status, status
                assert await cdp.evaluate("document.getElementById('start').textContent") == "Start"

                assert cdp.page_exceptions() == [], cdp.page_exceptions()
            finally:
                await cdp.close()

    runner = ServerThread(server)
    browser: Chromium | None = None
    started = time.monotonic()
    try:
        base = runner.start()
        profile = tmp_path / "profile"
        profile.mkdir()
        browser = Chromium(profile, wav)
        try:
            asyncio.run(asyncio.wait_for(drive(base, browser), OVERALL_TIMEOUT))
        except TimeoutError:
            raise AssertionError(f"the browser test took more than {OVERALL_TIMEOUT:g} s:\n"
                                 f"{browser.log_tail()}") from None
    finally:
        if browser is not None:
            browser.close()
        runner.stop()
    report["total_s"] = time.monotonic() - started
    print(f"browser test: {json.dumps(report)}")
