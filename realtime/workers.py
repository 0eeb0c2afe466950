"""``edtalk-live serve --workers N``: N worker processes behind one address.

One Python process is one core, and a session's media (Opus, VP8, SRTP) costs about a tenth of one,
so a box serves many sessions with several processes. The design:

* **A supervisor owns the public port** (this module; it loads no model and renders nothing). Its
  aiohttp front proxies signaling to the workers: ``POST /offer`` goes to the least-loaded worker
  that is up (fewest live sessions plus offers in flight; ties to the lowest index), ``GET /``, the
  static files and ``/config`` to any worker that is up. ``/health`` and ``/metrics`` it answers
  itself, from the workers' (:class:`~edtalk_live.realtime.metrics.MergedMetrics`).
* **Each session lives in one worker**: its offer is answered there, and its peer connection and
  UDP media belong to that worker (the answer's ICE candidates are the worker's own ports), so only
  signaling passes through the supervisor, never media. The answer says which worker took the
  session (``"worker": i``).
* **Workers are child processes started with ``spawn``** (not fork: torch and its threads), each
  building its server with :func:`edtalk_live.realtime.serve.server_from_args` (the model, the engines
  and the avatars: the same code as a single ``serve``) on a private loopback port it picks itself
  and reports on a pipe when it is listening. On a GPU they share it, with one CUDA context each.
  Worker 0 starts first and the others once it is up, so the on-disk caches (avatars, ONNX exports,
  TensorRT engines) are written by one process and read by the rest.
* **WHIP and WHEP** (:mod:`edtalk_live.realtime.whip`) reach the worker that holds what they name: a
  resource URL (PATCH, DELETE) by the worker index its id starts with (``/whep/x/1-...`` is worker 1's); a
  stream or session by the worker remembered for it from the answer that made it (the last
  :data:`ROUTES_KEPT`); a new stream or an avatar to the least-loaded worker; a WHEP target the supervisor
  does not know to each worker in turn until one does not answer 404. A stream's media and its viewers'
  are on that worker, so every viewer of a stream is on its publisher's worker.
* **The session limit is the whole server's**: the supervisor answers 503 (the single server's JSON
  error) when the workers' live sessions plus the offers in flight reach ``--max-sessions``, or when
  no worker is up (both counted as ``edtalk_sessions_rejected_total{reason="full"}``). Live sessions
  are read from each worker's ``/health`` every second (a session that ended frees its place within a
  second); an offer a worker accepts counts at once. Each worker's own limit is the whole limit too,
  so the workers that are up can absorb the sessions of one that is down.
* **A worker that dies is restarted** with a backoff (1 s, doubling to 30 s; back to 1 s once one ran
  a minute); a worker whose event loop stops answering ``/health`` for 15 s is killed and restarted.
  Only its own sessions end. ``/health`` says ``degraded`` (503) while a worker is not up. Counters
  stay monotonic: the last values read from a dead worker are kept (metrics are read every 2 s and
  on each ``/metrics``). A worker that fails before it was ever up is a configuration error: the
  supervisor stops and reports the worker's error.
* **Stopping**: SIGINT (Ctrl-C) or SIGTERM stops the supervisor, which closes its port, sends SIGTERM
  to every worker (each closes its sessions and exits), waits, kills what is left and reaps them.
  Workers ignore SIGINT (a terminal sends it to the whole process group; the supervisor decides) and
  exit by themselves when the supervisor's process goes away, even killed (its pipe closes).

Why not ``SO_REUSEPORT`` (every worker listening on the public port, the kernel spreading
connections): the kernel balances TCP connections, not sessions, so one worker can be full while
another is idle, the session limit cannot be the whole server's without a shared counter, and
``/health`` and ``/metrics`` would answer for whichever worker a connection lands on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.realtime.access import OfferGate, cors_middleware, secret_from_args
from edtalk_live.realtime.metrics import MergedMetrics

logger = logging.getLogger(__name__)

#: the default number of workers is one per this many CPU cores the process may run on
CORES_PER_WORKER = 2
#: ... and at most this many (each holds a model, and a CUDA context on a GPU)
MAX_DEFAULT_WORKERS = 8
#: restart backoff: first delay, largest delay (seconds); a worker up this long resets it
BACKOFF_FIRST_S, BACKOFF_MAX_S, BACKOFF_RESET_S = 1.0, 30.0, 60.0
#: how often the supervisor reads each worker's /health and /metrics (seconds)
HEALTH_EVERY_S, METRICS_EVERY_S = 1.0, 2.0
#: a worker that has not answered /health for this long is killed (and restarted)
HUNG_AFTER_S = 15.0
#: how long stopping waits for the workers to close their sessions before killing them
STOP_TIMEOUT_S = 15.0
#: the largest offer before a worker has said its own limit (ServerSettings.max_offer_bytes)
DEFAULT_MAX_OFFER_BYTES = 64 * 1024
#: response headers not passed on by the proxy (hop-by-hop, or recomputed)
_HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade",
                          "proxy-authenticate", "proxy-authorization", "te", "trailer", "server", "date"})
#: request headers passed on to a worker
_FORWARDED = ("Accept", "Accept-Encoding", "Authorization", "Content-Type", "If-Match", "If-Modified-Since",
              "If-None-Match", "Range")
#: WHIP stream names and session ids whose worker the supervisor remembers (the oldest are forgotten past this)
ROUTES_KEPT = 10_000
#: what a session id looks like (a WHEP URL naming one watches a session, it makes none)
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


def default_workers(cores: int | None = None) -> int:
    """One worker per :data:`CORES_PER_WORKER` cores this process may run on (``os.sched_getaffinity``),
    at least 1, at most :data:`MAX_DEFAULT_WORKERS`."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:          # not Linux
            cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores // CORES_PER_WORKER))


