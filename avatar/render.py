"""Offline rendering: one face image + speech audio -> a talking-face mp4 (the ``render`` command).

Pipeline (everything once, except the decoder which runs per batch of frames)::

    image --encode--> Source (once)          audio --mel--> windows --Audio2Lip--> smooth --> lip [T,20]
    pose video / the image itself --read_motion--> pose [T,6] or [1,6]
    emotion preset / exp video / the image itself --> exp [1,10] or [T,10]   (EDTalk.pt family only)
    render(src, lip, pose, exp) in batches --> uint8 frames --> H.264 + AAC mp4 (streamed, atomic)

T is the number of whole 25 fps frames in the audio (640 samples each); the audio written to the
mp4 is cut to exactly those frames, so picture and sound have the same length.
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
from PIL import Image
from tqdm import tqdm

import edtalk_live.edtalk as edtalk
import edtalk_live.engines as engines
from edtalk_live.edtalk import audio as edtalk_audio
from edtalk_live.edtalk.errors import InputError
from edtalk_live.media import io as media
from edtalk_live.media.weights import WeightFiles, find_weights, load_preset

logger = logging.getLogger(__name__)

__all__ = ["RenderSummary", "pingpong", "render_file"]


@dataclass(frozen=True)
class RenderSummary:
    """What :func:`render_file` wrote."""

    out: Path
    frames: int
    fps: int
    seconds: float
    family: str
    elapsed: float  # wall-clock seconds, validation to the finished file


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


@dataclass(frozen=True)
class _Inputs:
    """Validated inputs, decoded before the model is loaded."""

    weights: WeightFiles
    image: Image.Image
    photo: np.ndarray                      # uint8 [H,W,3] RGB of the identity image
    alignment: object | None               # edtalk.align.Alignment at 256 (None with align=False)
    wav: np.ndarray
    frames: int
    device: torch.device
    preset: torch.Tensor | None  # [1,10] expression coefficients of --emotion


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
) -> _Inputs:
    """Check every input cheaply, in the order a user would fix them; raise a one-line error."""
    if pose_video is not None and still:
        raise InputError("--pose-video and --still cannot be used together")
    if emotion is not None and exp_video is not None:
        raise InputError("--emotion and --exp-video cannot be used together")
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
    if image is None:
        from edtalk_live.avatar.assets import DEFAULT_AVATAR

        image = DEFAULT_AVATAR
    img = media.open_image(image)
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)          # phones store photos sideways with an EXIF rotation
    photo = np.asarray(img.convert("RGB"))
    alignment = None
    if align:
        from edtalk_live.media.faces import align_image

        alignment = align_image(photo, size=256, face=face, name=str(image))   # detection: fails fast
    elif face:
        raise InputError("--face needs alignment (drop --no-align)")
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
    return _Inputs(weights=weights, image=img, photo=photo, alignment=alignment, wav=wav, frames=frames, device=dev,
                   preset=preset)


def _identity_crop(inputs: _Inputs, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The network input ``uint8 [S,S,3]`` and the 2x3 photo -> crop matrix."""
    h, w = inputs.photo.shape[:2]
    a = inputs.alignment
    if a is None or a.already_aligned:
        crop = np.asarray(inputs.image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))
        return crop, np.array([[size / w, 0, 0.5 * size / w - 0.5], [0, size / h, 0.5 * size / h - 0.5]])
    from edtalk_live.media.geometry import warp_image

    matrix = np.asarray(a.matrix, np.float64) * (size / a.size)     # the 256 alignment, scaled to the model size
    matrix[:, 2] += 0.5 * (size / a.size) - 0.5                      # pixel centres stay pixel centres
    return warp_image(inputs.photo, matrix, size), matrix


@torch.inference_mode()
def _lip_from_audio(renderer: engines.Renderer, wav: np.ndarray, frames: int) -> torch.Tensor:
    """16 kHz audio cut to ``frames`` frames -> smoothed mouth coefficients ``[T,20]``."""
    windows = edtalk_audio.mel_windows(edtalk_audio.melspectrogram(wav), frames)
    return edtalk_audio.smooth(renderer.audio_to_lip(windows))


