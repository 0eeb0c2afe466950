"""Faces in photos: dlib detection and landmarks, alignment onto EDTalk's crop, alignment records.

Landmarks come from dlib's HOG face detector and its 5-point shape predictor (the
``face-recognition-models`` file, CC0): outer and inner corners of both eyes and the base of the
nose, i.e. template rows 45, 42, 36, 39 and 33 of :data:`~edtalk_live.media.geometry.EDTALK_TEMPLATE`.
:func:`align_image` warps a photo by the similarity transform of those points onto the template
(:mod:`edtalk_live.media.geometry`); :func:`save_alignment_json` records the transform beside a crop.

Coordinates are pixels with pixel centres at integer positions, as dlib reports them.

dlib is imported lazily (``pip install dlib-bin face-recognition-models``); everything else is
NumPy and Pillow.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.media.geometry import (
    TEMPLATE_SIZE,
    apply_affine,
    invert_affine,
    rotation_matrix,
    scale_matrix,
    similarity_transform,
    template_points,
    warp_image,
)
from edtalk_live.media.io import atomic_write, read_image

logger = logging.getLogger(__name__)

__all__ = [
    "Alignment",
    "AlignmentRecord",
    "Face",
    "align_file",
    "align_image",
    "alignment_json_path",
    "check_rgb",
    "detect_faces",
    "detect_upright",
    "load_alignment_json",
    "save_alignment_json",
]

#: An image counts as already aligned when it is square and, scaled to 256, each eye corner lies
#: within ``ALIGNED_EYE_TOL`` px of the template and the nose within ``ALIGNED_NOSE_TOL`` px. EDTalk
#: fits 47 landmarks (jaw, brows, nose, eyes), so in its own crops the 5 points sit off the template
#: by the face's shape: up to 4.2 px for the eyes and 11 px for the nose in ``crop_identity_source.jpg``.
ALIGNED_EYE_TOL = 6.0
ALIGNED_NOSE_TOL = 16.0

#: Detection runs on a copy whose longer side is at most this (landmarks on the full photo).
DETECT_MAX_SIDE = 1280
#: Faces smaller than this (box side, px) get their landmarks on a copy enlarged up to 4 times.
LANDMARK_MIN_BOX = 160
#: Rolls tried, in this order, when the upright detector finds no face.
RETRY_ANGLES = (20.0, -20.0, 35.0, -35.0)
#: Detections scoring below this fraction of the best one in the same photo are dropped as false
#: positives (e.g. the mission patch in the astronaut portrait: 0.12 against the face's 1.16).
MIN_RELATIVE_SCORE = 0.15

_INSTALL_HINT = "face alignment needs dlib and its 5-point model: pip install dlib-bin face-recognition-models"


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Face:
    """One detected face. ``box`` (x0, y0, x1, y1) and ``landmarks`` ``[5,2]`` (x, y) are photo pixels."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float
    size: float  # side of the detector's box in photo pixels (the ordering key: largest first)
    angle: float = 0.0  # roll (degrees) of the rotated copy the face was found on; 0 = upright


@dataclass(frozen=True)
class Alignment:
    """An aligned crop and the transform that made it."""

    crop: np.ndarray  # uint8 [S,S,3]
    matrix: np.ndarray  # 2x3, photo -> crop
    inverse: np.ndarray  # 2x3, crop -> photo
    size: int
    photo_size: tuple[int, int]  # (width, height)
    face_count: int
    face_index: int
    box: tuple[float, float, float, float]
    landmarks: np.ndarray  # [5,2] in the photo
    already_aligned: bool


@dataclass(frozen=True)
class AlignmentRecord:
    """What :func:`save_alignment_json` writes beside a crop (everything but the pixels)."""

    source: str
    photo_size: tuple[int, int]
    size: int
    matrix: np.ndarray
    inverse: np.ndarray
    face_count: int
    face_index: int
    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    already_aligned: bool


# ----------------------------------------------------------------------------------------------- dlib


@lru_cache(maxsize=1)
def _dlib_models() -> tuple[Any, Any, Any]:
    """dlib, its HOG face detector and the 5-point shape predictor (loaded once per process)."""
    try:
        import dlib
    except ImportError as exc:
        raise EDTalkError(f"{_INSTALL_HINT} ({exc})") from None
    spec = importlib.util.find_spec("face_recognition_models")  # importing it needs pkg_resources: don't
    if spec is None or spec.origin is None:
        raise EDTalkError(_INSTALL_HINT)
    model = Path(spec.origin).with_name("models") / "shape_predictor_5_face_landmarks.dat"
    if not model.is_file():
        raise EDTalkError(f"{_INSTALL_HINT} (missing {model})")
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(model))


