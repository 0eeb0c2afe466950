"""Paste-back: generated crops warped back into the photo keep every pixel outside the face crop.

The crop is made here independently of ``engines.pasteback`` (NumPy bilinear sampling through the
inverse transform, OpenCV pixel-centre convention), and the crop footprint of each photo pixel is
computed here from the matrix, so a wrong direction, offset or normalisation in the module fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edtalk_live.edtalk.errors import InputError
from edtalk_live.engines.pasteback import PasteBack

S = 64
FEATHER = 0.1


def smooth_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random texture ``uint8 [H,W,3]`` (low-frequency noise, so resampling error stays small)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 3, max(2, h // 24), max(2, w // 24), generator=g) * 255
    img = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 255)
    return img[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


def similarity(angle_deg: float, scale: float, centre: tuple[float, float], size: int = S) -> np.ndarray:
    """2×3 matrix photo -> crop: rotate by ``angle``, scale, and put the photo point ``centre`` at the crop centre."""
    a = math.radians(angle_deg)
    r = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = (size - 1) / 2
    t = np.array([c, c]) - r @ np.asarray(centre, dtype=np.float64)
    return np.hstack([r, t[:, None]])


def crop_from_photo(photo: np.ndarray, m: np.ndarray, size: int = S) -> np.ndarray:
    """Reference warp photo -> crop: bilinear sampling of the photo at ``M^-1 (u, v)`` (edge-clamped)."""
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    h, w = photo.shape[:2]
    x0 = np.floor(x).astype(int)
    y0 = np.floor(y).astype(int)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    p = photo.astype(np.float64)

    def at(yy, xx):
        return p[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]

    out = (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
           + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def border_distance(m: np.ndarray, h: int, w: int, size: int = S) -> np.ndarray:
    """For every photo pixel ``[H,W]``: how far (crop pixels) its centre lies inside the crop square (<= 0: outside)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u = m[0, 0] * x + m[0, 1] * y + m[0, 2]
    v = m[1, 0] * x + m[1, 1] * y + m[1, 2]
    return np.minimum(np.minimum(u + 0.5, size - 0.5 - u), np.minimum(v + 0.5, size - 0.5 - v))


@pytest.fixture(scope="module")
def scene():
    photo = smooth_photo(240, 320)                                 # H=240, W=320
    m = similarity(20.0, 0.6, centre=(150.0, 110.0))
    return photo, m, crop_from_photo(photo, m), border_distance(m, 240, 320)


def test_unmodified_crop_reproduces_photo(scene):
    photo, m, crop, dist = scene
    out = PasteBack(photo, m, S, feather=FEATHER)(crop[None])[0]
    full = dist > FEATHER * S + 1                                  # the mask's full-weight region (plus a margin)
    outside = dist <= 0
    assert full.sum() > 5000 and outside.sum() > 50000
    err = np.abs(out.astype(int) - photo.astype(int))
    assert err[full].max() <= 3, f"interpolation error too large: {err[full].max()}"
    assert err[full].mean() < 0.75
    assert np.array_equal(out[outside], photo[outside])


def test_modified_crop_changes_only_the_footprint(scene):
    photo, m, _, dist = scene
    white = np.full((1, S, S, 3), 255, np.uint8)
    paste = PasteBack(photo, m, S, feather=FEATHER)
    out = paste(white)[0]
    outside = dist <= 0
    x0, y0, x1, y1 = paste.bbox
    mask = np.zeros(dist.shape, np.float32)
    mask[y0:y1, x0:x1] = paste.mask[0, 0].cpu().numpy()
    assert (mask[outside] == 0).all() and (mask[dist > FEATHER * S] == 1).all()
    assert (mask[dist > 0] > 0).all(), "the box misses part of the footprint"
    assert np.array_equal(out[outside], photo[outside]), "a pixel outside the face crop changed"
    assert (out[dist > FEATHER * S] == 255).all(), "the face is not pasted where the mask is 1"
    changed = (out != photo).any(-1)
    assert changed.sum() > 5000 and not changed[outside].any()


