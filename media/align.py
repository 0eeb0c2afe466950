"""Face alignment: ordinary photos and clips -> the square crops the EDTalk networks expect.

Images are aligned the way EDTalk's own preprocessing aligns them: a similarity transform
(rotation, uniform scale, translation; never a reflection) from the photo's landmarks onto
EDTalk's landmark template, then a warp to ``size``×``size``. Landmarks come from dlib's HOG face
detector and its 5-point shape predictor (the ``face-recognition-models`` file, CC0): outer and
inner corners of both eyes and the base of the nose, i.e. template rows 45, 42, 36, 39 and 33.
What lies outside the photo is filled by reflection.

Clips that drive pose or expression are never aligned frame by frame (that would erase the head
motion they carry): one fixed square box for the whole clip, the union of the per-frame face boxes
enlarged as EDTalk's ``crop_video.py`` does, and a resampling to 25 fps.

Coordinates are pixels with pixel centres at integer positions (``(0, 0)`` is the centre of the
top-left pixel), as dlib reports them; a 2×3 ``matrix`` maps a photo point ``p`` (x, y) to
``matrix[:, :2] @ p + matrix[:, 2]`` in the crop.

dlib is imported lazily (``pip install dlib-bin face-recognition-models``); everything else is
NumPy, Pillow, PyTorch and PyAV.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from edtalk_live.edtalk.errors import EDTalkError, InputError

logger = logging.getLogger(__name__)

__all__ = [
    "Alignment",
    "AlignmentRecord",
    "ClipBox",
    "EDTALK_TEMPLATE",
    "Face",
    "align_file",
    "align_image",
    "alignment_json_path",
    "apply_affine",
    "clip_box",
    "crop_clip",
    "detect_faces",
    "find_clip_box",
    "invert_affine",
    "load_alignment_json",
    "main_prepare",
    "prepare_video",
    "read_image",
    "save_alignment_json",
    "similarity_transform",
    "template_points",
    "warp_image",
]

#: EDTalk's landmark template (``data_preprocess/M003_template.npy`` of the EDTalk repository,
#: Apache-2.0): 68 points (x, y) in a 256×256 crop, in the usual 68-point order (0-16 jaw,
#: 17-26 brows, 27-35 nose, 36-47 eyes, 48-67 mouth).
EDTALK_TEMPLATE = np.array(
    [
        [61, 119], [62, 137], [65, 156], [69, 173], [75, 189], [86, 203], [101, 213], [117, 221],
        [135, 224], [152, 221], [165, 211], [175, 199], [183, 184], [187, 168], [189, 151], [192, 135],
        [194, 118], [77, 109], [87, 99], [102, 95], [117, 96], [132, 101], [146, 101], [159, 98],
        [171, 97], [183, 100], [190, 110], [140, 111], [140, 121], [142, 132], [143, 143], [127, 154],
        [134, 155], [141, 157], [147, 155], [152, 153], [94, 114], [102, 109], [111, 109], [118, 114],
        [111, 116], [102, 116], [154, 115], [161, 109], [170, 110], [176, 114], [170, 117], [162, 116],
        [112, 180], [123, 175], [133, 172], [139, 174], [146, 172], [155, 175], [161, 180], [154, 187],
        [146, 190], [139, 190], [132, 189], [122, 186], [117, 180], [132, 178], [139, 178], [146, 178],
        [158, 180], [146, 181], [139, 181], [132, 181],
    ],
    dtype=np.float64,
)
EDTALK_TEMPLATE.setflags(write=False)

#: Template rows matching dlib's 5 points, in dlib's order: outer/inner corner of the subject's left
#: eye (image right), outer/inner corner of the right eye (image left), base of the nose.
FIVE_POINT_ROWS = (45, 42, 36, 39, 33)
TEMPLATE_SIZE = 256

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


@dataclass(frozen=True)
class ClipBox:
    """The one square crop box of a clip (x0, y0, x1, y1, may reach outside the frame)."""

    box: tuple[float, float, float, float]
    frame_size: tuple[int, int]  # (width, height)
    frames_sampled: int
    faces_found: int
    already_cropped: bool  # the clip is already a face crop: the box is the whole frame


# ----------------------------------------------------------------------------------------------- geometry


def template_points(size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The template's 5 points ``[5,2]`` (x, y) matching dlib's 5-point model, for a ``size`` crop."""
    return EDTALK_TEMPLATE[list(FIVE_POINT_ROWS)] * (size / TEMPLATE_SIZE)


def similarity_transform(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991, no reflection) mapping ``src`` onto ``dst``.

    ``src_pts``, ``dst_pts``: ``[N,2]`` (x, y), N ≥ 2. Returns the 2×3 matrix ``M`` minimising
    ``sum |M[:, :2] @ src + M[:, 2] - dst|²`` over rotation, uniform scale and translation.
    """
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"expected two point sets [N,2] of equal shape, N >= 2; got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("source points are all the same point")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = float((sig * sign).sum() / var_s)
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2×3 affine matrix."""
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points ``[N,2]`` (x, y) with a 2×3 matrix."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 2×3 matrix of ``a ∘ b`` (first ``b``, then ``a``)."""
    full = lambda m: np.vstack([m, [0.0, 0.0, 1.0]])  # noqa: E731
    return (full(a) @ full(b))[:2]


