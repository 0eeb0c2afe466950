"""Offline rendering: one face image + speech audio -> a talking-face mp4 (the ``render`` command).

Pipeline (everything once, except the decoder which runs per batch of frames)::

    image --read_face--> photo + alignment --prepare_avatar--> source, own pose/mouth/expression (once)
    audio --lips_for_audio--> lip [T,20]      (the live session's streaming lip sync, same look-ahead)
    pose video / the image itself --> pose [T,6]
    emotion at an intensity / exp video / the image itself --> exp [1,10] or [T,10]   (EDTalk.pt family only)
    render(avatar, lip, pose) in batches --> uint8 frames --> H.264 + AAC mp4 (streamed, atomic)

The avatar, the mouth and the expression come from the same code a live session uses
(:mod:`edtalk_live.avatar.prepare`, :mod:`edtalk_live.avatar.speech`), so a session streams the
frames this writes for the same photo, audio and options. T is the number of whole 25 fps frames in
the audio (640 samples each); the audio written to the mp4 is cut to exactly those frames, so picture
and sound have the same length.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import edtalk_live.edtalk as edtalk
import edtalk_live.engines as engines
from edtalk_live.avatar.driving import pingpong, read_clip_motion
from edtalk_live.avatar.motion import check_intensity
from edtalk_live.avatar.prepare import FaceImage, make_paste_back, prepare_avatar, read_face
from edtalk_live.avatar.speech import lips_for_audio, lipsync_config
from edtalk_live.edtalk import audio as edtalk_audio
from edtalk_live.edtalk.errors import InputError
from edtalk_live.media import io as media
from edtalk_live.media.weights import WeightFiles, find_weights, load_preset

logger = logging.getLogger(__name__)

__all__ = ["RenderSummary", "render_file"]


@dataclass(frozen=True)
class RenderSummary:
    """What :func:`render_file` wrote."""

    out: Path
    frames: int
    fps: int
    seconds: float
    family: str
    elapsed: float  # wall-clock seconds, validation to the finished file


@dataclass(frozen=True)
class _Inputs:
    """Validated inputs, decoded before the model is loaded."""

    weights: WeightFiles
    face: FaceImage                        # the photo, upright, and its face
    wav: np.ndarray                        # 16 kHz mono, the whole file
    frames: int
    device: torch.device
    preset: torch.Tensor | None            # [1,10] expression coefficients of --emotion


def _validate(
    weights_dir: str | os.PathLike[str] | None,
    image: str | os.PathLike[str] | None,
    audio: str | os.PathLike[str],
    out: Path,
    pose_video: str | os.PathLike[str] | None,
    still: bool,
    emotion: str | None,
    exp_video: str | os.PathLike[str] | None,
    batch_size: int,
    device: str,
    backend: str = "torch",
    align: bool = True,
    face: int = 0,
    paste_back: bool = False,
    intensity: float | None = None,
) -> _Inputs:
    """Check every input cheaply, in the order a user would fix them; raise a one-line error."""
    if pose_video is not None and still:
        raise InputError("--pose-video and --still cannot be used together")
    if emotion is not None and exp_video is not None:
        raise InputError("--emotion and --exp-video cannot be used together")
    if intensity is not None:
        if emotion is None:
            raise InputError("--intensity scales an emotion: it needs --emotion NAME")
        check_intensity(intensity)
    if backend not in engines.BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(engines.BACKENDS)}")
    reason = engines.available_backends().get(backend, "")
    if reason:
        raise InputError(f"backend {backend} is not available here: {reason}")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available")
    if not out.parent.is_dir():
        raise InputError(f"output folder does not exist: {out.parent}")
    if out.exists() and out.is_dir():
        raise InputError(f"output path is a folder: {out}")

    weights = find_weights(weights_dir)
    weights.require_audio2lip()
    if (emotion is not None or exp_video is not None) and weights.family_hint != "edtalk":
        what = f"--emotion {emotion}" if emotion is not None else "--exp-video"
        raise InputError(f"{what} needs the expression model EDTalk.pt; {weights.gen} has no expression")
    preset = load_preset(weights.preset(emotion)) if emotion is not None else None

    if paste_back and image is None:
        raise InputError("--paste-back needs --image (the photo to paste the face back into)")
    face_image = read_face(image, align=align, face=face)        # EXIF, detection: fails fast
    wav = media.load_audio(audio, sample_rate=edtalk_audio.SAMPLE_RATE)
    frames = edtalk_audio.num_frames(len(wav))
    if frames == 0:
        raise InputError(
            f"audio is too short: {audio} has {len(wav)} samples, at least "
            f"{edtalk_audio.SAMPLES_PER_FRAME} ({1000 // edtalk_audio.FPS} ms) are needed"
        )
    for video in (pose_video, exp_video):
        if video is not None:
            media.probe_video(video)
    return _Inputs(weights=weights, face=face_image, wav=wav, frames=frames, device=dev, preset=preset)


def render_file(
    weights_dir: str | os.PathLike[str] | None,
    image: str | os.PathLike[str] | None,
    audio: str | os.PathLike[str],
    out: str | os.PathLike[str],
    pose_video: str | os.PathLike[str] | None = None,
    still: bool = False,
    emotion: str | None = None,
    exp_video: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
    backend: str = "torch",
    align: bool = True,
    face: int = 0,
    paste_back: bool = False,
    intensity: float | None = None,
    low_latency: bool = False,
) -> RenderSummary:
    """Render a talking-face mp4 from a face image and speech: the frames a live session streams.

    Args:
        weights_dir: folder with the official weights (see :func:`edtalk_live.media.weights.find_weights`);
            None: the weights folder.
        image: any photo with a face (aligned automatically); None: the built-in portrait.
        audio: any file PyAV decodes; resampled to 16 kHz mono; one frame per whole 40 ms.
        out: the mp4 to write (H.264 + AAC); written atomically, never left half-written.
        pose_video: head motion from this clip (read at 25 fps, looped back and forth if short).
        still: keep the head pose of ``image`` (also the default when no pose video is given).
        emotion: name of an expression preset (``predefined_exp_weights/NAME.npy``); EDTalk.pt only.
            Without it (and without ``exp_video``) the avatar keeps its own expression.
        exp_video: per-frame expression from this clip; EDTalk.pt only.
        batch_size: frames per decoder call.
        device: torch device (``cpu``, ``cuda``, ``cuda:1``) for the torch and tensorrt backends.
        progress: show a tqdm progress bar on stderr.
        backend: ``torch``, ``onnxruntime`` or ``tensorrt`` (see :func:`edtalk_live.engines.create_renderer`).
        align: detect the face in ``image`` and align it to EDTalk's crop (an image that already is
            such a crop is used as it is); driving clips are cropped with one fixed box. False: take
            the image and clips as given (resized).
        face: which face to use when the photo has several (0 = the largest).
        paste_back: write frames at the photo's size, each face warped back into the photo.
        intensity: strength of ``emotion`` in [0, 2] (1: the preset itself; 0: the avatar's own
            expression), as the live session option ``intensity``.
        low_latency: the live low-latency lip sync (shorter look-ahead, causal smoothing), as the
            session option ``low_latency``.

    Raises:
        edtalk_live.InputError, edtalk_live.CheckpointError: bad inputs or weights, raised before any
            heavy work.
    """
    start = time.perf_counter()
    out = Path(out)
    inputs = _validate(
        weights_dir, image, audio, out, pose_video, still, emotion, exp_video, batch_size, device, backend,
        align=align, face=face, paste_back=paste_back, intensity=intensity,
    )
    weights, frames, dev = inputs.weights, inputs.frames, inputs.device

    model = edtalk.load_model(weights.gen, audio2lip=weights.audio2lip, device=dev)
    config = model.config
    if (emotion is not None or exp_video is not None) and not model.has_expression:
        raise InputError(f"{weights.gen} is a {config.family} model without expression (needs EDTalk.pt)")
    logger.info("rendering %d frames (%.2f s) at %dx%d with %s (%s) on %s", frames, frames / edtalk_audio.FPS,
                config.size, config.size, weights.gen.name, config.family, dev)

    renderer = engines.create_renderer(backend, model=model, device=str(dev))
    logger.info("backend: %s", renderer.describe())
    with torch.inference_mode():
        avatar = prepare_avatar(renderer, inputs.face, keep_photo=paste_back)
        lip = lips_for_audio(renderer.audio_to_lip, inputs.wav, frames, rest_lip=avatar.rest_lip,
                             config=lipsync_config(low_latency=low_latency))
        pose = avatar.rest_pose.expand(frames, -1)                                    # [T,6]
        if pose_video is not None:
            pose = pingpong(read_clip_motion(renderer, pose_video, align, batch_size, max_frames=frames).pose, frames)
        exp = avatar.expression(inputs.preset, 1.0 if intensity is None else intensity)   # [1,10] or None
        if exp_video is not None:
            exp = pingpong(read_clip_motion(renderer, exp_video, align, batch_size, max_frames=frames).exp, frames)
        # one prepared avatar for a fixed expression (EEM once); one per frame for an expression clip
        fixed = renderer.prepare_expression(avatar.source, exp) if exp is None or exp.shape[0] == 1 else None
        paste = make_paste_back(avatar, config.size, device=renderer.device) if paste_back else None

    def batches() -> Iterator[np.ndarray]:
        with tqdm(total=frames, unit="frame", disable=not progress, desc="render") as bar:
            for i in range(0, frames, batch_size):
                j = min(i + batch_size, frames)
                with torch.inference_mode():
                    per_frame = fixed or [renderer.prepare_expression(avatar.source, exp[k: k + 1])
                                          for k in range(i, j)]
                    frames_u8 = renderer.render(per_frame, lip[i:j], pose[i:j])
                    if paste is not None:
                        frames_u8 = paste(frames_u8)
                bar.update(j - i)
                yield frames_u8

    wav = edtalk_audio.fit_to_frames(inputs.wav, frames)
    written = media.write_video(out, batches(), wav, fps=edtalk_audio.FPS, sample_rate=edtalk_audio.SAMPLE_RATE)
    elapsed = time.perf_counter() - start
    summary = RenderSummary(out=out, frames=written, fps=edtalk_audio.FPS, seconds=written / edtalk_audio.FPS,
                            family=config.family, elapsed=elapsed)
    logger.info("wrote %s: %d frames, %.2f s, in %.1f s", out, written, summary.seconds, elapsed)
    return summary