def test_feather_ramps(scene):
    photo, m, _, dist = scene
    white = np.full((1, S, S, 3), 255, np.uint8)
    out = PasteBack(photo, m, S, feather=FEATHER)(white)[0].astype(float)
    p = photo.astype(float)
    ramp = (dist > 0) & (dist < FEATHER * S)
    assert ramp.sum() > 1000
    assert ((out[ramp] >= p[ramp]) & (out[ramp] <= 255)).all()     # between photo and crop values
    dark = p.max(-1) < 200
    weight = ((out - p) / np.maximum(255 - p, 1)).mean(-1)         # the blend weight each pixel got
    edges = np.linspace(0, FEATHER * S, 5)
    means = [weight[(dist > lo) & (dist <= hi) & dark].mean() for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), f"mask does not ramp: {means}"
    assert 0 < means[0] < 0.3 and 0.7 < means[-1] < 1
    mid = (dist > 0.4 * FEATHER * S) & (dist < 0.6 * FEATHER * S) & dark
    assert ((out[mid] > p[mid]) & (out[mid] < 255)).all(), "mid-ramp pixels are not a blend"


def test_hard_mask_without_feather(scene):
    photo, m, _, dist = scene
    out = PasteBack(photo, m, S, feather=0)(np.full((S, S, 3), 255, np.uint8))[0]
    assert (out[dist > 0] == 255).all()
    assert np.array_equal(out[dist <= 0], photo[dist <= 0])


def test_batch_equals_single_calls(scene):
    photo, m, _, _ = scene
    frames = np.random.default_rng(1).integers(0, 256, (5, S, S, 3), dtype=np.uint8)
    paste = PasteBack(photo, m, S)
    batch = paste(frames)
    assert batch.shape == (5, 240, 320, 3) and batch.dtype == np.uint8
    for i in range(5):
        assert np.array_equal(batch[i], paste(frames[i: i + 1])[0])
    assert np.array_equal(paste(torch.from_numpy(frames)), batch)   # torch input too


