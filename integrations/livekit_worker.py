"""The LiveKit avatar worker: ``edtalk-live livekit-worker`` registers an agent server with a LiveKit server and
plays the avatar of each room it is dispatched to.

One worker process per GPU, one :class:`~edtalk_live.realtime.engine.AvatarEngine` per process, and the jobs
(rooms) run as threads of that process (``JobExecutorType.THREAD``), each on an event loop of its own: every room
opens a stream on the same engine, so all of them share one frame scheduler, whose batches hold every room's
frames. A job joins its room as the avatar participant on behalf of the agent (``lk.publish_on_behalf``: the
agent's transcriptions and state go with the avatar's tracks), receives the agent's TTS audio through a
``DataStreamAudioReceiver`` and publishes the avatar through an ``AvatarRunner``
(:mod:`edtalk_live.integrations.livekit_avatar`); it ends when the agent leaves.

Load: the worker reports :func:`engine_load`, the larger of the render thread's busy fraction over the last few
seconds (the frames it rendered over the frames it could render in that time, at 25 fps a stream) and the
streams open over ``--max-streams``. LiveKit dispatches a room to the least loaded available worker; a worker
whose load is at or above ``load_threshold`` (:data:`DEFAULT_LOAD_THRESHOLD`) is marked unavailable and gets no
more rooms until its load falls: a threshold below 1 keeps headroom for the rooms it already serves, whose
speech makes the load rise and fall.

The agent side dispatches this worker (agent name :data:`AGENT_NAME`) with the metadata of
:class:`~edtalk_live.integrations.livekit_avatar.AvatarJob` (:class:`edtalk_live.integrations.livekit.
AvatarSession` does). :func:`build_agent_server` builds the ``AgentServer`` for a started engine, to run here or
elsewhere (a simulation of many workers reuses it, and :func:`engine_load`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from livekit import rtc
from livekit.agents import AgentServer, AutoSubscribe, JobContext, JobExecutorType, JobRequest
from livekit.agents import utils as lk_utils
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import DataStreamAudioReceiver

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.integrations.livekit_avatar import (
    AGENT_NAME,
    CONTROL_RPC,
    AvatarJob,
    start_avatar_runner,
)
from edtalk_live.realtime.engine import AvatarEngine

__all__ = ["AGENT_NAME", "DEFAULT_LOAD_THRESHOLD", "WorkerSettings", "build_agent_server", "engine_load",
           "main_worker", "run_worker", "worker_settings"]

logger = logging.getLogger(__name__)

#: a worker whose load reaches this is marked unavailable: no more rooms are dispatched to it
DEFAULT_LOAD_THRESHOLD = 0.8
#: the worker's health-check HTTP port (LiveKit's own default); 0 picks a free one (several workers on one box)
DEFAULT_HTTP_PORT = 8081
#: seconds a stopping worker waits for its rooms to end before it closes them
DRAIN_TIMEOUT_S = 60


@dataclass(frozen=True)
class WorkerSettings:
    """How the worker registers: the LiveKit server (None: ``$LIVEKIT_URL``, ``$LIVEKIT_API_KEY``,
    ``$LIVEKIT_API_SECRET``), the agent name it is dispatched by, its load threshold and HTTP port."""

    url: str | None = None
    api_key: str | None = None
    api_secret: str | None = None
    agent_name: str = AGENT_NAME
    load_threshold: float = DEFAULT_LOAD_THRESHOLD
    http_port: int = DEFAULT_HTTP_PORT
    drain_timeout: int = DRAIN_TIMEOUT_S
    #: job threads kept started: LiveKit counts a job being started as load (threshold / idle jobs) and, with
    #: none, makes a thread per room as it comes
    idle_jobs: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.load_threshold <= 1.0:
            raise InputError(f"load_threshold must be in (0, 1], got {self.load_threshold:g}")
        if not self.agent_name:
            raise InputError("the agent name must not be empty (rooms dispatch the avatar by its name)")
        if not 0 <= self.http_port < 65536:
            raise InputError(f"http_port must be 0-65535, got {self.http_port}")


def engine_load(engine: AvatarEngine) -> float:
    """The worker's load, 0 (idle) to 1 (full): the render thread's busy fraction over the last few seconds
    (frames rendered over the frames it can render, 25 a second for each stream), or the share of the stream
    limit in use, whichever is larger."""
    limit = engine.server.settings.max_sessions
    return min(1.0, max(engine.load(), engine.streams / limit))


def build_agent_server(engine: AvatarEngine, settings: WorkerSettings | None = None) -> AgentServer:
    """The ``AgentServer`` of an avatar worker on ``engine`` (started by the caller before it runs): jobs as
    threads, explicit dispatch by ``settings.agent_name``, load from :func:`engine_load` against
    ``settings.load_threshold``."""
    return agent_server(settings or WorkerSettings(), lambda: engine_load(engine),
                        functools.partial(avatar_job, engine=engine),
                        on_request=functools.partial(accept_job, engine=engine))


def agent_server(settings: WorkerSettings, load: Callable[[], float], entrypoint,
                 on_request=None) -> AgentServer:
    """An ``AgentServer`` as an avatar worker runs one, with any ``load`` (0..1, no arguments) and job
    ``entrypoint`` (the fleet simulation's stand-in jobs too): jobs as threads of this process (so they share
    one engine), ``WS_FULL`` from ``settings.load_threshold`` on."""
    lock = threading.Lock()         # LiveKit asks for the load from its executor threads, sometimes two at once

    def load_now() -> float:        # no parameters: LiveKit passes the server to a load function that takes any
        with lock:
            return float(load())

    server = AgentServer(
        job_executor_type=JobExecutorType.THREAD,
        load_fnc=load_now,
        load_threshold=settings.load_threshold,
        num_idle_processes=settings.idle_jobs,
        ws_url=settings.url,
        api_key=settings.api_key,
        api_secret=settings.api_secret,
        port=settings.http_port,
        drain_timeout=settings.drain_timeout,
    )
    server.rtc_session(entrypoint, agent_name=settings.agent_name, on_request=on_request)
    return server


async def accept_job(request: JobRequest, *, engine: AvatarEngine) -> None:
    """Take a room when the engine has a free stream: join as the avatar participant the dispatch names, on
    behalf of its agent; a full worker declines (another worker gets the room)."""
    try:
        job = AvatarJob.from_json(request.job.metadata)
    except InputError as exc:
        logger.error("room %s: avatar dispatch refused: %s", request.room.name, exc)
        await request.reject(terminate=True)
        return
    limit = engine.server.settings.max_sessions
    if engine.streams >= limit:
        logger.warning("room %s: declined, %d of %d avatar streams in use", request.room.name, engine.streams, limit)
        await request.reject(terminate=False)
        return
    attributes = {ATTRIBUTE_PUBLISH_ON_BEHALF: job.agent_identity} if job.agent_identity else None
    await request.accept(name=job.avatar_name, identity=job.avatar_identity, attributes=attributes)


async def avatar_job(ctx: JobContext, *, engine: AvatarEngine) -> None:
    """One room: the avatar speaks what the agent streams to it, until the agent leaves."""
    job = AvatarJob.from_json(ctx.job.metadata)
    await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE)    # the avatar listens to no one's tracks
    room = ctx.room
    agent_identity = job.agent_identity
    if not agent_identity:           # dispatched without the agent's identity: the first agent in the room
        agent = await lk_utils.wait_for_participant(room, kind=rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
        agent_identity = agent.identity
    if room.local_participant.attributes.get(ATTRIBUTE_PUBLISH_ON_BEHALF) != agent_identity:
        await room.local_participant.set_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
    try:
        stream = await asyncio.to_thread(engine.open, job.options)
    except EDTalkError as exc:
        logger.error("room %s: no avatar: %s", room.name, exc)
        ctx.shutdown(f"no avatar: {exc}")
        return
    left = asyncio.Event()

    def on_left(participant: rtc.RemoteParticipant) -> None:
        if participant.identity == agent_identity:
            left.set()

    room.on("participant_disconnected", on_left)
    room.on("disconnected", lambda *_: left.set())
    register_control(room, stream, agent_identity)
    runner = None
    try:
        receiver = DataStreamAudioReceiver(room, sender_identity=agent_identity)
        runner, _ = await start_avatar_runner(room, stream, receiver)
        logger.info("room %s: avatar %s speaking for %s (%d streams on this worker)", room.name,
                    room.local_participant.identity, agent_identity, engine.streams)
        await left.wait()
    finally:
        room.off("participant_disconnected", on_left)
        if runner is not None:
            await runner.aclose()
        stream.close()
    ctx.shutdown("the agent left")


def register_control(room: rtc.Room, stream, caller_identity: str) -> None:
    """Answer the ``edtalk.control`` RPC of ``caller_identity``: a control message (emotion, intensity, pose,
    pause, resume, stats) as on a WebRTC session's channel, the reply as JSON."""
    import json

    def control(data: rtc.RpcInvocationData) -> str:
        if data.caller_identity != caller_identity:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.APPLICATION_ERROR, "only the agent controls its avatar")
        try:
            message = json.loads(data.payload)
            if not isinstance(message, dict):
                raise InputError("a control message is a JSON object")
            return json.dumps(stream.control(message))
        except (ValueError, EDTalkError) as exc:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.APPLICATION_ERROR, str(exc)[:300]) from None

    room.local_participant.register_rpc_method(CONTROL_RPC, control)


