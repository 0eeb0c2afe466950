"""Voice-agent frameworks driving the avatar: LiveKit Agents (an avatar worker and its agent-side plugin) and
Pipecat (a video service), on the avatar engine (:mod:`edtalk_live.realtime.engine`) or a running server."""
