"""Geometry of face crops: EDTalk's landmark template, similarity and affine transforms, and the warp.

Images are aligned the way EDTalk's own preprocessing aligns them: a similarity transform
(rotation, uniform scale, translation; never a reflection) from the photo's landmarks onto
EDTalk's landmark template, then a warp to ``size``×``size``. What lies outside the photo is
filled by reflection.

Coordinates are pixels with pixel centres at integer positions (``(0, 0)`` is the centre of the
top-left pixel), as dlib reports them; a 2×3 ``matrix`` maps a photo point ``p`` (x, y) to
``matrix[:, :2] @ p + matrix[:, 2]`` in the crop.

NumPy, Pillow and PyTorch only (no face detector here: :mod:`edtalk_live.media.faces`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "EDTALK_TEMPLATE",
    "FIVE_POINT_ROWS",
    "TEMPLATE_SIZE",
    "apply_affine",
    "invert_affine",
    "rotation_matrix",
    "scale_matrix",
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


def scale_matrix(kx: float, ky: float) -> np.ndarray:
    """Pixel-centre mapping of a resize by (kx, ky): ``p' = (p + 0.5) * k - 0.5``."""
    return np.array([[kx, 0.0, 0.5 * kx - 0.5], [0.0, ky, 0.5 * ky - 0.5]])


def rotation_matrix(angle: float, w: int, h: int, scale: float = 1.0) -> tuple[np.ndarray, int, int]:
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
        matrix = _compose(matrix, scale_matrix(w / nw, h / nh))
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
