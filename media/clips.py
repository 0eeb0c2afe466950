"""Driving clips: decoding at 25 fps, one fixed square face box per clip, cropping, writing the cropped clip.

Clips that drive pose or expression are never aligned frame by frame (that would erase the head
motion they carry): one fixed square box for the whole clip, the union of the per-frame face boxes
(:func:`edtalk_live.media.faces.detect_upright`) enlarged as EDTalk's ``crop_video.py`` does, and a
resampling to 25 fps.

Coordinates are pixels with pixel centres at integer positions (``(0, 0)`` is the centre of the
top-left pixel); a box ``(x0, y0, x1, y1)`` gives its outer pixel edges in those coordinates.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.timing import FPS
from edtalk_live.media.faces import check_rgb, detect_upright
from edtalk_live.media.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "ClipBox",
    "clip_box",
    "crop_clip",
    "find_clip_box",
    "iter_video",
    "prepare_video",
]

#: Clip boxes. EDTalk's ``crop_video.py`` grows the union of the per-frame boxes of its (SFD) face
#: detector by ``increase_area=0.1`` on each side into a square. dlib's HOG boxes are tighter than
#: SFD's: on EDTalk's own cropped clips the frame is 1.3-1.65 times the union of the HOG boxes
#: (measured on ``mouth_source``, ``pose_source1/2``, ``expression_source``), so the union is first
#: grown by ``HOG_TO_SFD`` and then by EDTalk's 10 % per side: a square of 1.5 × its longer side.
CLIP_INCREASE = 0.1
HOG_TO_SFD = 1.25
#: A clip whose box is within 20 % of its own square frame, centred, is taken as already cropped.
CLIP_ALREADY_CROPPED_TOL = 0.2
CLIP_DETECTIONS = 50


@dataclass(frozen=True)
class ClipBox:
    """The one square crop box of a clip (x0, y0, x1, y1, may reach outside the frame)."""

    box: tuple[float, float, float, float]
    frame_size: tuple[int, int]  # (width, height)
    frames_sampled: int
    faces_found: int
    already_cropped: bool  # the clip is already a face crop: the box is the whole frame


# ----------------------------------------------------------------------------------------------- decoding


def _open_video(path: Path):
    import av

    if not path.is_file():
        raise InputError(f"video file not found: {path}")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read video file {path}: {' '.join(str(exc).split())}") from exc
    if not container.streams.video:
        container.close()
        raise InputError(f"no video stream in {path}")
    return container


def _video_frame_count(stream) -> int | None:
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration is not None and stream.time_base is not None and rate:
        return int(float(stream.duration * stream.time_base) * float(rate))
    return None


def iter_video(path: str | os.PathLike[str], fps: int | None) -> Iterator[np.ndarray]:
    """RGB uint8 frames ``[H,W,3]`` of a video; with ``fps``, resampled by timestamp.

    Resampled output frame ``k`` is the source frame nearest to time ``k / fps`` counted from the
    first frame: a 30 fps clip drops every sixth frame, a 25 fps clip passes through unchanged.
    ``fps=None``: every decoded frame. The one implementation of this rule in the project
    (:func:`edtalk_live.media.io.iter_video_frames` resizes its frames).
    """
    import av

    path = Path(path)
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if fps is None:
            n = 0
            for frame in container.decode(stream):
                n += 1
                yield frame.to_ndarray(format="rgb24")
            if n == 0:
                raise InputError(f"video has no frames: {path}")
            return
        tick = Fraction(1, fps)
        rate = stream.average_rate or stream.guessed_rate or Fraction(fps)
        last_step = nominal = 1 / Fraction(rate)
        emitted, index = 0, 0
        t0: Fraction | None = None
        prev: tuple[Fraction, Any] | None = None

        def emit_until(limit: Fraction, frame) -> Iterator[np.ndarray]:
            nonlocal emitted
            array = None
            while emitted * tick < limit:
                if array is None:
                    array = frame.to_ndarray(format="rgb24")
                yield array
                emitted += 1

        for frame in container.decode(stream):
            if frame.pts is not None and frame.time_base is not None:
                t = Fraction(frame.pts) * Fraction(frame.time_base)
            else:
                t = index * nominal
            index += 1
            if t0 is None:
                t0 = t
            t -= t0
            if prev is not None:
                if t <= prev[0]:
                    continue
                last_step = t - prev[0]
                yield from emit_until((prev[0] + t) / 2, prev[1])
            prev = (t, frame)
        if prev is None:
            raise InputError(f"video has no frames: {path}")
        yield from emit_until(prev[0] + last_step, prev[1])
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode video file {path}: {' '.join(str(exc).split())}") from exc
    finally:
        container.close()


# ----------------------------------------------------------------------------------------------- boxes and crops


def clip_box(frames: Iterable[np.ndarray], stride: int = 1, name: str = "clip") -> ClipBox:
    """The fixed square crop box of a clip from its frames (RGB uint8 ``[H,W,3]``).

    Faces are detected on every ``stride``-th frame (the largest face of each); their boxes'
    union, grown to an SFD-like box and then as EDTalk's ``crop_video.py`` does (10 % on each
    side, square, centred on the union), is the box. A square clip whose box is about its whole
    frame is already a face crop and keeps its frame. Raises :class:`InputError` when no sampled
    frame has a face.
    """
    union: list[float] | None = None
    sampled = found = 0
    frame_size = (0, 0)
    for i, frame in enumerate(frames):
        if i % max(1, stride):
            continue
        frame = check_rgb(frame)
        frame_size = (frame.shape[1], frame.shape[0])
        sampled += 1
        small_frame = max(frame.shape[:2]) <= 640
        faces = detect_upright(frame, (0, 1) if small_frame else (0,), 960, with_landmarks=False)
        if not faces:
            continue
        found += 1
        b = max(faces, key=lambda f: f.size).box
        union = list(b) if union is None else [min(union[0], b[0]), min(union[1], b[1]),
                                               max(union[2], b[2]), max(union[3], b[3])]
    if union is None:
        raise InputError(f"{name}: no face found in {sampled} sampled frame(s)")
    w, h = frame_size
    cx, cy = (union[0] + union[2]) / 2, (union[1] + union[3]) / 2
    side = max(union[2] - union[0], union[3] - union[1]) * HOG_TO_SFD * (1 + 2 * CLIP_INCREASE)
    already = (
        w == h
        and abs(side - w) <= CLIP_ALREADY_CROPPED_TOL * w
        and max(abs(cx - (w - 1) / 2), abs(cy - (h - 1) / 2)) <= 0.1 * w
    )
    if already:
        box = (-0.5, -0.5, w - 0.5, h - 0.5)
    else:
        x0, y0 = cx - side / 2, cy - side / 2
        if side <= w:  # slide a box that fits into the frame rather than pad it
            x0 = min(max(x0, -0.5), w - 0.5 - side)
        if side <= h:
            y0 = min(max(y0, -0.5), h - 0.5 - side)
        box = (x0, y0, x0 + side, y0 + side)
    logger.info("%s: box %s from %d face(s) in %d sampled frame(s)%s", name, tuple(round(v, 1) for v in box),
                found, sampled, " (already cropped)" if already else "")
    return ClipBox(tuple(float(v) for v in box), frame_size, sampled, found, already)


def _crop_frame(frame: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Crop ``box`` (pixel-edge coordinates, may reach outside: reflected) and resize to ``size`` (Lanczos)."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = box
    # the box edges in PIL's convention (pixel edges at integers)
    ex0, ey0, ex1, ey1 = x0 + 0.5, y0 + 0.5, x1 + 0.5, y1 + 0.5
    pl, pt = max(0, math.ceil(-ex0)), max(0, math.ceil(-ey0))
    pr, pb = max(0, math.ceil(ex1 - w)), max(0, math.ceil(ey1 - h))
    if pl or pt or pr or pb:
        frame = np.pad(frame, ((pt, pb), (pl, pr), (0, 0)), mode="symmetric")  # mirror about the edge
        ex0, ex1, ey0, ey1 = ex0 + pl, ex1 + pl, ey0 + pt, ey1 + pt
    img = Image.fromarray(np.ascontiguousarray(frame))
    if (ex0, ey0, ex1, ey1) == (0, 0, img.width, img.height) and img.size == (size, size):
        return np.asarray(img)
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS, box=(ex0, ey0, ex1, ey1)))


def _stride_for(path: Path) -> int:
    container = _open_video(path)
    try:
        count = _video_frame_count(container.streams.video[0])
    finally:
        container.close()
    return max(1, (count or 5 * CLIP_DETECTIONS) // CLIP_DETECTIONS)


def find_clip_box(path: str | os.PathLike[str]) -> ClipBox:
    """:func:`clip_box` of a video file, sampling about 50 frames spread over the clip."""
    path = Path(path)
    return clip_box(iter_video(path, None), stride=_stride_for(path), name=str(path))


def crop_clip(
    path: str | os.PathLike[str], size: int, fps: int = FPS, box: ClipBox | None = None
) -> Iterator[np.ndarray]:
    """The frames of a driving clip cropped with one fixed square box, RGB uint8 ``[size,size,3]`` at ``fps``.

    The box (:func:`find_clip_box`, computed first unless given) is the same for every frame, so
    the head moves inside the crop as it does in the clip. Frames are resampled to ``fps`` by
    timestamp; parts of the box outside the frame are filled by reflection.
    """
    box = box or find_clip_box(path)
    for frame in iter_video(path, fps):
        yield _crop_frame(frame, box.box, size)


# ----------------------------------------------------------------------------------------------- writing


def _read_audio(path: Path) -> tuple[np.ndarray, int, str] | None:
    """All audio of a file as float32 planar ``[C,N]`` (mono or stereo), its rate and layout; None if silent."""
    import av

    container = _open_video(path)
    try:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        layout = "mono" if stream.codec_context.channels == 1 else "stereo"
        rate = stream.codec_context.sample_rate or 48000
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = []
        for frame in container.decode(stream):
            frame.pts = None
            chunks += [f.to_ndarray() for f in resampler.resample(frame)]
        chunks += [f.to_ndarray() for f in resampler.resample(None)]
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode the audio of {path}: {' '.join(str(exc).split())}") from exc
    finally:
        container.close()
    if not chunks:
        return None
    return np.concatenate(chunks, axis=1).astype(np.float32), rate, layout


def prepare_video(
    in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], size: int = 256, fps: int = FPS, crf: int = 18
) -> ClipBox:
    """Write a driving clip cropped with one fixed box (:func:`crop_clip`) as an H.264 mp4 at ``fps``.

    The audio of the clip, if any, is kept (re-encoded as AAC, mono or stereo at its own rate).
    The file is written to a temporary file beside ``out_path`` and renamed at the end: a failure
    leaves no output. Returns the box used.
    """
    import av

    in_path, out_path = Path(in_path), Path(out_path)
    if size % 2:
        raise InputError(f"video size must be even for H.264 (yuv420p), got {size}")
    if not out_path.parent.is_dir():
        raise InputError(f"output folder does not exist: {out_path.parent}")
    box = find_clip_box(in_path)
    audio = _read_audio(in_path)

    def write(tmp: Path) -> None:
        frames = 0
        with av.open(str(tmp), mode="w", format="mp4") as out:
            video = out.add_stream("libx264", rate=fps)
            video.width = video.height = size
            video.pix_fmt = "yuv420p"
            video.codec_context.time_base = Fraction(1, fps)
            video.options = {"crf": str(crf), "preset": "medium"}
            a_stream = None
            if audio is not None:
                samples, rate, layout = audio
                a_stream = out.add_stream("aac", rate=rate)
                a_stream.layout = layout
                a_stream.codec_context.time_base = Fraction(1, rate)
            a_pos = 0

            def write_audio(end: int) -> None:
                nonlocal a_pos
                if a_stream is None or end <= a_pos:
                    return
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, a_pos:end]), format="fltp",
                                                   layout=layout)
                frame.sample_rate = rate
                frame.pts = a_pos
                frame.time_base = Fraction(1, rate)
                out.mux(a_stream.encode(frame))
                a_pos = end

            for rgb in crop_clip(in_path, size, fps=fps, box=box):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = frames
                out.mux(video.encode(frame))
                frames += 1
                if audio is not None:
                    write_audio(min(samples.shape[1], frames * rate // fps))
            if audio is not None:
                write_audio(samples.shape[1])
                out.mux(a_stream.encode(None))
            out.mux(video.encode(None))
        logger.info("wrote %d frames at %d fps", frames, fps)

    try:
        atomic_write(out_path, write)
    except av.FFmpegError as exc:
        raise InputError(f"cannot write {out_path}: {' '.join(str(exc).split())}") from exc
    return box
