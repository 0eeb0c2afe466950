"""Odd incoming audio never breaks the session's clock (issue 15: fuzzing, inbound audio).

A live session whose microphone stalls and then bursts (half a second of packets at once), goes silent,
stops sending for two seconds and comes back (aiortc's encoders go on with contiguous timestamps: every
later packet looks two seconds late, until the server follows the new timestamps), over Opus (48 kHz
stereo at the server) and G.711 µ-law (8 kHz mono). The video keeps its 25 fps and every frame index in
order (probe mode), and the voice after the gap is heard again.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import Running

from edtalk_live.realtime import client as client_module
from edtalk_live.realtime.client import FileAudioTrack, run_client
from edtalk_live.realtime.probe import read_index

pytestmark = pytest.mark.slow
RATE = 16000


class StallBurstGapTrack(FileAudioTrack):
    """The file track with a 0.5 s stall then a burst at 1.5 s, and 2 s not sent at 3.5 s; between them the
    audio is sent in real time. ``contiguous``: the timestamps go on where they stopped after the 2 s (a
    sender that paused), else they jump over them (a muted microphone with DTX, as browsers send)."""

    STALL_AT, STALL_S, GAP_AT, GAP_S = 1.5, 0.5, 3.5, 2.0
    contiguous = False

    async def recv(self):
        loop = asyncio.get_running_loop()
        if self._loop_start is not None and self.pos == int(self.STALL_AT * RATE):
            await asyncio.sleep(self.STALL_S)            # nothing for 0.5 s, then the late packets all at once
        if self._loop_start is not None and self.pos == int(self.GAP_AT * RATE):
            self.pos += int(self.GAP_S * RATE)           # nothing sent for 2 s, the clock runs on
            await asyncio.sleep(max(0.0, self._loop_start + self.pos / RATE - loop.time()))
        frame = await super().recv()
        if self.contiguous and frame.pts >= int((self.GAP_AT + self.GAP_S) * RATE):
            frame.pts -= int(self.GAP_S * RATE)
        return frame


class PausedSenderTrack(StallBurstGapTrack):
    contiguous = True


@pytest.mark.parametrize("track", [StallBurstGapTrack, PausedSenderTrack], ids=["timestamps-jump", "contiguous"])
@pytest.mark.parametrize("codec", ["opus", "PCMU"])
def test_stalls_bursts_gaps_and_codecs_keep_the_clock(edtalk_weights, face_image, speech, codec, track,
                                                      monkeypatch):
    from aiortc import codecs as aiortc_codecs

    if codec != "opus":           # both peers of this process offer only this codec for audio
        audio_codecs = [c for c in aiortc_codecs.CODECS["audio"] if c.mimeType.split("/")[1] == codec]
        assert audio_codecs, codec
        monkeypatch.setitem(aiortc_codecs.CODECS, "audio", audio_codecs)
    monkeypatch.setattr(client_module, "FileAudioTrack", track)
    seconds = 7.0
    audio = np.tile(speech, 2)[: int(seconds * RATE)]

    async def main():
        async with Running(edtalk_weights, face_image) as srv:
            return await run_client(srv.url, audio, None, {"probe": True}, keep_frames=True)

    result = asyncio.run(main())
    s = result.stats
    indices = [read_index(f) for f in result.frames]
    steps = np.diff(indices)
    assert len(indices) >= 25 * seconds - 5, (len(indices), s)
    assert (steps == 1).mean() > 0.97 and steps.min() >= 1, np.unique(steps, return_counts=True)
    assert s["frames_repeated"] + s["frames_skipped"] <= 0.03 * len(indices) + 2, s
    # jumping timestamps: the 2 s are silence at their place (the fill), nothing re-anchored; contiguous ones:
    # every later packet lands 2 s late until the clock follows them (once), instead of being dropped for good
    assert s["audio_resyncs"] == (1 if track.contiguous else 0), s
    assert abs(s["av_offset_ms"]) <= 40, s
    voice = np.concatenate(result.received_audio)
    rate = result.audio_rate or 48000
    tail = voice[-int(1.2 * rate):]                 # the last speech, sent after the gap
    assert np.sqrt(np.mean(tail.astype(np.float64) ** 2)) > 300, f"no voice after the gap: {s}"