def resolve_workers(workers: int | None) -> int:
    """``--workers``: the number given (>= 1), or :func:`default_workers` when none."""
    if workers is None:
        return default_workers()
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    return workers


# ------------------------------------------------------------------------------------------ worker side


def worker_main(args, index: int, conn, log_level: int) -> None:
    """A worker process (the target of a ``spawn`` process): build the server, serve it on a private port.

    Sends ``("ready", info)`` on ``conn`` once listening, or ``("error", message)`` when the server
    cannot be built (bad weights, bad avatar, ...). Runs until SIGTERM or until the supervisor's
    process ends.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=f"%(levelname)s worker {index} %(name)s: %(message)s",
                        stream=sys.stderr)
    if log_level > logging.INFO:
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    from edtalk_live.realtime.serve import server_from_args  # torch and the model: in the worker only

    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = server_from_args(args, host="127.0.0.1", port=sock.getsockname()[1], behind_supervisor=True)
        server.whip.worker = index      # WHIP/WHEP resource ids start with it: the supervisor routes by them
    except (EDTalkError, OSError) as e:
        conn.send(("error", " ".join(str(e).split())))
        conn.close()
        raise SystemExit(1) from None
    asyncio.run(_serve_worker(server, sock, conn))


async def _serve_worker(server, sock: socket.socket, conn) -> None:
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None)   # the supervisor logs requests
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        parent = multiprocessing.parent_process()
        if parent is not None:          # its end of the spawn pipe closes when the supervisor's process ends

            def orphaned() -> None:
                loop.remove_reader(parent.sentinel)
                logger.warning("the supervisor is gone: stopping")
                stop.set()

            loop.add_reader(parent.sentinel, orphaned)
        conn.send(("ready", {"port": sock.getsockname()[1], "pid": os.getpid(),
                             "backend": server.renderer.describe(),
                             "max_offer_bytes": server.settings.max_offer_bytes}))
        conn.close()
        await stop.wait()
    finally:
        await runner.cleanup()          # closes every session of this worker


# ------------------------------------------------------------------------------------------ supervisor


@dataclass
class _Worker:
    """What the supervisor knows of one worker slot (its processes come and go)."""

    index: int
    process: Any = None
    port: int | None = None
    state: str = "starting"         # starting | ok | degraded (its /health says so) | down
    sessions: int = 0               # live sessions: its /health, plus the offers it accepted since
    pending: int = 0                # offers being proxied to it now
    epoch: int = 0                  # bumped when it accepts an offer: a /health read begun before is stale
    restarts: int = 0
    generation: int = 0             # bumped for each process started: metrics read from an older one are dropped
    ever_up: bool = False
    last_answer: float = 0.0        # time.monotonic() of its last /health answer
    poller: asyncio.Task | None = field(default=None, repr=False)

    @property
    def load(self) -> int:
        return self.sessions + self.pending


class Supervisor:
    """Starts, watches and restarts the workers; serves the public port."""

    def __init__(self, args, workers: int, log_level: int = logging.WARNING):
        self.args = args
        self.host, self.port = args.host, args.port
        self.max_sessions = args.max_sessions
        if self.max_sessions < 1:
            raise InputError(f"max_sessions must be >= 1, got {self.max_sessions}")
        self.log_level = log_level
        self.workers = [_Worker(i) for i in range(workers)]
        self.metrics = MergedMetrics(self.max_sessions, workers)
        self.metrics.workers_up.set_function(lambda: sum(w.state == "ok" for w in self.workers))
        # the offer rate per client address and the token check: here, where the clients' addresses are seen
        # (the workers check the token again)
        self.gate = OfferGate(secret_from_args(args), args.offer_rate or None, args.offer_burst,
                              on_reject=lambda reason: self.metrics.sessions_rejected.labels(reason).inc())
        self.cors_origins = tuple(args.cors_origin or ())
        self.backend = ""
        self.max_offer_bytes = DEFAULT_MAX_OFFER_BYTES
        self.started = time.time()
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = asyncio.Event()
        self._failure: str | None = None
        self._http: aiohttp.ClientSession | None = None
        self._first_up = asyncio.Event()
        # which worker holds a WHIP stream (by name) or a session (by id): WHIP/WHEP requests naming them go there
        self._owners: collections.OrderedDict[str, int] = collections.OrderedDict()

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        self._http = aiohttp.ClientSession(auto_decompress=False)
        runner = web.AppRunner(self.app())
        keepers: list[asyncio.Task] = []
        try:
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port).start()
            keepers.append(asyncio.create_task(self._keep(self.workers[0]), name="worker-0-keeper"))
            first = asyncio.create_task(self._first_up.wait())
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([first, stop], return_when=asyncio.FIRST_COMPLETED)
            first.cancel()
            if not self._stop.is_set():
                keepers += [asyncio.create_task(self._keep(w), name=f"worker-{w.index}-keeper")
                            for w in self.workers[1:]]
                print(f"serving on http://{self.host}:{self.port}/ with {len(self.workers)} workers "
                      "(open it in a browser; Ctrl-C stops)", flush=True)
            await stop
        finally:
            self._stop.set()
            await runner.cleanup()
            await self._stop_workers(keepers)
            await self._http.close()
        if self._failure is not None:
            raise InputError(self._failure)
        return 0

    async def _keep(self, w: _Worker) -> None:
        """Run worker ``w``, and again whenever it ends, until the supervisor stops."""
        delay = BACKOFF_FIRST_S
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                why = await self._run_worker(w)
            except Exception:  # noqa: BLE001 - a supervisor bug must not leave the slot empty for good
                logger.exception("worker %d: supervising failed", w.index)
                why = "supervisor error"
                if w.process is not None and w.process.pid is not None and w.process.exitcode is None:
                    w.process.kill()            # never two processes for one slot
                    w.process.join()
            if self._stop.is_set():
                return
            if not w.ever_up:
                self._failure = f"worker {w.index} did not start: {why}"
                self._stop.set()
                return
            if time.monotonic() - began > BACKOFF_RESET_S:
                delay = BACKOFF_FIRST_S
            logger.warning("worker %d %s; restarting in %g s", w.index, why, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
            if not self._stop.is_set():
                w.restarts += 1
                self.metrics.worker_restarts.inc()

    async def _run_worker(self, w: _Worker) -> str:
        """Start one process for ``w`` and watch it until it ends; returns why it ended."""
        receive, send = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=worker_main, args=(self.args, w.index, send, self.log_level),
                                    name=f"edtalk-live-worker-{w.index}")
        w.state, w.process = "starting", process
        w.generation += 1
        try:
            process.start()
        finally:
            send.close()
        try:
            message = await self._first_message(receive, process)
            if message is None or message[0] != "ready":
                await _readable(process.sentinel)
                process.join()
                if message is not None:
                    return message[1]
                return f"exited with code {process.exitcode} before it was ready (see its log above)"
            info = message[1]
            w.port, w.sessions, w.last_answer = info["port"], 0, time.monotonic()
            w.state, w.ever_up = "ok", True
            self.backend = info["backend"]
            self.max_offer_bytes = info["max_offer_bytes"]
            logger.info("worker %d: up (pid %d, port %d)", w.index, process.pid, w.port)
            self._first_up.set()
            w.poller = asyncio.create_task(self._poll(w), name=f"worker-{w.index}-poller")
            await _readable(process.sentinel)
            process.join()
            return f"(pid {process.pid}) exited with code {process.exitcode}"
        finally:
            receive.close()
            if w.poller is not None:
                w.poller.cancel()
                await asyncio.gather(w.poller, return_exceptions=True)
                w.poller = None
            self.metrics.retire(w.index)
            w.state, w.port, w.sessions = "down", None, 0

    async def _first_message(self, conn, process) -> tuple | None:
        """The worker's first message on its pipe (``None``: it ended without one)."""
        waits = [asyncio.ensure_future(_readable(conn.fileno())), asyncio.ensure_future(_readable(process.sentinel))]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
            await asyncio.gather(*waits, return_exceptions=True)    # their readers are removed before we go on
        if not conn.poll():
            return None
        try:
            return conn.recv()
        except (EOFError, OSError):
            return None

    async def _poll(self, w: _Worker) -> None:
        """Read ``w``'s /health every second (its sessions and state) and its /metrics every two."""
        metrics_due = 0.0
        while True:
            await asyncio.sleep(HEALTH_EVERY_S)
            epoch = w.epoch
            try:
                async with self._http.get(self._url(w, "/health"),
                                          timeout=aiohttp.ClientTimeout(total=HEALTH_EVERY_S * 2)) as r:
                    body = await r.json(content_type=None)
                w.last_answer = time.monotonic()
                w.state = "ok" if r.status == 200 else "degraded"
                if epoch == w.epoch:
                    w.sessions = int(body.get("sessions", w.sessions))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                if time.monotonic() - w.last_answer > HUNG_AFTER_S and w.process.is_alive():
                    logger.error("worker %d (pid %d) has not answered for %g s: killing it", w.index,
                                 w.process.pid, HUNG_AFTER_S)
                    w.process.kill()
                    return
            if time.monotonic() >= metrics_due:
                metrics_due = time.monotonic() + METRICS_EVERY_S
                await self._read_metrics(w)

    async def _read_metrics(self, w: _Worker) -> None:
        generation = w.generation
        try:
            async with self._http.get(self._url(w, "/metrics"), timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return
        if r.status == 200 and w.generation == generation and w.port is not None:   # still the same process
            self.metrics.update(w.index, text)

    async def _stop_workers(self, keepers: list[asyncio.Task]) -> None:
        """SIGTERM every worker, give them :data:`STOP_TIMEOUT_S` to close their sessions, kill the rest.

        Each keeper returns once its process has ended and been reaped (the stop flag is set).
        """
        alive = [w.process for w in self.workers
                 if w.process is not None and w.process.pid is not None and w.process.exitcode is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        if keepers:
            _, late = await asyncio.wait(keepers, timeout=STOP_TIMEOUT_S)
            if late:
                for p in alive:
                    if p.exitcode is None:
                        logger.warning("%s (pid %d) did not stop in %g s: killing it", p.name, p.pid,
                                       STOP_TIMEOUT_S)
                        p.kill()
                await asyncio.wait(late, timeout=5.0)
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        for p in alive:                 # reaped by their keepers; this only guards a keeper that failed
            p.join(timeout=5.0)
            if p.exitcode is None:
                p.kill()
                p.join()

    # ------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(middlewares=[cors_middleware(self.cors_origins)] if self.cors_origins else [])
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_post("/offer", self.offer)
        app.router.add_route("*", "/whip/{path:.*}", self.whip)
        app.router.add_route("*", "/whep/{path:.*}", self.whip)
        app.router.add_get("/sessions/{session}/speech", self.speech)
        app.router.add_get("/{tail:.*}", self.proxy)
        return app

    def _url(self, w: _Worker, path: str) -> str:
        return f"http://127.0.0.1:{w.port}{path}"

    def _up(self) -> list[_Worker]:
        """The workers that are up, least loaded first."""
        return sorted((w for w in self.workers if w.state == "ok"), key=lambda w: (w.load, w.index))

    async def health(self, _request: web.Request) -> web.Response:
        ok = all(w.state == "ok" for w in self.workers)
        workers = [{"worker": w.index, "status": w.state, "pid": w.process.pid if w.process is not None else None,
                    "sessions": w.sessions, "restarts": w.restarts} for w in self.workers]
        return web.json_response({"status": "ok" if ok else "degraded",
                                  "sessions": sum(w.sessions for w in self.workers),
                                  "max_sessions": self.max_sessions, "backend": self.backend,
                                  "uptime_s": round(time.time() - self.started, 1), "workers": workers},
                                 status=200 if ok else 503)

    async def metrics_route(self, _request: web.Request) -> web.Response:
        await asyncio.gather(*(self._read_metrics(w) for w in self.workers if w.state in ("ok", "degraded")))
        body, content_type = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _error(self, status: int, message: str, reason: str | None = None, **headers: str) -> web.Response:
        if reason is not None:
            self.metrics.sessions_rejected.labels(reason).inc()
        return web.json_response({"error": message}, status=status, headers=headers or None)

    async def offer(self, request: web.Request) -> web.StreamResponse:
        refused = self.gate.check(request)
        if refused is not None:
            return refused
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        tried: set[int] = set()
        while True:
            live = sum(w.load for w in self.workers)
            if live >= self.max_sessions:
                return self._error(503, f"server full: {live} of {self.max_sessions} sessions in use, try again "
                                   "later", "full", **{"Retry-After": "5"})
            up = [w for w in self._up() if w.index not in tried]
            if not up:
                return self._error(503, "no worker is ready, try again later", "full", **{"Retry-After": "5"})
            w = up[0]
            tried.add(w.index)
            w.pending += 1                      # counted in the load from here: no await before this line
            try:
                async with self._http.post(self._url(w, "/offer"), data=bytes(body),
                                           headers=_forward_headers(request)) as r:
                    payload = await r.read()
                    status, headers = r.status, _response_headers(r)
            except aiohttp.ClientConnectorError:
                w.pending -= 1
                continue                        # it never got the offer: the next one may take it
            except (aiohttp.ClientError, TimeoutError):
                w.pending -= 1
                logger.warning("worker %d failed while answering an offer", w.index, exc_info=True)
                return self._error(502, f"worker {w.index} failed while answering the offer, try again")
            w.pending -= 1
            if status == 200:
                w.sessions += 1
                w.epoch += 1
                answer = json.loads(payload)
                answer["worker"] = w.index
                self._remember(str(answer.get("session", "")), w.index)
                return web.json_response(answer)
            return web.Response(status=status, body=payload, headers=headers)

    # ------------------------------------------------------------ WHIP and WHEP
    def _remember(self, key: str, index: int) -> None:
        if key:
            self._owners[key] = index
            self._owners.move_to_end(key)
            while len(self._owners) > ROUTES_KEPT:
                self._owners.popitem(last=False)

    async def whip(self, request: web.Request) -> web.StreamResponse:
        """``/whip/...`` and ``/whep/...`` (:mod:`edtalk_live.realtime.whip`), to the worker that holds the
        resource: a resource URL (PATCH, DELETE) by the worker index its id starts with; a stream or session
        named in the URL by the worker remembered for it (from the answers that made them); anything else (a new
        stream, an avatar, a session the supervisor does not know) to the least-loaded worker, then, for WHEP,
        to each other worker in turn while they answer 404."""
        kind = request.path.split("/")[1]
        parts = request.match_info["path"].split("/")
        if request.method == "POST":
            refused = self.gate.check(request)
        else:
            refused = self.gate.check(request, rate_limited=False)
        if refused is not None:
            return refused
        body = await self._read_body(request)       # an offer (POST) or an SDP fragment (PATCH)
        if isinstance(body, web.Response):
            return body
        if len(parts) == 2:                         # a resource: {stream or target}/{worker}-{id}
            index, _, rest = parts[1].partition("-")
            w = self.workers[int(index)] if index.isdigit() and int(index) < len(self.workers) and rest else None
            if w is None or w.state != "ok":
                return self._error(404, f"no WHIP/WHEP resource {request.path} here (or its worker restarted)")
            return await self._forward(request, [w], body)
        if len(parts) != 1 or request.method not in ("POST", "GET", "HEAD", "OPTIONS"):
            return await self._forward(request, self._up()[:1], body)       # the worker's 404 or 405
        name = parts[0]
        owner = self._owners.get(name)
        up = self._up()
        known = [w for w in up if w.index == owner]
        if known:
            return await self._forward(request, known, body, name=name, kind=kind)
        if request.method == "POST":
            live = sum(w.load for w in self.workers)
            if live >= self.max_sessions:                # a new stream, or maybe a new avatar session
                return self._error(503, f"server full: {live} of {self.max_sessions} sessions in use, try again "
                                   "later", "full", **{"Retry-After": "5"})
        tries = up if kind == "whep" else up[:1]
        return await self._forward(request, tries, body, name=name, kind=kind)

    async def _forward(self, request: web.Request, workers: list[_Worker], body: bytes, name: str = "",
                       kind: str = "") -> web.StreamResponse:
        """``request`` to the first of ``workers`` that does not answer 404 (the last one's answer otherwise).
        A POST answered 201 makes a session there (a stream, or a viewer's avatar session): counted at once."""
        if not workers:
            return self._error(503, "no worker is ready, try again later", "full", **{"Retry-After": "5"})
        answer: web.Response | None = None
        for w in workers:
            w.pending += request.method == "POST"
            try:
                async with self._http.request(request.method, self._url(w, request.rel_url.path_qs),
                                              data=body or None, headers=_forward_headers(request),
                                              timeout=aiohttp.ClientTimeout(total=30)) as r:
                    payload = await r.read()
                    headers = CIMultiDict((k, v) for k, v in r.headers.items() if k.lower() not in _HOP_HEADERS)
                    answer = web.Response(status=r.status, body=payload, headers=headers)
            except (aiohttp.ClientError, TimeoutError):
                logger.warning("worker %d failed while answering %s %s", w.index, request.method, request.path,
                               exc_info=True)
                answer = self._error(502, f"worker {w.index} did not answer, try again")
                continue
            finally:
                w.pending -= request.method == "POST"
            if answer.status == 201:
                known = self._owners.get(name) is not None or _SESSION_ID.fullmatch(name)
                if kind == "whip" or not known:
                    w.sessions += 1             # a new session there (a stream, or an avatar's for its viewers)
                    w.epoch += 1
                if kind == "whip" or _SESSION_ID.fullmatch(name):
                    self._remember(name, w.index)
            if answer.status != 404:
                break
        return answer

    # ------------------------------------------------------------ pushed speech
    async def speech(self, request: web.Request) -> web.StreamResponse:
        """A session's pushed-speech WebSocket (:mod:`edtalk_live.realtime.pushsocket`), relayed to the worker that
        holds the session (remembered from the answer that made it), both ways, message by message."""
        from edtalk_live.realtime.pushsocket import MAX_MESSAGE_BYTES

        sid = request.match_info["session"]
        owner = self._owners.get(sid)
        w = next((w for w in self._up() if w.index == owner), None)
        if w is None:
            return self._error(404, f"no session {sid[:40]!r} here (or its worker restarted)")
        try:
            upstream = await self._http.ws_connect(self._url(w, request.rel_url.path_qs),
                                                   headers=_forward_headers(request), max_msg_size=MAX_MESSAGE_BYTES)
        except aiohttp.WSServerHandshakeError as e:      # the worker's refusal (401, 404, 409, 400) as it gave it
            return self._error(e.status, e.message or "the worker refused the speech socket")
        except (aiohttp.ClientError, TimeoutError):
            return self._error(502, f"worker {w.index} did not answer, try again")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=20.0)
        await ws.prepare(request)

        async def relay(src, dst) -> None:
            async for msg in src:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                else:
                    break

        try:
            tasks = [asyncio.ensure_future(relay(ws, upstream)), asyncio.ensure_future(relay(upstream, ws))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await upstream.close()
            await ws.close()
        return ws

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The request's body, or a 413 past the workers' offer size."""
        limit = self.max_offer_bytes
        too_large = f"offer larger than {limit} bytes"
        if request.content_length is not None and request.content_length > limit:
            return self._error(413, too_large, "too_large")
        body = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            body += chunk
            if len(body) > limit:
                return self._error(413, too_large, "too_large")
        return bytes(body)

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """``GET /``, the static files, ``/config``: from the least-loaded worker that is up."""
        up = self._up()
        if not up:
            return web.json_response({"error": "no worker is ready, try again later"}, status=503,
                                     headers={"Retry-After": "5"})
        try:
            async with self._http.get(self._url(up[0], request.rel_url.path_qs), headers=_forward_headers(request),
                                      timeout=aiohttp.ClientTimeout(total=30)) as r:
                return web.Response(status=r.status, body=await r.read(), headers=_response_headers(r))
        except (aiohttp.ClientError, TimeoutError):
            return web.json_response({"error": "the worker did not answer, try again"}, status=502)


def _forward_headers(request: web.Request) -> dict[str, str]:
    return {k: request.headers[k] for k in _FORWARDED if k in request.headers}


def _response_headers(r: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.lower() not in _HOP_HEADERS}


async def _readable(fd: int) -> None:
    """Wait until ``fd`` is readable (a pipe with data or closed; a process sentinel once it ended)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def ready() -> None:
        loop.remove_reader(fd)
        done.set_result(None)

    loop.add_reader(fd, ready)      # one waiter per fd at a time: a second add_reader would replace this one
    try:
        await done
    finally:
        if not done.done():         # cancelled: the reader is still ours
            loop.remove_reader(fd)


def supervise(args, workers: int) -> int:
    """``serve --workers N`` with N > 1: run the supervisor until SIGINT or SIGTERM; returns the exit code."""
    level = logging.getLogger().getEffectiveLevel()
    try:
        return asyncio.run(Supervisor(args, workers, level).run())
    finally:
        _stop_resource_tracker()


def _stop_resource_tracker() -> None:
    """Stop and reap multiprocessing's resource tracker (``spawn`` starts one; it would otherwise exit a moment
    after the supervisor, on its own), so that no process of the server outlives the supervisor."""
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)    # CPython 3.8+, not public
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()