@torch.inference_mode()
def _motion_from_video(
    renderer: engines.Renderer,
    path: str | os.PathLike[str],
    frames: int,
    batch_size: int,
    align: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pose ``[T,6]`` and expression ``[T,10]`` (or None) of a driving clip, ping-pong extended to T.

    With ``align`` the clip is cropped with one fixed square box around the face over the whole clip
    (never frame by frame, which would erase the head motion); otherwise it is only resized.
    """
    size = renderer.config.size
    poses: list[torch.Tensor] = []
    exps: list[torch.Tensor] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        motion = renderer.read_motion(media.uint8_to_tensor(np.stack(batch)))
        poses.append(motion.pose)
        if motion.exp is not None:
            exps.append(motion.exp)
        batch.clear()

    if align:
        import itertools

        from edtalk_live.media.clips import crop_clip

        source = itertools.islice(crop_clip(path, size, fps=edtalk_audio.FPS), frames)
    else:
        source = media.iter_video_frames(path, size, fps=edtalk_audio.FPS, max_frames=frames)
    for frame in source:
        batch.append(frame)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    n = sum(p.shape[0] for p in poses)
    if n < frames:
        logger.info("%s has %d frames for %d: playing it back and forth", path, n, frames)
    pose = pingpong(torch.cat(poses), frames)
    exp = pingpong(torch.cat(exps), frames) if exps else None
    return pose, exp


def render_file(
    weights_dir: str | os.PathLike[str],
    image: str | os.PathLike[str],
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
) -> RenderSummary:
    """Render a talking-face mp4 from a face image and speech.

    Args:
        weights_dir: folder with the official weights (see :func:`edtalk.weights.find_weights`).
        image: a face filling a square crop (EDTalk's alignment); resized to the model size.
        audio: any file PyAV decodes; resampled to 16 kHz mono and cut to whole 25 fps frames.
        out: the mp4 to write (H.264 + AAC); written atomically, never left half-written.
        pose_video: head motion from this clip (read at 25 fps, looped back and forth if short).
        still: keep the head pose of ``image`` (also the default when no pose video is given).
        emotion: name of an expression preset (``predefined_exp_weights/NAME.npy``); EDTalk.pt only.
        exp_video: per-frame expression from this clip; EDTalk.pt only.
        batch_size: frames per decoder call.
        device: torch device (``cpu``, ``cuda``, ``cuda:1``) for the torch and tensorrt backends.
        progress: show a tqdm progress bar on stderr.
        backend: ``torch``, ``onnxruntime`` or ``tensorrt`` (see :func:`engines.create_renderer`); the
            ONNX-based backends export the graphs into the cache on first use.
        align: detect the face in ``image`` and align it to EDTalk's crop (an image that already is
            such a crop is used as it is); driving clips are cropped with one fixed box. False: take
            the image and clips as given (resized).
        face: which face to use when the photo has several (0 = the largest).
        paste_back: write frames at the photo's size, each face warped back into the photo.

    Raises:
        edtalk.errors.InputError, edtalk.errors.CheckpointError: bad inputs or weights, raised
            before any heavy work.
    """
    start = time.perf_counter()
    out = Path(out)
    inputs = _validate(
        weights_dir, image, audio, out, pose_video, still, emotion, exp_video, batch_size, device, backend,
        align=align, face=face, paste_back=paste_back,
    )
    weights, frames, dev = inputs.weights, inputs.frames, inputs.device
    wav = edtalk_audio.fit_to_frames(inputs.wav, frames)

    model = edtalk.load_model(weights.gen, audio2lip=weights.audio2lip, device=dev)
    config = model.config
    if (emotion is not None or exp_video is not None) and not model.has_expression:
        raise InputError(f"{weights.gen} is a {config.family} model without expression (needs EDTalk.pt)")
    logger.info(
        "rendering %d frames (%.2f s) at %dx%d with %s (%s) on %s",
        frames,
        frames / edtalk_audio.FPS,
        config.size,
        config.size,
        weights.gen.name,
        config.family,
        dev,
    )

    renderer = engines.create_renderer(backend, model=model, device=str(dev))
    logger.info("backend: %s", renderer.describe())
    with torch.inference_mode():
        crop, matrix = _identity_crop(inputs, config.size)
        src_img = media.uint8_to_tensor(crop[None])
        own = renderer.read_motion(src_img)
        src = renderer.prepare_source(src_img)
        lip = _lip_from_audio(renderer, wav, frames)

        video_pose = video_exp = None
        if pose_video is not None:
            video_pose, _ = _motion_from_video(renderer, pose_video, frames, batch_size, align)
        if exp_video is not None:
            _, video_exp = _motion_from_video(renderer, exp_video, frames, batch_size, align)
        pose = video_pose if video_pose is not None else own.pose.expand(frames, -1)  # [T,6]
        exp: torch.Tensor | None = None
        if model.has_expression:
            if inputs.preset is not None:
                exp = inputs.preset  # [1,10]
            elif video_exp is not None:
                exp = video_exp  # [T,10]
            else:
                exp = own.exp  # [1,10]
        # one prepared avatar for a fixed expression (EEM once); one per frame for an expression clip
        fixed = renderer.prepare_expression(src, exp) if exp is None or exp.shape[0] == 1 else None
        paste = None
        if paste_back:
            from edtalk_live.engines.pasteback import PasteBack

            h, w = inputs.photo.shape[:2]
            photo = inputs.photo[: h - h % 2, : w - w % 2]          # yuv420p needs even sizes
            paste = PasteBack(photo, matrix, config.size, device=dev)

    def batches() -> Iterator[np.ndarray]:
        with tqdm(total=frames, unit="frame", disable=not progress, desc="render") as bar:
            for i in range(0, frames, batch_size):
                j = min(i + batch_size, frames)
                with torch.inference_mode():
                    avatar = fixed or [renderer.prepare_expression(src, exp[k: k + 1]) for k in range(i, j)]
                    frames_u8 = renderer.render(avatar, lip[i:j], pose[i:j])
                    if paste is not None:
                        frames_u8 = paste(frames_u8)
                bar.update(j - i)
                yield frames_u8

    written = media.write_video(
        out, batches(), wav, fps=edtalk_audio.FPS, sample_rate=edtalk_audio.SAMPLE_RATE
    )
    elapsed = time.perf_counter() - start
    summary = RenderSummary(
        out=out,
        frames=written,
        fps=edtalk_audio.FPS,
        seconds=written / edtalk_audio.FPS,
        family=config.family,
        elapsed=elapsed,
    )
    logger.info("wrote %s: %d frames, %.2f s, in %.1f s", out, written, summary.seconds, elapsed)
    return summary
