"""``serve --workers N``: one address, N worker processes, each holding its own sessions.

The merge of the workers' metrics is checked on its own; then ``edtalk-live serve --workers 2`` is
started as a user starts it, sessions spread over both workers, one worker is killed while both stream,
and the supervisor is stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edtalk_live.realtime.metrics import MergedMetrics, SchedulerMetrics, ServerMetrics
from edtalk_live.realtime.workers import default_workers, resolve_workers

EXE = str(Path(sys.executable).with_name("edtalk-live"))
RATE = 16000
CUMULATIVE = ("_total", "_bucket", "_count", "_sum")


def _parse(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"{key} exported twice"
            samples[key] = s.value
    return samples


def _cumulative(samples: dict) -> dict:
    return {k: v for k, v in samples.items() if k[0].endswith(CUMULATIVE)}


# ------------------------------------------------------------------------------------------ units


def test_default_workers_is_one_per_two_cores_at_least_one_at_most_eight():
    assert [default_workers(c) for c in (1, 2, 3, 4, 7, 16, 17, 64)] == [1, 1, 1, 2, 3, 8, 8, 8]
    assert default_workers() >= 1
    assert resolve_workers(3) == 3 and resolve_workers(None) == default_workers()
    with pytest.raises(ValueError, match="--workers"):
        resolve_workers(0)


def _worker(sessions: int, started: int, sent: int, fps: float, offset: float) -> ServerMetrics:
    scheduler = SchedulerMetrics(4, queue_depth=lambda: 1, in_flight=lambda: 0)
    m = ServerMetrics(8, list, scheduler=scheduler)
    m.sessions.set(sessions)
    m.sessions_started.inc(started)
    m.sessions_rejected.labels("bad_request").inc()
    m.session_fps.set(fps)
    m.av_offset.set(offset)
    scheduler.batch(sent, 0.01, 0.01)
    return m


def test_merged_metrics_add_up_and_never_go_down_when_a_worker_dies():
    merged = MergedMetrics(max_sessions=6, workers=2)
    merged.update(0, _worker(3, 5, 40, 25.0, 0.01).exposition()[0].decode())
    merged.update(1, _worker(1, 2, 10, 21.0, 0.03).exposition()[0].decode())
    merged.sessions_rejected.labels("full").inc()
    first = _parse(merged.exposition()[0].decode())
    assert first[("edtalk_sessions", ())] == 4
    assert first[("edtalk_sessions_max", ())] == 6                     # the whole server's limit, not 8 + 8
    assert first[("edtalk_sessions_started_total", ())] == 7
    assert first[("edtalk_sessions_rejected_total", (("reason", "bad_request"),))] == 2
    assert first[("edtalk_sessions_rejected_total", (("reason", "full"),))] == 1    # the supervisor's own
    assert first[("edtalk_frames_rendered_total", ())] == 50
    assert first[("edtalk_render_batch_size_bucket", (("le", "+Inf"),))] == 2
    assert first[("edtalk_scheduler_queue_depth", ())] == 2
    assert first[("edtalk_av_offset_seconds", ())] == 0.03             # the largest
    assert first[("edtalk_session_fps", ())] == pytest.approx((3 * 25 + 21) / 4)    # weighted by sessions
    assert first[("edtalk_workers", ())] == 2
    assert not any(k[0].endswith("_created") for k in first)

    merged.retire(1)                   # worker 1 died: its gauges leave, its counts stay
    down = _parse(merged.exposition()[0].decode())
    assert down[("edtalk_sessions", ())] == 3 and down[("edtalk_av_offset_seconds", ())] == 0.01
    assert _cumulative(down) == _cumulative(first)
    merged.update(1, _worker(0, 1, 4, 0.0, 0.0).exposition()[0].decode())          # its replacement
    again = _parse(merged.exposition()[0].decode())
    assert again[("edtalk_sessions_started_total", ())] == 8 and again[("edtalk_frames_rendered_total", ())] == 54
    assert all(again[k] >= v for k, v in _cumulative(first).items())
    merged.retire(0)
    merged.retire(1)                   # none up: gauges read 0, counters keep everything
    none = _parse(merged.exposition()[0].decode())
    assert none[("edtalk_sessions", ())] == 0 and _cumulative(none) == _cumulative(again)


# ------------------------------------------------------------------------------------------ end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            children = {int(c) for t in os.listdir(f"/proc/{p}/task")
                        for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()}
        except OSError:
            continue
        out |= children
        todo += children
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class _Served:
    """``edtalk-live serve --workers 2`` as a user starts it, on a free port."""

    def __init__(self, weights: Path, photo: Path, log: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "EDTALK_LIVE_CACHE": str(log.parent / "cache")}
        self.proc = subprocess.Popen([EXE, "-v", "serve", "--workers", "2", "--weights", str(weights), "--avatar",
                                      str(photo), "--no-align", "--port", str(self.port), *extra],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    async def get(self, path: str) -> tuple[int, dict | str]:
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())

    async def health(self) -> tuple[int, dict]:
        return await self.get("/health")

    async def metrics(self) -> dict[tuple[str, tuple], float]:
        status, text = await self.get("/metrics")
        assert status == 200
        return _parse(text)

    async def until(self, predicate, timeout: float, what: str) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"serve exited: {self.tail()}"
            try:
                status, body = await self.health()
                if predicate(status, body):
                    return body
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {self.tail()}")

    def kill_all(self, known: set[int]) -> None:
        """Whatever is left of the server (after a failure), the supervisor last."""
        alive = self.proc.poll() is None
        for pid in (known | _descendants(self.proc.pid) if alive else known):
            if _running(pid) and b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes():   # still ours
                os.kill(pid, signal.SIGKILL)
        if alive:
            self.proc.kill()
        self.proc.wait(10)


def _sessions(body: dict) -> list[int]:
    return [w["sessions"] for w in body["workers"]]


@pytest.mark.slow
def test_two_workers_share_sessions_survive_a_killed_worker_and_stop_cleanly(tmp_path, edtalk_weights, face_image,
                                                                             speech):
    from edtalk_live.realtime.client import run_client

    served = _Served(edtalk_weights, face_image, tmp_path / "serve.log", "--max-sessions", "2")
    counters: list[dict] = []          # every counter and histogram sample, snapshot after snapshot

    async def snapshot() -> dict:
        m = await served.metrics()
        counters.append(_cumulative(m))
        return m

    async def scenario():
        up = await served.until(lambda s, b: s == 200, 90, "both workers up")
        assert [w["status"] for w in up["workers"]] == ["ok", "ok"] and up["max_sessions"] == 2
        pids = [w["pid"] for w in up["workers"]]
        status, config = await served.get("/config")          # proxied to a worker
        assert status == 200 and config["avatars"] == [face_image.stem]
        await snapshot()

        # A, then B: the least-loaded worker takes each, so one each
        a = asyncio.create_task(run_client(served.url, speech[: 7 * RATE], tail=0.2))
        body = await served.until(lambda s, b: sorted(_sessions(b)) == [0, 1], 30, "session A")
        worker_a = _sessions(body).index(1)
        b = asyncio.create_task(run_client(served.url, speech[: 6 * RATE], tail=0.2))
        await served.until(lambda s, b: _sessions(b) == [1, 1], 30, "session B on the other worker")
        worker_b = 1 - worker_a

        # the whole server is full: the supervisor answers 503 like the single server
        async with aiohttp.ClientSession() as http, http.post(
                served.url + "/offer", json={"type": "offer", "sdp": "v=0"}) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "5"
            assert (await r.json())["error"].startswith("server full: 2 of 2 sessions")

        await asyncio.sleep(2.5)                               # both streaming
        m = await snapshot()
        assert m[("edtalk_sessions", ())] == 2 and m[("edtalk_sessions_started_total", ())] == 2
        assert m[("edtalk_sessions_max", ())] == 2
        assert m[("edtalk_sessions_rejected_total", (("reason", "full"),))] == 1
        assert m[("edtalk_frames_sent_total", ())] > 50

        killed = time.time()
        os.kill(pids[worker_b], signal.SIGKILL)
        status, body = await served.health()
        deadline = time.monotonic() + 2
        while status == 200 and time.monotonic() < deadline:
            status, body = await served.health()
        assert status == 503 and body["status"] == "degraded"
        assert body["workers"][worker_b]["status"] in ("down", "starting")
        assert body["workers"][worker_a]["status"] == "ok" and body["workers"][worker_a]["sessions"] == 1
        m = await snapshot()
        assert m[("edtalk_sessions", ())] == 1 and m[("edtalk_sessions_started_total", ())] == 2

        result_a, result_b = await a, await b
        # B's session ended with its worker; A's went on streaming to its end
        assert result_b.video_frames > 10 and max(result_b.video_arrival) < killed + 1.0
        after = [t for t in result_a.video_arrival if t > killed + 0.5]
        assert max(result_a.video_arrival) > killed + 3.0
        assert len(after) > 0.6 * 25 * (max(result_a.video_arrival) - killed - 0.5), len(after)

        # the worker comes back, health is ok again, and new sessions go to it
        back = await served.until(lambda s, b: s == 200, 60, "the killed worker back")
        assert back["workers"][worker_b]["restarts"] == 1 and back["workers"][worker_b]["pid"] != pids[worker_b]
        assert back["workers"][worker_a]["pid"] == pids[worker_a]
        await served.until(lambda s, b: b["sessions"] == 0, 15, "session A to end")
        c = asyncio.create_task(run_client(served.url, speech[: int(1.5 * RATE)], tail=0.2))
        d = asyncio.create_task(run_client(served.url, speech[RATE: int(2.5 * RATE)], tail=0.2))
        await served.until(lambda s, b: _sessions(b) == [1, 1], 30, "C and D on both workers")
        await snapshot()
        for result in await asyncio.gather(c, d):
            assert result.video_frames > 10
        m = await snapshot()
        assert m[("edtalk_sessions_started_total", ())] == 4   # B's worker's count kept
        assert m[("edtalk_worker_restarts_total", ())] == 1

        for earlier, later in zip(counters, counters[1:], strict=False):
            decreased = {k: (v, later.get(k)) for k, v in earlier.items() if later.get(k, -1) < v}
            assert not decreased, decreased

    family: set[int] = set()
    try:
        asyncio.run(scenario())
        family = _descendants(served.proc.pid)
        assert len(family) >= 2                                # the workers (and multiprocessing's tracker)
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(30) == 0, served.tail()
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in family if _running(p)}
        assert not left, f"still running after the supervisor exited: {left}"
    finally:
        served.kill_all(family)
        print(served.tail())


@pytest.mark.slow
def test_ctrl_c_stops_the_supervisor_and_every_worker(tmp_path, edtalk_weights, face_image):
    served = _Served(edtalk_weights, face_image, tmp_path / "serve.log")
    family: set[int] = set()
    try:
        asyncio.run(served.until(lambda s, b: s == 200, 90, "both workers up"))
        family = _descendants(served.proc.pid)
        os.killpg(served.proc.pid, signal.SIGINT)              # a terminal's Ctrl-C reaches the whole group
        assert served.proc.wait(30) == 0, served.tail()
        assert not [p for p in family if _running(p)]
    finally:
        served.kill_all(family)


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_server_with_its_error(tmp_path, edtalk_weights):
    done = subprocess.run([EXE, "serve", "--workers", "2", "--weights", str(edtalk_weights), "--avatar",
                           str(tmp_path / "missing.png"), "--port", str(_free_port())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: worker 0 did not start: {tmp_path / 'missing.png'}: " \
                                                   "avatar image not found"


@pytest.mark.slow
def test_workers_check_tokens_and_hand_turn_credentials_only_to_token_holders(tmp_path, edtalk_weights, face_image,
                                                                            speech):
    """``serve --workers 2 --token-secret ... --turn-secret ...``: the supervisor refuses an offer without a
    token (401) and proxies ``/config`` with the caller's token, so only a token holder gets TURN credentials
    made for it; a session with a token streams through the supervisor."""
    import base64
    import hashlib
    import hmac

    from edtalk_live.realtime.access import make_token
    from edtalk_live.realtime.client import run_client

    secret, turn_secret = "a-token-secret-for-this-test-0123456789", "turn-secret-of-this-test"
    served = _Served(edtalk_weights, face_image, tmp_path / "serve.log", "--token-secret", secret,
                     "--ice-server", "turn:127.0.0.1:9", "--turn-secret", turn_secret)
    token = make_token(secret, 120)
    family: set[int] = set()

    async def scenario():
        await served.until(lambda s, b: s == 200, 90, "both workers up")
        family.update(_descendants(served.proc.pid))
        out = {}
        async with aiohttp.ClientSession() as http:
            for name, headers in (("anonymous", {}), ("token", {"Authorization": f"Bearer {token}"})):
                async with http.get(served.url + "/config", headers=headers) as r:
                    out[name] = (r.status, (await r.json())["ice_servers"])
            async with http.post(served.url + "/offer", json={"type": "offer", "sdp": "v=0"}) as r:
                out["offer"] = r.status
        out["session"] = await run_client(served.url, speech[: 2 * RATE], token=token, tail=0.2)
        return out

    try:
        out = asyncio.run(scenario())
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(30)
    finally:
        served.kill_all(family)
    assert out["anonymous"] == (200, []), out["anonymous"]
    status, servers = out["token"]
    assert status == 200 and [s["urls"] for s in servers] == ["turn:127.0.0.1:9"], servers
    made = servers[0]
    digest = hmac.new(turn_secret.encode(), made["username"].encode(), hashlib.sha1).digest()
    assert base64.b64decode(made["credential"]) == digest and int(made["username"].split(":")[0]) > time.time()
    assert out["offer"] == 401
    assert out["session"].video_frames >= 45, out["session"].video_frames