def _scale_matrix(kx: float, ky: float) -> np.ndarray:
    """Pixel-centre mapping of a resize by (kx, ky): ``p' = (p + 0.5) * k - 0.5``."""
    return np.array([[kx, 0.0, 0.5 * kx - 0.5], [0.0, ky, 0.5 * ky - 0.5]])


def _needed_range(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Source pixels a reflecting sampler reads for coordinates in [lo, hi] of an axis of length n."""
    if lo < -n or hi > 2 * n - 1:  # more than one reflection: keep everything
        return 0, n
    a, b = lo, hi
    if lo < -0.5:
        b = max(b, -1.0 - lo)
    if hi > n - 0.5:
        a = min(a, 2.0 * n - 1.0 - hi)
    return max(0, math.floor(a) - 2), min(n, math.ceil(b) + 3)


def warp_image(
    rgb: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int], padding: str = "reflection"
) -> np.ndarray:
    """Warp a photo (uint8 ``[H,W,3]``) into a ``size`` output with a 2×3 photo -> output matrix.

    Bilinear sampling (``grid_sample``, ``align_corners=False``); outside the photo, ``padding``
    (``reflection`` or ``zeros``). When the warp shrinks the photo, it is first reduced with a
    Lanczos filter so the output does not alias. ``size`` is S or (width, height).
    """
    out_w, out_h = (size, size) if isinstance(size, int) else size
    matrix = np.asarray(matrix, dtype=np.float64)
    h, w = rgb.shape[:2]
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    img = rgb
    if scale < 0.8:  # antialias: reduce first, warp at about unit scale
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.LANCZOS))
        matrix = _compose(matrix, _scale_matrix(w / nw, h / nh))
        h, w = nh, nw
    inv = invert_affine(matrix)
    # only the part of the photo the sampler can read goes to torch; the cut never removes an edge
    # the sampler reflects about (see _needed_range), so reflection stays exact
    corners = apply_affine(inv, np.array([[-0.5, -0.5], [out_w - 0.5, -0.5], [-0.5, out_h - 0.5],
                                          [out_w - 0.5, out_h - 0.5]]))
    x0, x1 = _needed_range(corners[:, 0].min(), corners[:, 0].max(), w)
    y0, y1 = _needed_range(corners[:, 1].min(), corners[:, 1].max(), h)
    if x1 - x0 < 2 or y1 - y0 < 2:  # degenerate: sample the whole photo
        x0, x1, y0, y1 = 0, w, 0, h
    part = np.array(img[y0:y1, x0:x1])  # a writable copy for torch
    inv = inv.copy()
    inv[:, 2] -= (x0, y0)
    ph, pw = part.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(out_h, dtype=torch.float64), torch.arange(out_w, dtype=torch.float64),
                            indexing="ij")
    inv_t = torch.from_numpy(inv)
    sx = inv_t[0, 0] * xs + inv_t[0, 1] * ys + inv_t[0, 2]
    sy = inv_t[1, 0] * xs + inv_t[1, 1] * ys + inv_t[1, 2]
    grid = torch.stack([(2 * sx + 1) / pw - 1, (2 * sy + 1) / ph - 1], dim=-1)[None].float()
    src = torch.from_numpy(part).permute(2, 0, 1)[None].float()
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


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


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
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


def _detect_upright(
    rgb: np.ndarray, upsample: tuple[int, ...], max_side: int, with_landmarks: bool = True
) -> list[Face]:
    """HOG detection on a reduced copy, 5 landmarks on the full-resolution image (or none: ``[0,2]``)."""
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


def _rotation(angle: float, w: int, h: int, scale: float = 1.0) -> tuple[np.ndarray, int, int]:
    """Matrix scaling, then turning an image by ``angle`` degrees (counter-clockwise on screen) into an
    expanded canvas of (width, height)."""
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    nw = math.ceil((abs(w * c) + abs(h * s)) * scale)
    nh = math.ceil((abs(w * s) + abs(h * c)) * scale)
    # y points down: a counter-clockwise turn on screen is [[c, s], [-s, c]]
    rot = scale * np.array([[c, s], [-s, c]])
    centre_in = np.array([(w - 1) / 2, (h - 1) / 2])
    centre_out = np.array([(nw - 1) / 2, (nh - 1) / 2])
    m = np.zeros((2, 3))
    m[:, :2] = rot
    m[:, 2] = centre_out - rot @ centre_in
    return m, nw, nh


def _detect_rotated(rgb: np.ndarray, angle: float) -> list[Face]:
    """Faces found on a copy turned by ``angle`` (reduced to at most ``DETECT_MAX_SIDE``), mapped back."""
    dlib, _, predictor = _dlib_models()
    h, w = rgb.shape[:2]
    k = min(1.0, DETECT_MAX_SIDE / max(h, w))
    m, nw, nh = _rotation(angle, w, h, k)
    rotated = warp_image(rgb, m, (nw, nh), padding="zeros")
    inv = invert_affine(m)
    faces = []
    for f in _detect_upright(rotated, (1,), max(nw, nh), with_landmarks=False):
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
    rgb = _check_rgb(rgb)
    small_image = max(rgb.shape[:2]) <= 640
    faces = _detect_upright(rgb, (1, 2) if small_image else (1,), DETECT_MAX_SIDE)
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
    rgb = _check_rgb(rgb)
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
        matrix = _scale_matrix(size / w, size / h)
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


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as RGB uint8 ``[H,W,3]``, upright per its EXIF orientation."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"not a readable image: {path} ({' '.join(str(exc).split())})") from exc


def align_file(path: str | os.PathLike[str], size: int = 256, face: int = 0) -> Alignment:
    """:func:`align_image` of an image file (errors name the file)."""
    return align_image(read_image(path), size=size, face=face, name=str(path))


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


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` into a hidden file beside ``path``, renamed onto it only if that succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the output the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_alignment_json(
    path: str | os.PathLike[str], alignment: Alignment, source_path: str | os.PathLike[str] | None, size: int
) -> Path:
    """Write the transform (photo size, crop size, matrix, inverse, face, landmarks) as JSON at ``path``."""
    if size != alignment.size:
        raise ValueError(f"alignment was made for size {alignment.size}, not {size}")
    path = Path(path)
    text = json.dumps(_record_dict(alignment, str(source_path) if source_path is not None else ""), indent=1)
    _atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
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


# ----------------------------------------------------------------------------------------------- clips


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
    (``clients.media.iter_video_frames`` resizes its frames).
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
        frame = _check_rgb(frame)
        frame_size = (frame.shape[1], frame.shape[0])
        sampled += 1
        small_frame = max(frame.shape[:2]) <= 640
        faces = _detect_upright(frame, (0, 1) if small_frame else (0,), 960, with_landmarks=False)
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
    path: str | os.PathLike[str], size: int, fps: int = 25, box: ClipBox | None = None
) -> Iterator[np.ndarray]:
    """The frames of a driving clip cropped with one fixed square box, RGB uint8 ``[size,size,3]`` at ``fps``.

    The box (:func:`find_clip_box`, computed first unless given) is the same for every frame, so
    the head moves inside the crop as it does in the clip. Frames are resampled to ``fps`` by
    timestamp; parts of the box outside the frame are filled by reflection.
    """
    box = box or find_clip_box(path)
    for frame in iter_video(path, fps):
        yield _crop_frame(frame, box.box, size)


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
    in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], size: int = 256, fps: int = 25, crf: int = 18
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
        _atomic_write(out_path, write)
    except av.FFmpegError as exc:
        raise InputError(f"cannot write {out_path}: {' '.join(str(exc).split())}") from exc
    return box


# ----------------------------------------------------------------------------------------------- command


_IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def main_prepare(args) -> int:
    """``edtalk-live prepare``: ``args.image`` or ``args.video``, ``args.out``, ``args.size``, ``args.face``.

    An image becomes an aligned crop at ``out`` plus the transform beside it (``face.png`` ->
    ``face.json``); a clip becomes a fixed-box 25 fps mp4. Prints what was found on stdout.
    Raises :class:`InputError` (nothing written) on any problem with the inputs.
    """
    image, video = getattr(args, "image", None), getattr(args, "video", None)
    size = int(getattr(args, "size", None) or 256)
    face = int(getattr(args, "face", None) or 0)
    if (image is None) == (video is None):
        raise InputError("prepare needs exactly one of --image or --video")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InputError(f"output folder does not exist: {out.parent}")
    if size < 16:
        raise InputError(f"--size must be at least 16, got {size}")
    if video is not None:
        if out.suffix.lower() != ".mp4":
            raise InputError(f"--out must be an .mp4 for a video, got {out}")
        box = prepare_video(video, out, size=size)
        what = "already cropped, kept whole" if box.already_cropped else \
            "box " + ", ".join(f"{v:.0f}" for v in box.box)
        print(f"face found in {box.faces_found} of {box.frames_sampled} sampled frame(s); {what}")
        print(f"wrote {out} ({size}x{size}, 25 fps)")
        return 0
    fmt = _IMAGE_SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"--out must be an image ({', '.join(_IMAGE_SUFFIXES)}), got {out}")
    if face < 0:
        raise InputError(f"--face must be 0 or more, got {face}")
    alignment = align_file(image, size=size, face=face)
    if alignment.already_aligned:
        print(f"found {alignment.face_count} face(s); already aligned, used as it is")
    else:
        box = ", ".join(f"{v:.0f}" for v in alignment.box)
        print(f"found {alignment.face_count} face(s); using face {face} (box {box})")
    json_path = alignment_json_path(out)
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    _atomic_write(out, lambda tmp: Image.fromarray(alignment.crop).save(tmp, format=fmt, **options))
    try:
        save_alignment_json(json_path, alignment, image, size)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    print(f"wrote {out} and {json_path.name}")
    return 0
