"""A fleet of avatar workers behind LiveKit's agent dispatch, simulated on one machine without a LiveKit server.

    python -m edtalk_live.benchmarks.fleet --workers 4 --rooms 8 --step 3

LiveKit runs no avatar itself: every GPU machine runs a worker (LiveKit Agents' ``AgentServer``) that keeps a
WebSocket open to the LiveKit server's ``/agent`` endpoint, reports its load, and is offered jobs (one per room).
This module plays the server's side of that protocol (livekit-protocol's ``WorkerMessage``/``ServerMessage``) on a
loopback aiohttp WebSocket, as :class:`Dispatcher`:

- a worker connects (its bearer token is checked when the dispatcher is given the API secret) and sends a
  ``RegisterWorkerRequest`` (agent name, job type); the dispatcher answers a ``RegisterWorkerResponse`` with the
  worker's id;
- the worker sends an ``UpdateWorkerStatus`` every 2.5 s: its load (its ``load_fnc``, 0..1) and its status,
  ``WS_FULL`` once its load reaches its ``load_threshold`` (or while it drains), ``WS_AVAILABLE`` otherwise;
  ``UpdateJobStatus`` when a job starts and ends; ``WorkerPing`` (answered with a ``WorkerPong``);
- a new room is offered as LiveKit's server offers it (livekit-server ``pkg/service/agentservice.go``,
  ``selectWorkerWeightedByLoad`` and ``JobRequest``): among the workers of that agent name whose last status is
  ``WS_AVAILABLE``, one is drawn at random with weight ``max(0, 1 - load)``; it gets an ``AvailabilityRequest``;
  if it answers available, the job is sent to it in a ``JobAssignment``; if it declines, the draw is made again
  without it; when no weight is left the room gets no worker ("no workers with sufficient capacity").

The benchmark (:func:`main`) starts ``--workers`` worker processes, each a real ``AgentServer`` with an
:class:`~edtalk_live.realtime.engine.AvatarEngine` of its own (seeded random weights, ``--random test``: 64²) whose
``load_fnc`` is the engine's own load (the render thread's busy fraction over the last 5 s) and whose jobs run as
threads sharing that engine. It ramps rooms through the dispatcher: one more every ``--step`` seconds up to
``--rooms``, then holds ``--hold`` seconds. Every room's job opens one stream on its worker's engine and pushes
speech-like audio in real time (40 ms at a time, utterances of 4 s) for the rest of the run. Before each new room,
and at the end, one row: where the new room went and the load the dispatcher had for each worker then, the rooms on
every worker, each worker's last reported load and status, and over the step just ended the frames late (sent
again because the next was not ready, plus frame slots jumped over, over the frames due, as ``capacity.py``
counts them) and the frames per second of the streams. The table is Markdown on stdout; progress goes to stderr.

On a CPU the workers share the machine's cores, so one worker's rooms slow the others' renders: the absolute
capacity is tiny, and every worker's load rises with the total. The run shows how dispatch follows load; what
one GPU holds is ``capacity.py``'s and ``fps.py``'s question.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import logging
import os
import random
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

# the agent name the simulated avatar workers register with (explicit dispatch): the avatar worker's
from edtalk_live.integrations.livekit_avatar import AGENT_NAME

__all__ = ["AGENT_NAME", "Dispatch", "Dispatcher", "NoCapacity", "RegisteredWorker", "agent_server", "main",
           "weighted_pick"]

logger = logging.getLogger("edtalk_live.benchmarks.fleet")     # also when run as __main__

#: seconds a worker has to answer an availability request (livekit-server ``agent.AssignJobTimeout``)
ASSIGN_TIMEOUT = 10.0
#: a room's utterances: seconds of speech pushed in real time, then ``end()``
UTTERANCE_S = 4.0
#: speech is pushed this many samples at a time (40 ms at 16 kHz), in real time
PUSH_SAMPLES = 640
#: the simulation's API key and secret (the workers sign their tokens with them, the dispatcher checks them)
DEV_KEY, DEV_SECRET = "devkey", "fleet-simulation-secret-of-32-bytes"
#: the rooms end this long after the last row (so that it sees them all)
ROOM_TAIL_S = 2.0
#: seconds between two stats lines of a simulated worker
REPORT_S = 1.0


# ================================================================================================ the dispatcher


class NoCapacity(RuntimeError):
    """No available worker of the agent name has any capacity left (every one ``WS_FULL``, or at load 1)."""


@dataclass(eq=False)
class RegisteredWorker:
    """A worker as the dispatcher knows it: what it registered with and what it last reported."""

    id: str
    agent_name: str
    version: str
    ws: web.WebSocketResponse = field(repr=False)
    available: bool = True              # its last status: WS_AVAILABLE (True) or WS_FULL
    load: float = 0.0                   # its last reported load
    job_count: int = 0                  # its last reported number of jobs
    updates: int = 0                    # status updates received
    jobs: dict[str, int] = field(default_factory=dict)      # job id -> last JobStatus (JS_*)
    pending: dict[str, asyncio.Future] = field(default_factory=dict, repr=False)

    @property
    def running(self) -> list[str]:
        """The jobs assigned to it that have not ended (as it reported them)."""
        from livekit.protocol import agent

        ended = (agent.JobStatus.JS_SUCCESS, agent.JobStatus.JS_FAILED, agent.JobStatus.JS_CANCELLED)
        return [j for j, s in self.jobs.items() if s not in ended]


@dataclass
class Dispatch:
    """One room's dispatch: the worker that took it (None when none could), the loads the draw saw, and the
    workers that declined first."""

    room: str
    job_id: str
    worker: str | None
    loads: dict[str, float]             # worker id -> the load the dispatcher had when it drew
    declined: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0                # from the first availability request to the assignment (or the failure)


def weighted_pick(loads: dict[Any, float], rng: random.Random) -> Any:
    """One key of ``loads`` drawn with weight ``max(0, 1 - load)``, as livekit-server's
    ``selectWorkerWeightedByLoad`` draws among available workers; :class:`NoCapacity` when every weight is 0."""
    weights = {k: max(0.0, 1.0 - float(v)) for k, v in loads.items()}
    total = sum(weights.values())
    if total <= 0:
        raise NoCapacity("no workers with sufficient capacity")
    x = rng.random() * total
    for k, w in weights.items():
        x -= w
        if x <= 0 and w > 0:
            return k
    return next(k for k, w in reversed(weights.items()) if w > 0)


class Dispatcher:
    """LiveKit server's side of the agent protocol on ``/agent`` (see the module), for tests and the simulation.

    ``api_secret``: check each worker's bearer token (HS256, ``video.agent`` grant) with it; None: no check.
    ``rng``: the draws' random source (seed it for a reproducible run). Start with :meth:`start`, stop with
    :meth:`stop`; :meth:`dispatch` offers a room. Everything runs on the loop that started it.
    """

    def __init__(self, api_key: str | None = None, api_secret: str | None = None, rng: random.Random | None = None,
                 assign_timeout: float = ASSIGN_TIMEOUT):
        self.api_key = api_key
        self.api_secret = api_secret
        self.rng = rng or random.Random()
        self.assign_timeout = assign_timeout
        self.workers: dict[str, RegisteredWorker] = {}
        #: (monotonic time, worker id, "registered" | "full" | "available" | "gone", load): status changes
        self.events: list[tuple[float, str, str, float]] = []
        self.url = ""
        self._ids = itertools.count(1)
        self._jobs = itertools.count(1)
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------ life cycle
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: a free port); returns the URL workers connect to (``ws://host:port``)."""
        app = web.Application()
        app.router.add_get("/agent", self._agent)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]          # the port chosen when 0 was asked for
        self.url = f"ws://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        for w in list(self.workers.values()):
            await w.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ what the workers said
    def available(self, agent_name: str = AGENT_NAME) -> dict[RegisteredWorker, float]:
        """The workers of ``agent_name`` whose last status is available, with their last reported loads."""
        return {w: w.load for w in self.workers.values() if w.agent_name == agent_name and w.available}

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Wait until ``predicate()`` holds (checked after every message from a worker); TimeoutError."""
        async def wait() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def wait_workers(self, n: int, agent_name: str = AGENT_NAME, timeout: float = 60.0) -> None:
        """Wait until ``n`` workers of ``agent_name`` have registered and each has reported its status once."""
        await self.wait_for(lambda: sum(1 for w in self.workers.values()
                                        if w.agent_name == agent_name and w.updates > 0) >= n, timeout)

    # ------------------------------------------------------------ dispatch
    def pick(self, agent_name: str = AGENT_NAME, ignore: Sequence[RegisteredWorker] = ()) -> RegisteredWorker:
        """One available worker, drawn with weight ``1 - load`` (:func:`weighted_pick`); :class:`NoCapacity`."""
        loads = {w: load for w, load in self.available(agent_name).items() if w not in ignore}
        return weighted_pick(loads, self.rng)

    async def dispatch(self, room: str, agent_name: str = AGENT_NAME, metadata: str = "") -> Dispatch:
        """Offer a new room's job as LiveKit's server does (see the module). The returned :class:`Dispatch` names
        the worker that took it, or has ``error`` set (no capacity, or a worker that did not answer in time: the
        server does not try another one then)."""
        from livekit.protocol import agent, models

        job_id = f"AJ_{next(self._jobs)}"
        job = agent.Job(id=job_id, dispatch_id=f"AD_{job_id[3:]}", type=agent.JobType.JT_ROOM,
                        room=models.Room(sid=f"RM_{room}", name=room), agent_name=agent_name, metadata=metadata)
        loads = {w.id: w.load for w in self.available(agent_name)}
        out = Dispatch(room, job_id, None, loads)
        start = time.perf_counter()
        tried: list[RegisteredWorker] = []
        try:
            while True:
                worker = self.pick(agent_name, tried)
                tried.append(worker)
                answer = await self._ask(worker, job)
                if answer.terminate:
                    out.error = f"{worker.id} ended the job at once"
                    return out
                if not answer.available:
                    out.declined.append(worker.id)
                    continue
                token = self._agent_token(room, answer.participant_identity or f"agent-{job_id}")
                worker.jobs[job_id] = agent.JobStatus.JS_RUNNING
                await worker.ws.send_bytes(agent.ServerMessage(assignment=agent.JobAssignment(
                    job=job, url=self.url, token=token)).SerializeToString())
                out.worker = worker.id
                return out
        except NoCapacity as e:
            out.error = str(e)
            return out
        except (TimeoutError, ConnectionError) as e:
            out.error = f"{tried[-1].id}: {type(e).__name__}: {e}" if tried else str(e)
            return out
        finally:
            out.seconds = time.perf_counter() - start

    async def terminate(self, job_id: str) -> None:
        """Ask the worker running ``job_id`` to end it (``JobTermination``, as when its room is closed)."""
        from livekit.protocol import agent

        for w in self.workers.values():
            if job_id in w.jobs:
                await w.ws.send_bytes(agent.ServerMessage(
                    termination=agent.JobTermination(job_id=job_id)).SerializeToString())
                return

    async def _ask(self, worker: RegisteredWorker, job) -> Any:
        from livekit.protocol import agent

        answer = asyncio.get_running_loop().create_future()
        worker.pending[job.id] = answer
        try:
            await worker.ws.send_bytes(agent.ServerMessage(
                availability=agent.AvailabilityRequest(job=job)).SerializeToString())
            return await asyncio.wait_for(answer, self.assign_timeout)
        finally:
            worker.pending.pop(job.id, None)

    def _agent_token(self, room: str, identity: str) -> str:
        if not (self.api_key and self.api_secret):
            return ""
        from livekit import api

        return (api.AccessToken(self.api_key, self.api_secret).with_identity(identity).with_kind("agent")
                .with_grants(api.VideoGrants(room_join=True, room=room, agent=True)).to_jwt())

    # ------------------------------------------------------------ the worker's socket
    def _authorised(self, request: web.Request) -> bool:
        if not self.api_secret:
            return True
        from livekit import api

        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        try:
            claims = api.TokenVerifier(self.api_key or "", self.api_secret).verify(header[7:])
        except Exception:       # any bad token (signature, expiry, issuer) is a 401, as on the server
            return False
        return bool(claims.video and claims.video.agent)

    async def _agent(self, request: web.Request) -> web.StreamResponse:
        from livekit.protocol import agent, models

        if not self._authorised(request):
            raise web.HTTPUnauthorized(text="an agent token is needed")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        first = await ws.receive()
        if first.type != WSMsgType.BINARY:
            await ws.close()
            return ws
        msg = agent.WorkerMessage()
        msg.ParseFromString(first.data)
        if msg.WhichOneof("message") != "register":
            await ws.close()
            return ws
        reg = msg.register
        worker = RegisteredWorker(f"AW_{next(self._ids)}", reg.agent_name, reg.version, ws)
        info = models.ServerInfo(edition=models.ServerInfo.Edition.Standard, version="fleet-simulation",
                                 protocol=16, agent_protocol=1, region="loopback", node_id="fleet")
        await ws.send_bytes(agent.ServerMessage(register=agent.RegisterWorkerResponse(
            worker_id=worker.id, server_info=info)).SerializeToString())
        self.workers[worker.id] = worker
        self._event(worker, "registered")
        try:
            async for frame in ws:
                if frame.type != WSMsgType.BINARY:
                    continue
                msg = agent.WorkerMessage()
                msg.ParseFromString(frame.data)
                await self._handle(worker, msg)
                self._changed.set()
        finally:
            self.workers.pop(worker.id, None)
            for answer in worker.pending.values():
                if not answer.done():
                    answer.set_exception(ConnectionError("the worker's socket closed"))
            self._event(worker, "gone")
        return ws

    async def _handle(self, worker: RegisteredWorker, msg) -> None:
        from livekit.protocol import agent

        which = msg.WhichOneof("message")
        if which == "update_worker":
            update = msg.update_worker
            if update.HasField("status"):
                available = update.status == agent.WorkerStatus.WS_AVAILABLE
                if available != worker.available:
                    worker.available = available
                    worker.load = update.load
                    self._event(worker, "available" if available else "full")
            worker.load = update.load
            worker.job_count = update.job_count
            worker.updates += 1
        elif which == "availability":
            answer = worker.pending.get(msg.availability.job_id)
            if answer is not None and not answer.done():
                answer.set_result(msg.availability)
        elif which == "update_job":
            if msg.update_job.job_id in worker.jobs:
                worker.jobs[msg.update_job.job_id] = msg.update_job.status
        elif which == "ping":
            await worker.ws.send_bytes(agent.ServerMessage(pong=agent.WorkerPong(
                last_timestamp=msg.ping.timestamp, timestamp=int(time.time() * 1000))).SerializeToString())

    def _event(self, worker: RegisteredWorker, kind: str) -> None:
        self.events.append((time.monotonic(), worker.id, kind, worker.load))
        logger.debug("worker %s %s (load %.2f)", worker.id, kind, worker.load)


# ================================================================================================ the workers


def agent_server(url: str, load_fnc: Callable[[], float], entrypoint, *, agent_name: str = AGENT_NAME,
                 load_threshold: float = 0.8, idle_jobs: int = 1, api_key: str = DEV_KEY,
                 api_secret: str = DEV_SECRET):
    """A LiveKit Agents ``AgentServer`` as an avatar worker runs one (:func:`edtalk_live.integrations.livekit_worker.
    agent_server`), registering at ``url``, its HTTP health port a free one. Run it with ``await server.run()``;
    ``await server.aclose()``."""
    from edtalk_live.integrations.livekit_worker import WorkerSettings
    from edtalk_live.integrations.livekit_worker import agent_server as worker_agent_server

    settings = WorkerSettings(url=url, api_key=api_key, api_secret=api_secret, agent_name=agent_name,
                              load_threshold=load_threshold, http_port=0, idle_jobs=idle_jobs)
    return worker_agent_server(settings, load_fnc, entrypoint)


class AvatarJobs:
    """A simulated avatar worker's jobs: each room opens one stream on the shared engine and pushes speech-like
    audio in real time for ``seconds`` (the job's metadata, JSON), then ends its job; the streams' counters are
    kept (also after they close) for the stats lines."""

    def __init__(self, engine, audio):
        self.engine = engine
        self.audio = audio                  # float32 16 kHz speech-like audio, pushed in a loop
        self.streams: dict[str, Any] = {}   # job id -> open AvatarStream
        self.final: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    async def entrypoint(self, ctx) -> None:
        import numpy as np

        seconds = float(json.loads(ctx.job.metadata or "{}").get("seconds", 60.0))
        job_id = ctx.job.id
        loop = asyncio.get_running_loop()
        stream = await loop.run_in_executor(None, self.engine.open, {"pose": "still"})
        with self._lock:
            self.streams[job_id] = stream

        async def drain() -> None:            # what a LiveKit job would publish; read so nothing piles up
            async for _chunk in stream.chunks():
                pass

        reader = asyncio.ensure_future(drain())
        pcm = (np.clip(self.audio, -1, 1) * 32767).astype(np.int16)
        per_utterance = int(UTTERANCE_S * 16000) // PUSH_SAMPLES
        start = time.monotonic()
        try:
            for k in itertools.count():
                at = start + k * PUSH_SAMPLES / 16000
                if at - start >= seconds:
                    break
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                offset = (k * PUSH_SAMPLES) % (len(pcm) - PUSH_SAMPLES)
                stream.push(pcm[offset:offset + PUSH_SAMPLES], 16000)
                if (k + 1) % per_utterance == 0:
                    stream.end()
        finally:
            stats = await loop.run_in_executor(None, _counts, stream)
            with self._lock:
                self.final[job_id] = stats
                self.streams.pop(job_id, None)
            stream.close()
            await asyncio.wait_for(reader, 10)
            ctx.shutdown("the room ended")

    def report(self) -> dict[str, Any]:
        """The engine's load and every stream's counters (open and closed), as one stats line."""
        with self._lock:
            open_streams = dict(self.streams)
            counts = {job: dict(c) for job, c in self.final.items()}
        for job, stream in open_streams.items():
            with contextlib.suppress(Exception):        # closed meanwhile: its final counts come next time
                counts[job] = _counts(stream)
        return {"t": time.time(), "load": self.engine.load(), "open": sorted(open_streams), "jobs": counts}


def _counts(stream) -> dict[str, int]:
    s = stream.stats
    return {"sent": s["frames_sent"], "repeated": s["frames_repeated"], "skipped": s["frames_skipped"],
            "dropped": s["frames_dropped"]}


def _worker_main(args: argparse.Namespace) -> int:
    """One simulated avatar worker (a process of its own): an engine, an ``AgentServer`` whose load is the engine's,
    a stats line (JSON) on stdout every second."""
    from edtalk_live.benchmarks.latency import speech_like
    from edtalk_live.realtime.engine import AvatarEngine
    from edtalk_live.realtime.server import ServerSettings

    settings = ServerSettings(max_sessions=max(args.rooms, 1))
    engine = AvatarEngine.build(args.weights, args.avatar, backend=args.backend, settings=settings, align=False,
                                cache=False)
    engine.start()
    jobs = AvatarJobs(engine, speech_like(30.0, seed=args.seed))

    async def run() -> None:
        server = agent_server(args.worker, engine.load, jobs.entrypoint, load_threshold=args.load_threshold)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.aclose()))

        async def report() -> None:
            while True:
                line = await loop.run_in_executor(None, jobs.report)
                print(json.dumps({"worker": server.id, **line}), flush=True)
                await asyncio.sleep(REPORT_S)

        reporter = asyncio.ensure_future(report())
        try:
            await server.run()
        finally:
            reporter.cancel()

    try:
        asyncio.run(run())
    finally:
        engine.stop()
    return 0


# ================================================================================================ the simulation


@dataclass
class WorkerProcess:
    name: str
    proc: asyncio.subprocess.Process
    id: str = ""                              # its LiveKit worker id, from its stats lines
    last: dict[str, Any] = field(default_factory=dict)      # its latest stats line
    reader: asyncio.Task | None = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                self.id = data.get("worker") or self.id
                self.last = data


async def _spawn_worker(name: str, url: str, args: argparse.Namespace, weights: Path, avatar: Path,
                        log_dir: Path) -> WorkerProcess:
    cmd = [sys.executable, "-m", "edtalk_live.benchmarks.fleet", "--worker", url, "--weights", str(weights),
           "--avatar", str(avatar), "--backend", args.backend, "--load-threshold", str(args.load_threshold),
           "--rooms", str(args.rooms), "--seed", str(args.seed)]
    log = open(log_dir / f"{name}.log", "wb")       # noqa: SIM115 (closed with the process)
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=log)
    log.close()
    w = WorkerProcess(name, proc)
    w.reader = asyncio.ensure_future(w.read())
    return w


async def _registered(dispatcher: Dispatcher, n: int, workers: list[WorkerProcess], timeout: float, log_dir: Path
                      ) -> None:
    """Wait for ``n`` workers to register; a worker that exits or a timeout raises with the end of its log."""
    waiting = asyncio.ensure_future(dispatcher.wait_workers(n, timeout=timeout))
    exits = [asyncio.ensure_future(w.proc.wait()) for w in workers]
    try:
        await asyncio.wait([waiting, *exits], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for e in exits:
            e.cancel()
    if waiting.done() and not waiting.exception():
        return
    waiting.cancel()
    tails = []
    for w in workers:
        with contextlib.suppress(OSError):
            tails.append(f"--- {w.name} (exit {w.proc.returncode}):\n"
                         + "\n".join((log_dir / f"{w.name}.log").read_text(errors="replace").splitlines()[-15:]))
    raise RuntimeError(f"{n} worker(s) did not register:\n" + "\n".join(tails))


def _step_stats(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Frames due, late and the fps of the streams present in both stats lines of a worker (one step)."""
    dt_s = float(after.get("t", 0)) - float(before.get("t", 0))
    a_jobs, b_jobs = before.get("jobs", {}), after.get("jobs", {})
    due = late = 0
    fps: list[float] = []
    for job, b in b_jobs.items():
        a = a_jobs.get(job)
        if a is None or dt_s <= 0:
            continue
        sent = b["sent"] - a["sent"]
        skipped = b["skipped"] - a["skipped"]
        due += sent + skipped
        late += (b["repeated"] - a["repeated"]) + skipped
        if job in after.get("open", ()) and job in before.get("open", ()):     # open for the whole step
            fps.append(sent / dt_s)
    return {"due": due, "late": late, "fps": fps}


@dataclass
class Row:
    step: int
    t: float
    rooms: int
    placed: str                          # where the room dispatched after this row went ("" for the final row)
    per_worker: list[dict[str, Any]]     # rooms, load, available, late, due, fps, per worker (in worker order)
    late: int = 0
    due: int = 0
    fps: list[float] = field(default_factory=list)


def _snapshot(dispatcher: Dispatcher, workers: list[WorkerProcess], previous: dict[str, dict[str, Any]]
              ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    per: list[dict[str, Any]] = []
    now: dict[str, dict[str, Any]] = {}
    for w in workers:
        reg = dispatcher.workers.get(w.id)
        stats = _step_stats(previous.get(w.name, {}), w.last)
        per.append({"name": w.name, "rooms": len(reg.running) if reg else 0, "load": reg.load if reg else None,
                    "available": reg.available if reg else False, "engine_load": w.last.get("load"), **stats})
        now[w.name] = w.last
    return per, now


def _row(step: int, t: float, per: list[dict[str, Any]], placed: str) -> Row:
    return Row(step, t, sum(p["rooms"] for p in per), placed, per, late=sum(p["late"] for p in per),
               due=sum(p["due"] for p in per), fps=[f for p in per for f in p["fps"]])


def _fmt_loads(per: list[dict[str, Any]]) -> str:
    return " / ".join("—" if p["load"] is None else f"{p['load']:.2f}" for p in per)


def format_table(rows: Sequence[Row], names: Sequence[str]) -> str:
    head = ["step", "t (s)", "rooms", f"rooms per worker ({' / '.join(names)})", "reported load per worker", "FULL",
            "frames late since the last row", "fps per stream (median / min)", "next room → worker (its chance)"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---:"] * 3 + ["---"] * 3 + ["---:"] * 2 + ["---"]) + "|"]
    for r in rows:
        full = ", ".join(p["name"] for p in r.per_worker if not p["available"]) or "—"
        late = "—" if not r.due else f"{100 * r.late / r.due:.1f} %"
        fps = "—" if not r.fps else f"{statistics.median(r.fps):.1f} / {min(r.fps):.1f}"
        lines.append("| " + " | ".join([
            str(r.step), f"{r.t:.0f}", str(r.rooms), " / ".join(str(p["rooms"]) for p in r.per_worker),
            _fmt_loads(r.per_worker), full, late, fps, r.placed or "— (end)"]) + " |")
    return "\n".join(lines)


def _chance(d: Dispatch, worker: str) -> float:
    """The chance the draw gave ``worker`` (its weight over the sum, among the workers available then)."""
    weights = {k: max(0.0, 1.0 - v) for k, v in d.loads.items()}
    total = sum(weights.values())
    return weights.get(worker, 0.0) / total if total else 0.0


async def _simulate(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from edtalk_live.benchmarks.latency import write_random_weights

    weights, avatar = write_random_weights(tmp / "weights", args.random, seed=args.seed)
    dispatcher = Dispatcher(api_key=DEV_KEY, api_secret=DEV_SECRET, rng=random.Random(args.seed))
    url = await dispatcher.start()
    workers: list[WorkerProcess] = []
    rows: list[Row] = []
    dispatches: list[Dispatch] = []
    t0 = time.monotonic()
    try:
        # the first worker alone (a backend that exports graphs fills the cache once), then the others together
        workers.append(await _spawn_worker("w0", url, args, weights, avatar, tmp))
        await _registered(dispatcher, 1, workers, args.start_timeout, tmp)
        for k in range(1, args.workers):
            workers.append(await _spawn_worker(f"w{k}", url, args, weights, avatar, tmp))
        await _registered(dispatcher, args.workers, workers, args.start_timeout, tmp)
        await dispatcher.wait_for(lambda: all(w.id in dispatcher.workers and w.last for w in workers), timeout=30)
        logger.info("%d workers registered: %s", args.workers, ", ".join(w.id for w in workers))
        await asyncio.sleep(args.settle)
        names = [w.name for w in workers]
        by_id = {w.id: w.name for w in workers}
        end_at = args.rooms * args.step + args.hold
        t0 = time.monotonic()
        previous: dict[str, dict[str, Any]] = {}
        for step in range(args.rooms + 1):
            per, previous = _snapshot(dispatcher, workers, previous)
            placed = ""
            if step < args.rooms:
                seconds = end_at + ROOM_TAIL_S - (time.monotonic() - t0)       # still there at the last row
                d = await dispatcher.dispatch(f"room-{step + 1}", metadata=json.dumps({"seconds": seconds}))
                dispatches.append(d)
                placed = (f"{by_id.get(d.worker, d.worker)} ({_chance(d, d.worker):.2f})" if d.worker
                          else f"none: {d.error}")
                if d.declined:
                    placed += f"; declined by {', '.join(by_id.get(x, x) for x in d.declined)}"
                logger.info("room %d -> %s", step + 1, placed)
            rows.append(_row(step, time.monotonic() - t0, per, placed))
            wait = (step + 1) * args.step - (time.monotonic() - t0) if step < args.rooms else args.hold
            await asyncio.sleep(max(0.0, wait))
        per, previous = _snapshot(dispatcher, workers, previous)
        rows.append(_row(args.rooms + 1, time.monotonic() - t0, per, ""))
        # every room ends by itself (its lifetime); wait for the jobs to report it
        with contextlib.suppress(TimeoutError):
            await dispatcher.wait_for(lambda: not any(w.running for w in dispatcher.workers.values()), timeout=20)
        totals = {w.name: w.last.get("jobs", {}) for w in workers}
        events = [(t - t0, by_id.get(wid, wid), kind, load) for t, wid, kind, load in dispatcher.events
                  if kind in ("full", "available") and t >= t0]
        return {"rows": rows, "names": names, "dispatches": dispatches, "totals": totals, "events": events,
                "ids": by_id}
    finally:
        for w in workers:
            if w.proc.returncode is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                await asyncio.wait_for(w.proc.wait(), 30)
            except TimeoutError:
                w.proc.kill()
                await w.proc.wait()
            if w.reader is not None:
                w.reader.cancel()
        await dispatcher.stop()


def summary(result: dict[str, Any]) -> list[str]:
    """The run in a few lines: rooms and frames late per worker, FULL transitions, dispatch times."""
    rows: list[Row] = result["rows"]
    out = []
    for p in rows[-1].per_worker:
        jobs = result["totals"].get(p["name"], {})
        sent = sum(j["sent"] for j in jobs.values())
        skipped = sum(j["skipped"] for j in jobs.values())
        late = sum(j["repeated"] for j in jobs.values()) + skipped
        due = sent + skipped
        out.append(f"- {p['name']}: {len(jobs)} room(s); frames late over the whole run "
                   f"{late} of {due} ({100 * late / due:.1f} %)" if due else f"- {p['name']}: no room")
    spread = [max(p["load"] for p in r.per_worker if p["load"] is not None)
              - min(p["load"] for p in r.per_worker if p["load"] is not None) for r in rows[1:]]
    if spread:
        out.append(f"- spread of the reported loads (max − min) per row: median {statistics.median(spread):.2f}, "
                   f"max {max(spread):.2f}; at the end {spread[-1]:.2f} ({_fmt_loads(rows[-1].per_worker)})")
    ds: list[Dispatch] = result["dispatches"]
    placed = [d for d in ds if d.worker]
    if placed:
        ms = sorted(1000 * d.seconds for d in placed)
        out.append(f"- rooms placed {len(placed)} of {len(ds)}; declined offers {sum(len(d.declined) for d in ds)}; "
                   f"dispatch (availability request → assignment) median {statistics.median(ms):.1f} ms, "
                   f"max {ms[-1]:.1f} ms")
        lowest = sum(1 for d in placed if d.loads and d.loads[d.worker] == min(d.loads.values()))
        out.append(f"- {lowest} of {len(placed)} rooms went to the worker with the lowest load the dispatcher had")
    events = result["events"]
    if events:
        out.append("- status changes: " + "; ".join(f"{name} {kind.upper()} at {t:.0f} s (load {load:.2f})"
                                                    for t, name, kind, load in events))
    else:
        out.append("- no worker reported FULL")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edtalk_live.benchmarks.fleet",
                                description="A fleet of avatar workers behind a simulated LiveKit dispatcher: "
                                            "rooms ramped onto them by load.")
    p.add_argument("--workers", type=int, default=4, help="worker processes, each with its own engine (4)")
    p.add_argument("--rooms", type=int, default=8, help="rooms at the top of the ramp (8)")
    p.add_argument("--step", type=float, default=3.0, help="seconds between two new rooms (3)")
    p.add_argument("--hold", type=float, default=6.0, help="seconds at the top of the ramp before the end (6)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after every worker registered (3)")
    p.add_argument("--load-threshold", type=float, default=0.8,
                   help="each worker reports FULL from this load on (its LiveKit load_threshold; 0.8)")
    p.add_argument("--random", default="test", help="model config of the seeded random weights (test: 64²)")
    p.add_argument("--backend", default="onnxruntime", help="the engines' backend (onnxruntime)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the audio and the draws (0)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the workers to register (300)")
    p.add_argument("--json", metavar="OUT", help="also write the rows and dispatches here")
    # one worker process (started by the benchmark itself)
    p.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--avatar", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulation; print the table on stdout. Returns 0, or 1 when a room found no worker."""
    from edtalk_live.benchmarks.latency import machine_line

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.worker:
        return _worker_main(args)
    logging.getLogger("edtalk_live.benchmarks").setLevel(logging.INFO)
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="edtalk-fleet-") as tmp:
        result = asyncio.run(_simulate(args, Path(tmp)))
    end_load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = shlex.join(["python", "-m", "edtalk_live.benchmarks.fleet", *(sys.argv[1:] if argv is None else argv)])
    print(f"Machine: {machine_line()}; load average {load} at the start, {end_load} at the end; {date}")
    print(f"Workers: {args.workers} processes, each an AgentServer (livekit-agents, jobs as threads) with its own "
          f"engine ({args.backend}, `{args.random}` config, seeded random weights), load_fnc = the engine's load, "
          f"load_threshold {args.load_threshold:g}; rooms: one more every {args.step:g} s up to {args.rooms}, then "
          f"{args.hold:g} s held; each room one stream pushed speech-like audio in real time")
    print(f"Command: `{command}`\n")
    print(format_table(result["rows"], result["names"]))
    print()
    print("\n".join(summary(result)))
    if args.json:
        rows = [{"step": r.step, "t": r.t, "rooms": r.rooms, "placed": r.placed, "late": r.late, "due": r.due,
                 "fps": r.fps, "workers": r.per_worker} for r in result["rows"]]
        ds = [vars(d) for d in result["dispatches"]]
        Path(args.json).write_text(json.dumps({"command": command, "date": date, "rows": rows, "dispatches": ds,
                                               "events": result["events"], "ids": result["ids"]}, indent=1))
    return 0 if all(d.worker for d in result["dispatches"]) else 1


if __name__ == "__main__":
    sys.exit(main())