def test_float_and_uint8_input_agree(scene):
    photo, m, _, _ = scene
    raw = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(2)) * 2 - 1     # [B,3,S,S] in [-1,1]
    u8 = ((raw + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()        # [B,S,S,3]
    paste = PasteBack(photo, m, S)
    a, b = paste(raw), paste(u8)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.array_equal(paste(raw.numpy()), a)


def test_output_size_is_the_photo_size(scene):
    photo, m, crop, _ = scene
    paste = PasteBack(torch.from_numpy(photo), m, S)
    assert paste.output_size == (320, 240)
    out = paste(crop[None])
    assert out.shape == (1, 240, 320, 3)
    assert paste(np.zeros((0, S, S, 3), np.uint8)).shape == (0, 240, 320, 3)


def test_max_size_downscales_keeping_aspect(scene):
    photo, m, crop, _ = scene
    paste = PasteBack(photo, m, S, max_size=160)
    assert paste.output_size == (160, 120)
    small = paste.photo
    out = paste(crop[None])[0]
    assert out.shape == (120, 160, 3)
    # the same face lands in the same place of the half-size photo: its footprint is the half-size one
    half = m @ np.array([[2, 0, 0.5], [0, 2, 0.5], [0, 0, 1]])
    dist = border_distance(half, 120, 160)
    assert np.array_equal(out[dist <= 0], small[dist <= 0])
    err = np.abs(out.astype(int) - small.astype(int))[dist > FEATHER * S + 1]
    assert err.max() <= 4
    assert PasteBack(photo, m, S, max_size=1000).output_size == (320, 240)      # never upscaled


def test_large_photo_touches_only_the_box():
    h, w = 3000, 4000
    photo = np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)
    face = 150                                                     # face side in photo pixels
    m = similarity(10.0, S / face, centre=(2500.0, 1200.0))
    paste = PasteBack(photo, m, S)
    x0, y0, x1, y1 = paste.bbox
    bw, bh = x1 - x0, y1 - y0
    assert bw <= face * math.sqrt(2) + 4 and bh <= face * math.sqrt(2) + 4
    assert bw >= face and bh >= face
    assert x0 <= 2500 - face / 2 and x1 >= 2500 + face / 2 and y0 <= 1200 - face / 2 and y1 >= 1200 + face / 2
    # everything precomputed and processed per call is box-sized, never photo-sized
    assert tuple(paste.grid.shape) == (1, bh, bw, 2)
    assert tuple(paste.mask.shape) == (1, 1, bh, bw)
    assert tuple(paste.region.shape) == (1, 3, bh, bw)
    frames = np.full((2, S, S, 3), 7, np.uint8)
    assert paste.paste_region(frames).shape == (2, bh, bw, 3)
    out = paste(frames)
    assert out.shape == (2, h, w, 3)
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    assert np.array_equal(out[:, ~inside], np.broadcast_to(photo[~inside], (2, *photo[~inside].shape)))
    assert (out[:, 1200, 2500] == 7).all()


def test_footprint_outside_the_photo(scene):
    photo, _, _, _ = scene
    m = similarity(0.0, 1.0, centre=(-500.0, -500.0))
    paste = PasteBack(photo, m, S)
    out = paste(np.zeros((2, S, S, 3), np.uint8))
    assert np.array_equal(out, np.broadcast_to(photo, out.shape))


@pytest.mark.parametrize(
    "photo, matrix, size, match",
    [
        (np.zeros((10, 10, 3), np.float32), np.eye(2, 3), S, "uint8"),
        (np.zeros((10, 10), np.uint8), np.eye(2, 3), S, "uint8"),
        (np.zeros((10, 10, 4), np.uint8), np.eye(2, 3), S, "uint8"),
        (np.zeros((10, 10, 3), np.uint8), np.eye(3), S, "2x3"),
        (np.zeros((10, 10, 3), np.uint8), np.zeros((2, 3)), S, "invertible"),
        (np.zeros((10, 10, 3), np.uint8), np.eye(2, 3), 0, "crop_size"),
    ],
)
def test_bad_construction(photo, matrix, size, match):
    with pytest.raises(InputError, match=match):
        PasteBack(photo, matrix, size)


def test_bad_options(scene):
    photo, m, _, _ = scene
    with pytest.raises(InputError, match="feather"):
        PasteBack(photo, m, S, feather=0.8)
    with pytest.raises(InputError, match="max_size"):
        PasteBack(photo, m, S, max_size=0)


@pytest.mark.parametrize(
    "frames, match",
    [
        (np.zeros((1, 32, 32, 3), np.uint8), r"\[B,64,64,3\]"),
        (np.zeros((1, 3, S, S), np.uint8), r"\[B,64,64,3\]"),
        (np.zeros((1, S, S, 3), np.float32), r"\[B,3,64,64\]"),
        (np.zeros((1, S, S, 3), np.int32), "dtype"),
    ],
)
def test_bad_frames(scene, frames, match):
    photo, m, _, _ = scene
    with pytest.raises(InputError, match=match):
        PasteBack(photo, m, S)(frames)


@pytest.mark.gpu
def test_cuda_matches_cpu(scene):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    photo, m, crop, _ = scene
    frames = np.random.default_rng(4).integers(0, 256, (4, S, S, 3), dtype=np.uint8)
    frames[0] = crop
    cpu = PasteBack(photo, m, S)
    gpu = PasteBack(photo, m, S, device="cuda")
    a, b = cpu(frames), gpu(frames)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.array_equal(gpu(torch.from_numpy(frames).cuda()), b)   # frames already on the device
    raw = torch.rand(2, 3, S, S, device="cuda") * 2 - 1
    assert np.abs(cpu(raw.cpu()).astype(int) - gpu(raw).astype(int)).max() <= 1
    assert np.array_equal(cpu.to("cuda")(frames), b)
    assert gpu.paste_region(frames).device.type == "cuda"
