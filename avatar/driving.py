"""Motion read from driving clips (head pose, expression), once, for ``render`` and ``serve`` alike."""

from __future__ import annotations

import itertools
import logging
import os

import numpy as np
import torch

from edtalk_live.edtalk.audio import FPS
from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.motion import Motion
from edtalk_live.engines.base import Renderer
from edtalk_live.media import io as media

logger = logging.getLogger(__name__)

__all__ = ["pingpong", "read_clip_motion"]


def pingpong(seq: torch.Tensor, length: int) -> torch.Tensor:
    """Extend (or cut) a sequence ``[N,...]`` to ``[length,...]`` by playing it forward then backward.

    Index order ``0, 1, .., N-1, N-2, .., 1, 0, 1, ..``: no jump at the turning points, so a short
    pose or expression clip loops smoothly.
    """
    n = seq.shape[0]
    if n == 0:
        raise ValueError("cannot extend an empty sequence")
    if length <= n:
        return seq[:length]
    if n == 1:
        return seq.expand(length, *seq.shape[1:])
    period = 2 * n - 2
    k = torch.arange(length) % period
    index = torch.where(k < n, k, period - k)
    return seq[index.to(seq.device)]


@torch.inference_mode()
def read_clip_motion(renderer: Renderer, path: str | os.PathLike[str], align: bool = True, batch_size: int = 8,
                     max_frames: int | None = None) -> Motion:
    """Motion of every frame of a driving clip at 25 fps: ``pose [N,6]``, ``exp [N,10]`` (or None), ``lip [N,20]``.

    With ``align`` the clip is cropped with one fixed square box around the face over the whole clip
    (never frame by frame, which would erase the head motion); otherwise it is only resized.
    ``max_frames`` stops reading early.
    """
    size = renderer.config.size
    if align:
        from edtalk_live.media.clips import crop_clip

        frames = crop_clip(path, size, fps=FPS)
        if max_frames is not None:
            frames = itertools.islice(frames, max_frames)
    else:
        frames = media.iter_video_frames(path, size, fps=FPS, max_frames=max_frames)
    parts: list[Motion] = []
    batch: list[np.ndarray] = []
    for frame in itertools.chain(frames, [None]):
        if frame is not None:
            batch.append(frame)
        if batch and (frame is None or len(batch) == batch_size):
            parts.append(renderer.read_motion(media.uint8_to_tensor(np.stack(batch))))
            batch.clear()
    if not parts:
        raise InputError(f"{path}: no video frames")
    exp = torch.cat([m.exp for m in parts]) if parts[0].exp is not None else None
    motion = Motion(lip=torch.cat([m.lip for m in parts]), pose=torch.cat([m.pose for m in parts]), exp=exp)
    logger.info("%s: motion of %d frames read", path, motion.pose.shape[0])
    return motion
