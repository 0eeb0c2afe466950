"""Speech -> mouth coefficients, the way a live session computes them, for live sessions and files alike.

A live session's mouth comes from :class:`~edtalk_live.avatar.lipsync.StreamingLipSync` with
:func:`lipsync_config`; its lip-sync stream starts where the speech starts (on a frame boundary, see
``realtime.session``), and silence follows the speech. :func:`lips_for_audio` runs a whole file
through the same streaming lip sync, followed by the same silence, so ``render`` writes the frames a
session streams for the same speech. Against the published offline pipeline (which clamps the mel
windows at the end of the file instead of hearing silence) only the last few frames differ.
"""

from __future__ import annotations

import numpy as np
import torch

from edtalk_live.avatar.lipsync import LipSyncConfig, StreamingLipSync
from edtalk_live.edtalk.audio import SAMPLES_PER_FRAME

__all__ = ["SILENCE_DB", "lips_for_audio", "lipsync_config"]

#: silence gate of the lip sync (dBFS): quieter windows rest the mouth
SILENCE_DB = -50.0


def lipsync_config(low_latency: bool = False, silence_db: float | None = SILENCE_DB) -> LipSyncConfig:
    """The lip sync of a live session: EDTalk's look-ahead, or the low-latency one (shorter, causal)."""
    return LipSyncConfig(lookahead="low" if low_latency else "offline", cut_to_frames=False, silence_db=silence_db)


@torch.inference_mode()
def lips_for_audio(audio_to_lip, wav: np.ndarray, frames: int, rest_lip: torch.Tensor | None = None,
                   config: LipSyncConfig | None = None) -> torch.Tensor:
    """Mouth coefficients ``[frames,20]`` of 16 kHz speech ``wav`` (frame ``i`` shows samples ``[640 i, 640 (i+1))``).

    The speech is streamed as a session hears it: a stream starting with the speech, then silence
    until every frame is final. ``rest_lip`` is the resting mouth of the silence gate.
    """
    config = config or lipsync_config()
    lips = StreamingLipSync(audio_to_lip, config, rest_lip=rest_lip)
    wav = np.asarray(wav, np.float32)
    lips.push(wav)
    tail = max(frames * SAMPLES_PER_FRAME - len(wav), 0) + lips.latency_samples + SAMPLES_PER_FRAME
    lips.push(np.zeros(tail, np.float32))
    got = [f.lip for f in lips.pop()][:frames]
    if len(got) != frames:
        raise RuntimeError(f"lip sync gave {len(got)} of {frames} frames")     # a bug, never bad input
    return torch.stack(got)
