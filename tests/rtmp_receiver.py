"""A local RTMP receiver for the tests: FFmpeg's own RTMP protocol in listen mode, through PyAV.

``python rtmp_receiver.py PORT`` waits for one publisher on ``rtmp://127.0.0.1:PORT/live/s``, decodes what
it sends and prints one JSON line per event on stdout (flushed at once, so a test reads them as they come):

- ``{"ev": "listening", "wall": <monotonic s>}`` before it waits for the publisher;
- ``{"ev": "connected", "video": ..., "audio": ...}`` with the streams' codecs and audio rate and channels once
  the FLV header is read;
- ``{"ev": "p", "kind": "video" | "audio", "t": <pts s>, "key": <keyframe>, "wall": <monotonic s>}`` per packet,
  as it is read;
- ``{"ev": "v", "t": <pts s>, "luma": <mean 0-255>, "w": <width>, "h": <height>, "wall": ...}`` per video frame;
- ``{"ev": "a", "t": <pts s>, "n": <samples>, "onset": <s of the first loud sample, or null>, "wall": ...}`` per
  decoded audio frame;
- ``{"ev": "end", "error": <null or why>}`` when the publisher leaves (or the connection fails).

The receiver serves one connection and exits (as FFmpeg's listen mode does): a test restarts it to play a
receiver that went away and came back.
"""

from __future__ import annotations

import json
import sys
import time

import av
import numpy as np

#: |sample| above this fraction of full scale counts as sound (the tests' tone bursts are at 0.5)
ONSET_LEVEL = 0.1


def emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def stream_info(stream) -> dict | None:
    if stream is None:
        return None
    ctx = stream.codec_context
    if stream.type == "video":
        return {"codec": ctx.name, "width": ctx.width, "height": ctx.height}
    return {"codec": ctx.name, "rate": ctx.sample_rate, "channels": ctx.channels}


def receive(port: int) -> None:
    emit(ev="listening", wall=time.monotonic())
    error = None
    try:
        # no probing ahead (which would hold the first second of packets back): the FLV header says it all
        with av.open(f"rtmp://127.0.0.1:{port}/live/s", format="flv",
                     options={"listen": "1", "probesize": "32", "analyzeduration": "0"}) as c:
            video = c.streams.video[0] if c.streams.video else None
            audio = c.streams.audio[0] if c.streams.audio else None
            emit(ev="connected", video=stream_info(video), audio=stream_info(audio))
            for packet in c.demux():
                if packet.stream.type not in ("video", "audio"):
                    continue
                if packet.pts is not None:
                    emit(ev="p", kind=packet.stream.type, t=float(packet.pts * packet.time_base),
                         key=bool(packet.is_keyframe), wall=time.monotonic())
                for frame in packet.decode():
                    wall = time.monotonic()
                    if frame.pts is None:
                        continue
                    t = float(frame.pts * frame.time_base)
                    if packet.stream.type == "video":
                        luma = float(frame.to_ndarray(format="gray").mean())
                        emit(ev="v", t=t, luma=luma, w=frame.width, h=frame.height, wall=wall)
                    else:
                        samples = np.abs(frame.to_ndarray()).max(axis=0)
                        loud = np.flatnonzero(samples > ONSET_LEVEL)
                        onset = t + loud[0] / frame.sample_rate if loud.size else None
                        emit(ev="a", t=t, n=frame.samples, onset=onset, wall=wall)
    except Exception as e:  # noqa: BLE001 - the test reads why the connection ended
        error = f"{type(e).__name__}: {e}"
    emit(ev="end", error=error)


if __name__ == "__main__":
    receive(int(sys.argv[1]))
