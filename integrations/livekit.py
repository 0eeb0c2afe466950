"""LiveKit Agents plugin: an EDTalk avatar for a voice agent, like the vendors' avatar plugins.

Remote (an avatar worker, ``edtalk-live livekit-worker``, serves the rooms on its GPU)::

    from edtalk_live.integrations.livekit import AvatarSession

    avatar = AvatarSession(emotion="happy")
    await avatar.start(session, room=ctx.room)          # before session.start(...)
    await session.start(agent=agent, room=ctx.room)

:meth:`AvatarSession.start` dispatches the worker's agent (``edtalk-avatar``) to the room with the avatar's
identity, the agent's identity (the avatar publishes on its behalf: ``lk.publish_on_behalf``) and the stream's
options in the dispatch metadata, and replaces the agent's audio output with a ``DataStreamAudioOutput`` to the
avatar: the TTS audio goes to the avatar as byte streams, interruptions as ``lk.clear_buffer``, and the agent
learns what was heard from the avatar's ``lk.playback_started`` / ``lk.playback_finished``, reported by the engine
(seconds played, interrupted).

Local (one box: the avatar engine in the agent's own process, its tracks published by the agent)::

    engine = AvatarEngine.build(weights_dir, "photo.jpg"); engine.start()
    avatar = AvatarSession.local(engine, emotion="happy")
    await avatar.start(session, room=ctx.room)

Either way :meth:`AvatarSession.control` changes the avatar while it plays (emotion, intensity, pose, ...).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

try:
    from livekit import api, rtc
    from livekit.agents import get_job_context
    from livekit.agents.voice.avatar import AvatarSession as _AvatarSession
    from livekit.agents.voice.avatar import DataStreamAudioOutput, QueueAudioOutput
except ImportError as exc:          # the optional extra is missing
    raise ImportError(f"edtalk_live.integrations.livekit needs LiveKit Agents ({exc.name} is missing): "
                      "pip install 'edtalk-live[livekit]'") from exc

from edtalk_live.edtalk.errors import EDTalkError
from edtalk_live.integrations.livekit_avatar import AGENT_NAME, CONTROL_RPC, AvatarJob, start_avatar_runner
from edtalk_live.realtime.engine import AvatarEngine

__all__ = ["AGENT_NAME", "AvatarSession"]

logger = logging.getLogger(__name__)


class AvatarSession(_AvatarSession):
    """An EDTalk avatar for an ``AgentSession`` (see the module): remote (an avatar worker is dispatched to the
    room) or local (:meth:`local`: an :class:`~edtalk_live.realtime.engine.AvatarEngine` in this process).

    ``avatar``, ``emotion``, ``intensity``, ``pose`` and ``options`` are the stream's options, as an offer's
    (``avatar``: the name of one of the worker's avatars; ``pose``: ``idle``, ``still`` or ``clip``). ``agent_name``:
    the worker's agent name. ``avatar_identity``: the avatar participant's identity (default: ``edtalk-avatar-``
    followed by the agent's identity). ``wait_for_video``: the agent speaks only once the avatar's video is
    published (remote mode).
    """

    def __init__(self, *, avatar: str | None = None, emotion: str | None = None, intensity: float | None = None,
                 pose: str | None = None, options: dict[str, Any] | None = None, agent_name: str = AGENT_NAME,
                 avatar_identity: str | None = None, avatar_name: str = "avatar", wait_for_video: bool = True,
                 engine: AvatarEngine | None = None):
        super().__init__()
        named = {"avatar": avatar, "emotion": emotion, "intensity": intensity, "pose": pose}
        self.options = {**(options or {}), **{k: v for k, v in named.items() if v is not None}}
        self.agent_name = agent_name
        self.avatar_name = avatar_name
        self.wait_for_video = wait_for_video
        self.engine = engine
        self._identity = avatar_identity
        self._stream = None
        self._runner = None
        self._generator = None

    @classmethod
    def local(cls, engine: AvatarEngine, **kwargs: Any) -> AvatarSession:
        """An avatar played in this process on ``engine`` (started), no worker: for one box."""
        return cls(engine=engine, **kwargs)

    @property
    def avatar_identity(self) -> str:
        return self._identity or AGENT_NAME

    @property
    def provider(self) -> str:
        return "edtalk-live"

    @property
    def generator(self):
        """The local mode's :class:`~edtalk_live.integrations.livekit_avatar.EngineVideoGenerator` (its stats),
        once started; None in remote mode."""
        return self._generator

    async def start(self, agent_session, room: rtc.Room, *, livekit_url: str | None = None,
                    api_key: str | None = None, api_secret: str | None = None) -> None:
        """Start the avatar in ``room`` and route ``agent_session``'s audio to it (call it before
        ``agent_session.start``). Remote mode dispatches the worker with ``livekit_url``, ``api_key`` and
        ``api_secret`` (default: the job's own, else ``$LIVEKIT_URL``, ``$LIVEKIT_API_KEY``,
        ``$LIVEKIT_API_SECRET``)."""
        if self.engine is not None:
            await self._start_local(agent_session, room)
            return
        agent_identity = room.local_participant.identity
        if self._identity is None:
            self._identity = f"{AGENT_NAME}-{agent_identity}"
        await super().start(agent_session, room)
        job = AvatarJob(avatar_identity=self.avatar_identity, agent_identity=agent_identity,
                        avatar_name=self.avatar_name, options=self.options)
        await self._dispatch(room.name, job, livekit_url, api_key, api_secret)
        agent_session.output.audio = DataStreamAudioOutput(
            room, destination_identity=self.avatar_identity,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO if self.wait_for_video else None,
            wait_playback_start=True)      # the worker reports when each utterance starts playing
        logger.info("avatar %s dispatched to room %s (agent %s)", self.avatar_identity, room.name, self.agent_name)

    async def _dispatch(self, room_name: str, job: AvatarJob, url: str | None, key: str | None,
                        secret: str | None) -> None:
        request = api.CreateAgentDispatchRequest(agent_name=self.agent_name, room=room_name, metadata=job.to_json())
        job_ctx = get_job_context(required=False)
        if job_ctx is not None and not (url or key or secret):
            await job_ctx.api.agent_dispatch.create_dispatch(request)
            return
        lkapi = api.LiveKitAPI(url, key, secret)
        try:
            await lkapi.agent_dispatch.create_dispatch(request)
        finally:
            await lkapi.aclose()

    async def _start_local(self, agent_session, room: rtc.Room) -> None:
        self._identity = room.local_participant.identity         # the agent publishes the avatar itself
        self._room = room
        job_ctx = get_job_context(required=False)
        if job_ctx is not None:
            job_ctx.add_shutdown_callback(self.aclose)
        self._stream = await asyncio.to_thread(self.engine.open, self.options)
        audio = QueueAudioOutput(wait_playback_start=True)        # the engine reports when playback starts
        try:
            self._runner, self._generator = await start_avatar_runner(room, self._stream, audio)
        except BaseException:
            self._stream.close()
            raise
        agent_session.output.audio = audio
        logger.info("avatar playing in this process (stream %s)", self._stream.id[:8])

    async def control(self, message: dict[str, Any]) -> dict[str, Any]:
        """A control message (``{"type": "emotion", "name": "happy"}``, ``intensity``, ``pose``, ``pause``,
        ``resume``, ``stats``), as on a WebRTC session's channel; returns the reply."""
        if self._stream is not None:
            return await asyncio.to_thread(self._stream.control, message)
        if self._room is None:
            raise EDTalkError("the avatar is not started")
        try:
            reply = await self._room.local_participant.perform_rpc(
                destination_identity=self.avatar_identity, method=CONTROL_RPC, payload=json.dumps(message))
        except rtc.RpcError as exc:
            raise EDTalkError(f"the avatar refused {message.get('type')!r}: {exc.message}") from None
        return json.loads(reply)

    async def aclose(self) -> None:
        if self.engine is None:
            await super().aclose()          # removes the avatar participant from the room
            return
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.aclose()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        self._room = None