def check_rgb(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` as a contiguous RGB uint8 array ``[H,W,3]``; ValueError for anything else."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image [H,W,3], got {rgb.dtype} {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect_upright(
    rgb: np.ndarray, upsample: tuple[int, ...], max_side: int, with_landmarks: bool = True
) -> list[Face]:
    """Upright faces only: HOG detection on a copy reduced to at most ``max_side``, upsampled by the first
    count of ``upsample`` that finds a face; 5 landmarks on the full-resolution image (or none: ``[0,2]``)."""
    dlib, detector, predictor = _dlib_models()
    h, w = rgb.shape[:2]
    k = min(1.0, max_side / max(h, w))
    small = rgb if k == 1.0 else np.asarray(
        Image.fromarray(rgb).resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BILINEAR))
    kx, ky = small.shape[1] / w, small.shape[0] / h
    rects, scores = [], []
    for up in upsample:
        rects, scores, _ = detector.run(small, up, 0.0)
        if rects:
            break
    faces = []
    for rect, score in zip(rects, scores, strict=True):
        x0, y0 = (rect.left() + 0.5) / kx - 0.5, (rect.top() + 0.5) / ky - 0.5
        x1, y1 = (rect.right() + 0.5) / kx - 0.5, (rect.bottom() + 0.5) / ky - 0.5
        pts = _landmarks(rgb, (x0, y0, x1, y1), dlib, predictor) if with_landmarks else np.zeros((0, 2))
        faces.append(Face((x0, y0, x1, y1), pts, float(score), float(math.sqrt((x1 - x0) * (y1 - y0)))))
    return faces


def _landmarks(
    rgb: np.ndarray, box: tuple[float, float, float, float], dlib: Any, predictor: Any, angle: float = 0.0
) -> np.ndarray:
    """The 5 landmarks ``[5,2]`` (photo pixels) of the face in ``box``, a box on the photo turned by
    ``angle`` degrees about its centre. An upright face of at least ``LANDMARK_MIN_BOX`` px is measured
    on the photo itself; otherwise on an upright patch around it, enlarged up to 4 times, since dlib
    reports whole pixels."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0, 1.0)
    up = min(4.0, max(1.0, LANDMARK_MIN_BOX / side))
    if angle == 0.0 and up == 1.0:
        shape = predictor(rgb, dlib.rectangle(round(x0), round(y0), round(x1), round(y1)))
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
    n = math.ceil(3 * side * up)  # the patch: three face boxes wide, the face upright in its middle
    a = math.radians(angle)
    rot = up * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    m = np.zeros((2, 3))
    m[:, :2] = rot
    m[:, 2] = (n - 1) / 2 - rot @ np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    patch = warp_image(rgb, m, n, padding="zeros")
    half = side * up / 2
    c = (n - 1) / 2
    shape = predictor(patch, dlib.rectangle(round(c - half), round(c - half), round(c + half), round(c + half)))
    pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
    return apply_affine(invert_affine(m), pts)


def _detect_rotated(rgb: np.ndarray, angle: float) -> list[Face]:
    """Faces found on a copy turned by ``angle`` (reduced to at most ``DETECT_MAX_SIDE``), mapped back."""
    dlib, _, predictor = _dlib_models()
    h, w = rgb.shape[:2]
    k = min(1.0, DETECT_MAX_SIDE / max(h, w))
    m, nw, nh = rotation_matrix(angle, w, h, k)
    rotated = warp_image(rgb, m, (nw, nh), padding="zeros")
    inv = invert_affine(m)
    faces = []
    for f in detect_upright(rotated, (1,), max(nw, nh), with_landmarks=False):
        x0, y0, x1, y1 = f.box
        corners = apply_affine(inv, np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]))
        centre = corners.mean(0)
        side = f.size / k
        upright = (centre[0] - side / 2, centre[1] - side / 2, centre[0] + side / 2, centre[1] + side / 2)
        pts = _landmarks(rgb, upright, dlib, predictor, angle=angle)
        box = (corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max())
        faces.append(Face(tuple(float(v) for v in box), pts, f.score, side, angle))
    return faces


def detect_faces(rgb: np.ndarray, rotations: bool = True) -> list[Face]:
    """Faces in an RGB uint8 photo ``[H,W,3]``, largest first.

    dlib's HOG detector on a copy reduced to at most 1280 px, upsampled once (twice for images of
    at most 640 px where once finds nothing); the 5 landmarks are found on the full-resolution
    photo (small faces on an enlarged patch, for sub-pixel points). When no upright face is found
    and ``rotations`` is set, copies turned by ±20° (then ±35°) are searched and what they find is
    mapped back: heads tilted by up to about 60° are found. Detections scoring below 0.15 of the
    best one are dropped as false positives.
    """
    rgb = check_rgb(rgb)
    small_image = max(rgb.shape[:2]) <= 640
    faces = detect_upright(rgb, (1, 2) if small_image else (1,), DETECT_MAX_SIDE)
    if not faces and rotations:
        found: list[Face] = []
        for pair in range(0, len(RETRY_ANGLES), 2):  # ±20° first; ±35° only if that finds nothing
            for angle in RETRY_ANGLES[pair : pair + 2]:
                for f in _detect_rotated(rgb, angle):
                    same = [i for i, g in enumerate(found) if _iou(f.box, g.box) > 0.3]
                    if not same:
                        found.append(f)
                    elif all(f.score > found[i].score for i in same):
                        found = [g for i, g in enumerate(found) if i not in same] + [f]
            if found:
                break
        faces = found
    if faces:
        best = max(f.score for f in faces)
        faces = [f for f in faces if f.score >= MIN_RELATIVE_SCORE * best]
    return sorted(faces, key=lambda f: -f.size)


# ----------------------------------------------------------------------------------------------- images


def _is_template_crop(face: Face, width: int) -> bool:
    pts = face.landmarks * (TEMPLATE_SIZE / width)
    err = np.linalg.norm(pts - template_points(TEMPLATE_SIZE), axis=1)
    return bool((err[:4] <= ALIGNED_EYE_TOL).all() and err[4] <= ALIGNED_NOSE_TOL)


def align_image(rgb: np.ndarray, size: int = 256, face: int = 0, name: str = "image") -> Alignment:
    """Align the ``face``-th largest face of an RGB uint8 photo ``[H,W,3]`` to a ``size`` crop.

    A square image whose landmarks already lie on the template (within a few pixels at 256) is
    only resized (``already_aligned``). Otherwise the photo is warped by the least-squares
    similarity transform of its 5 landmarks onto :func:`template_points`, bilinear, filling
    outside the photo by reflection. ``name`` names the image in errors.

    Raises :class:`InputError` when there is no face or ``face`` is out of range.
    """
    rgb = check_rgb(rgb)
    if size < 16:
        raise InputError(f"crop size must be at least 16, got {size}")
    faces = detect_faces(rgb)
    if not faces:
        raise InputError(f"{name}: no face found")
    if not 0 <= face < len(faces):
        raise InputError(f"{name}: face {face} requested but {len(faces)} face(s) found (0 is the largest)")
    chosen = faces[face]
    h, w = rgb.shape[:2]
    if w == h and _is_template_crop(chosen, w):
        matrix = scale_matrix(size / w, size / h)
        crop = rgb if w == size else np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.LANCZOS))
        already = True
    else:
        matrix = similarity_transform(chosen.landmarks, template_points(size))
        crop = warp_image(rgb, matrix, size)
        already = False
    logger.info("%s: %d face(s), using face %d%s", name, len(faces), face, " (already aligned)" if already else "")
    return Alignment(
        crop=crop, matrix=matrix, inverse=invert_affine(matrix), size=size, photo_size=(w, h),
        face_count=len(faces), face_index=face, box=chosen.box, landmarks=chosen.landmarks, already_aligned=already,
    )


def align_file(path: str | os.PathLike[str], size: int = 256, face: int = 0) -> Alignment:
    """:func:`align_image` of an image file (errors name the file)."""
    return align_image(read_image(path), size=size, face=face, name=str(path))


# ----------------------------------------------------------------------------------------------- records


def _record_dict(alignment: Alignment | AlignmentRecord, source: str) -> dict[str, Any]:
    return {
        "source": source,
        "photo_size": list(alignment.photo_size),
        "size": alignment.size,
        "template": "EDTalk M003_template.npy, 5-point rows [45, 42, 36, 39, 33]",
        "coordinates": "pixels, pixel centres at integer positions; crop = matrix @ [x, y, 1]",
        "matrix": np.asarray(alignment.matrix).tolist(),
        "inverse": np.asarray(alignment.inverse).tolist(),
        "face_count": alignment.face_count,
        "face_index": alignment.face_index,
        "box": [float(v) for v in alignment.box],
        "landmarks": np.asarray(alignment.landmarks).tolist(),
        "already_aligned": alignment.already_aligned,
    }


def alignment_json_path(crop_path: str | os.PathLike[str]) -> Path:
    """Where the transform of a crop is written: ``face.png`` -> ``face.json``."""
    return Path(crop_path).with_suffix(".json")


def save_alignment_json(
    path: str | os.PathLike[str], alignment: Alignment, source_path: str | os.PathLike[str] | None, size: int
) -> Path:
    """Write the transform (photo size, crop size, matrix, inverse, face, landmarks) as JSON at ``path``."""
    if size != alignment.size:
        raise ValueError(f"alignment was made for size {alignment.size}, not {size}")
    path = Path(path)
    text = json.dumps(_record_dict(alignment, str(source_path) if source_path is not None else ""), indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
    return path


def load_alignment_json(path: str | os.PathLike[str]) -> AlignmentRecord:
    """Read what :func:`save_alignment_json` wrote."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        return AlignmentRecord(
            source=str(d["source"]),
            photo_size=(int(d["photo_size"][0]), int(d["photo_size"][1])),
            size=int(d["size"]),
            matrix=np.asarray(d["matrix"], dtype=np.float64).reshape(2, 3),
            inverse=np.asarray(d["inverse"], dtype=np.float64).reshape(2, 3),
            face_count=int(d["face_count"]),
            face_index=int(d["face_index"]),
            box=tuple(float(v) for v in d["box"]),
            landmarks=np.asarray(d["landmarks"], dtype=np.float64).reshape(-1, 2),
            already_aligned=bool(d["already_aligned"]),
        )
    except FileNotFoundError:
        raise InputError(f"alignment file not found: {path}") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise InputError(f"not an alignment file: {path} ({type(exc).__name__}: {exc})") from None