def run_worker(engine: AvatarEngine, settings: WorkerSettings) -> int:
    """Start ``engine``, register with LiveKit and serve rooms until SIGINT/SIGTERM, then drain (rooms in
    progress may end, for up to ``settings.drain_timeout`` s) and stop. Returns the exit code."""
    server = build_agent_server(engine, settings)
    engine.start()
    try:
        asyncio.run(_serve(server, settings.drain_timeout))
    finally:
        engine.stop()
    return 0


async def _serve(server: AgentServer, drain_timeout: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = asyncio.create_task(server.run(devmode=False), name="livekit-worker")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if running.done():
        stopping.cancel()
        try:
            running.result()
        except Exception as exc:         # a failure to register (a bad URL or key, the server unreachable)
            raise EDTalkError(f"the LiveKit worker stopped: {exc}") from exc
        return
    logger.info("stopping: no more rooms; waiting up to %d s for %d rooms to end", drain_timeout,
                len(server.active_jobs))
    try:
        await server.drain(timeout=drain_timeout)
    except TimeoutError:
        logger.warning("rooms still open after %d s: closing them", drain_timeout)
    await server.aclose()
    running.cancel()


def worker_settings(args) -> WorkerSettings:
    """The :class:`WorkerSettings` of ``livekit-worker``'s arguments, the LiveKit server's URL and key from
    ``$LIVEKIT_URL``, ``$LIVEKIT_API_KEY`` and ``$LIVEKIT_API_SECRET`` where not given."""
    import os

    credentials = {}
    for name, env in (("url", "LIVEKIT_URL"), ("api_key", "LIVEKIT_API_KEY"), ("api_secret", "LIVEKIT_API_SECRET")):
        credentials[name] = getattr(args, name) or os.environ.get(env) or None
        if credentials[name] is None:
            raise InputError(f"no LiveKit {name.replace('_', ' ')}: give --{name.replace('_', '-')} or set ${env}")
    if args.max_streams < 1:
        raise InputError(f"--max-streams must be >= 1, got {args.max_streams}")
    return WorkerSettings(**credentials, agent_name=args.agent_name, load_threshold=args.load_threshold,
                          http_port=args.http_port)


def main_worker(args, settings: WorkerSettings | None = None) -> int:
    """``edtalk-live livekit-worker``: the engine from the model and avatar arguments (as ``serve``'s), then
    :func:`run_worker`."""
    from edtalk_live.realtime.server import ServerSettings

    settings = settings or worker_settings(args)
    engine = AvatarEngine.build(args.weights, args.avatar, backend=args.backend, device=args.device,
                                pose_video=args.pose_video, avatars_dir=args.avatars, align=not args.no_align,
                                settings=ServerSettings(max_sessions=args.max_streams, max_batch=args.max_batch,
                                                        render_threads=args.render_threads,
                                                        render_budget=args.render_budget))
    logger.info("avatar worker %r: %s, up to %d streams, load threshold %g", settings.agent_name,
                engine.server.renderer.describe(), args.max_streams, settings.load_threshold)
    return run_worker(engine, settings)
