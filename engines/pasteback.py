"""Paste generated faces back into the full photo.

The renderer works on an aligned square crop of the photo (``S×S``, see ``media.faces``). To show
the result at the photo's own size, every generated frame is warped back with the inverse of the
alignment transform and blended into the photo through a feathered mask:

    paste = PasteBack(photo, matrix, crop_size=S, device=renderer.device)   # once per (photo, transform)
    full = paste(renderer.render(avatar, lip, pose))                           # uint8 [B,H,W,3]

Everything that depends only on the photo and the transform is computed once, on the device: the
bounding box of the crop's footprint in the photo, the ``grid_sample`` grid over that box, the
feathered mask and the box's pixels as floats. Per call, only the box is processed (one
``grid_sample`` for the whole batch, blend, round to uint8 on the device), so the cost grows with
the face, not with the photo; only the box crosses back from the device, and every pixel with mask 0
(including everything outside the box) is copied from the photo bit for bit.

Coordinates follow the OpenCV ``warpAffine`` convention: pixel ``(x, y)`` has its centre at integer
``(x, y)``, so the crop square spans ``[-0.5, S-0.5]²`` in crop coordinates.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from edtalk_live.edtalk.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["PasteBack"]


def _photo_array(photo: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate a photo: ``uint8 [H,W,3]`` (numpy or torch) -> contiguous numpy array."""
    if isinstance(photo, torch.Tensor):
        photo = photo.detach().cpu().numpy()
    if not isinstance(photo, np.ndarray):
        raise InputError(f"photo must be a uint8 [H,W,3] array, got {type(photo).__name__}")
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3 or photo.shape[0] < 1 or photo.shape[1] < 1:
        raise InputError(f"photo must be uint8 [H,W,3] RGB, got {photo.dtype} {list(photo.shape)}")
    return np.ascontiguousarray(photo)


def _matrix_array(matrix) -> np.ndarray:
    """Validate a 2×3 affine matrix (photo -> crop pixels) -> float64 numpy array."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"matrix must be a 2x3 affine matrix (photo -> crop), got {matrix!r}") from exc
    if m.shape != (2, 3):
        raise InputError(f"matrix must be a 2x3 affine matrix (photo -> crop), got shape {list(m.shape)}")
    if not np.isfinite(m).all():
        raise InputError(f"matrix has non-finite entries: {m.tolist()}")
    if abs(np.linalg.det(m[:, :2])) < 1e-12:
        raise InputError(f"matrix is not invertible: {m.tolist()}")
    return m


def _resize_photo(photo: np.ndarray, max_size: int) -> tuple[np.ndarray, float, float]:
    """Downscale a photo so its longer side is at most ``max_size`` (aspect kept, antialiased).

    Returns the new ``uint8 [H',W',3]`` photo and the per-axis scales ``(W'/W, H'/H)``.
    """
    h, w = photo.shape[:2]
    f = max_size / max(h, w)
    if f >= 1:
        return photo, 1.0, 1.0
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    out = x.clamp_(0, 255).round_().to(torch.uint8)[0].permute(1, 2, 0).contiguous().numpy()
    return out, nw / w, nh / h


class PasteBack:
    """Warp generated crops back into a photo and blend them in with a feathered mask.

    Args:
        photo: the full photo, ``uint8 [H,W,3]`` RGB (numpy or torch).
        matrix: ``2×3`` affine matrix mapping photo pixel coordinates ``(x, y)`` to crop pixel
            coordinates (OpenCV convention: pixel centres at integers).
        crop_size: the crop's side ``S`` (the renderer's image size).
        device: where the warp and blend run (the renderer's device).
        feather: width of the mask's ramp as a fraction of ``S`` (0 = hard edge); the mask is 1
            farther than ``feather*S`` crop pixels inside the crop border, ramps down with a
            half-cosine and is exactly 0 on and outside the border.
        max_size: if given and the photo's longer side is larger, the photo is first downscaled
            (aspect kept) so that side is ``max_size``; output frames then have that size.
            ``None`` keeps the photo's exact size.

    Calling the object with ``B`` frames returns ``uint8 [B,H,W,3]`` (numpy).
    """

    def __init__(self, photo: np.ndarray | torch.Tensor, matrix, crop_size: int, device: str | torch.device = "cpu",
                 feather: float = 0.1, max_size: int | None = None):
        photo = _photo_array(photo)
        m = _matrix_array(matrix)
        if isinstance(crop_size, bool) or not isinstance(crop_size, int | np.integer) or crop_size < 1:
            raise InputError(f"crop_size must be a positive integer, got {crop_size!r}")
        if not (isinstance(feather, int | float) and 0 <= feather <= 0.5):
            raise InputError(f"feather must be a fraction of the crop size in [0, 0.5], got {feather!r}")
        if max_size is not None and (not isinstance(max_size, int | np.integer) or max_size < 1):
            raise InputError(f"max_size must be a positive integer or None, got {max_size!r}")
        self.crop_size = int(crop_size)
        self.feather = float(feather)
        if max_size is not None:
            photo, sx, sy = _resize_photo(photo, int(max_size))
            if (sx, sy) != (1.0, 1.0):
                # a resized pixel x' sits at x = (x' + 0.5) / sx - 0.5 in the original photo
                pre = np.array([[1 / sx, 0, 0.5 / sx - 0.5], [0, 1 / sy, 0.5 / sy - 0.5], [0, 0, 1]])
                m = m @ pre
        self.photo = photo
        self.matrix = m
        self.bbox = self._footprint_bbox()
        self.device = torch.device(device)
        grid, mask = self._grid_and_mask()
        x0, y0, x1, y1 = self.bbox
        region = torch.from_numpy(np.array(photo[y0:y1, x0:x1])).permute(2, 0, 1).float()
        #: ``[1,h,w,2]`` crop coordinates of the box's pixels, normalised for ``grid_sample``
        self.grid = grid.to(self.device)
        #: ``[1,1,h,w]`` feathered mask over the box (exactly 0 outside the crop footprint)
        self.mask = mask.to(self.device)
        #: ``[1,3,h,w]`` the box's photo pixels as float in [0,255]
        self.region = region[None].contiguous().to(self.device)
        logger.debug("paste-back: photo %dx%d, crop %d, box %s on %s", *self.output_size, self.crop_size,
                     self.bbox, self.device)

    # ------------------------------------------------------------ precomputation
    @property
    def inverse(self) -> np.ndarray:
        """``2×3`` matrix mapping crop pixel coordinates back to photo pixel coordinates."""
        full = np.vstack([self.matrix, [0, 0, 1]])
        return np.linalg.inv(full)[:2]

    def _footprint_bbox(self) -> tuple[int, int, int, int]:
        """Photo pixels ``[x0,x1) × [y0,y1)`` whose centres may fall inside the crop square, clipped to the photo."""
        s = self.crop_size
        corners = np.array([[-0.5, -0.5, 1], [s - 0.5, -0.5, 1], [-0.5, s - 0.5, 1], [s - 0.5, s - 0.5, 1]]).T
        pts = self.inverse @ corners                             # [2,4] photo coordinates
        h, w = self.photo.shape[:2]
        x0 = min(max(math.floor(pts[0].min()), 0), w)
        y0 = min(max(math.floor(pts[1].min()), 0), h)
        x1 = max(min(math.ceil(pts[0].max()) + 1, w), x0)
        y1 = max(min(math.ceil(pts[1].max()) + 1, h), y0)
        if x1 == x0 or y1 == y0:
            logger.warning("paste-back: the face crop lies outside the photo; frames will show the photo unchanged")
        return x0, y0, x1, y1

    def _grid_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling grid ``[1,h,w,2]`` and the mask ``[1,1,h,w]`` over the bounding box (float32, CPU)."""
        x0, y0, x1, y1 = self.bbox
        s = self.crop_size
        ys, xs = torch.meshgrid(torch.arange(y0, y1, dtype=torch.float64), torch.arange(x0, x1, dtype=torch.float64),
                                indexing="ij")
        m = torch.from_numpy(self.matrix)
        u = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]                # crop coordinates of each photo pixel centre
        v = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        grid = torch.stack([(2 * u + 1) / s - 1, (2 * v + 1) / s - 1], dim=-1)   # align_corners=False
        # distance (in crop pixels) inside the crop square's border; <= 0 on or outside it
        dist = torch.minimum(torch.minimum(u + 0.5, s - 0.5 - u), torch.minimum(v + 0.5, s - 0.5 - v))
        ramp = self.feather * s
        if ramp > 0:
            t = (dist / ramp).clamp(0, 1)
            mask = 0.5 - 0.5 * torch.cos(math.pi * t)
        else:
            mask = (dist > 0).double()
        mask = torch.where(dist > 0, mask, torch.zeros_like(mask))   # exactly 0 outside the footprint
        return grid[None].float(), mask[None, None].float()

    # ------------------------------------------------------------ public API
    @property
    def output_size(self) -> tuple[int, int]:
        """``(W, H)`` of the frames this object returns (the photo's size, or its downscaled size)."""
        return self.photo.shape[1], self.photo.shape[0]

    def to(self, device: str | torch.device) -> PasteBack:
        """Move the precomputed grid, mask and photo box to ``device``; returns ``self``."""
        self.device = torch.device(device)
        self.grid = self.grid.to(self.device)
        self.mask = self.mask.to(self.device)
        self.region = self.region.to(self.device)
        return self

    def _frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Validate frames and return them as float ``[B,3,S,S]`` in [0,255] on the device."""
        s = self.crop_size
        t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if not isinstance(t, torch.Tensor):
            raise InputError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
        if t.dtype == torch.uint8:
            if t.ndim == 3:
                t = t[None]
            if t.ndim != 4 or tuple(t.shape[1:]) != (s, s, 3):
                raise InputError(f"uint8 frames must be [B,{s},{s},3], got {list(t.shape)}")
            return t.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float()
        if t.is_floating_point():
            if t.ndim == 3:
                t = t[None]
            if t.ndim != 4 or tuple(t.shape[1:]) != (3, s, s):
                raise InputError(f"float frames must be [B,3,{s},{s}] in [-1,1], got {list(t.shape)}")
            return (t.to(self.device, non_blocking=True).float().clamp(-1, 1) + 1) * 127.5
        raise InputError(f"frames must be uint8 [B,{s},{s},3] or float [B,3,{s},{s}], got dtype {t.dtype}")

    @torch.no_grad()
    def paste_region(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Warp and blend ``B`` frames into the bounding box only.

        Args:
            frames: ``uint8 [B,S,S,3]`` or float ``[B,3,S,S]`` in [-1,1] (numpy or torch, any device).

        Returns:
            ``uint8 [B,h,w,3]`` on the device: the photo's box ``self.bbox`` with the faces blended in.
        """
        x = self._frames(frames)
        b, s = x.shape[0], self.crop_size
        h, w = self.grid.shape[1:3]
        if b == 0 or h == 0 or w == 0:
            return torch.from_numpy(self.photo[self.bbox[1]:self.bbox[3], self.bbox[0]:self.bbox[2]])[None].expand(
                b, -1, -1, -1).to(self.device)
        # one grid_sample for the whole batch: the B*3 channels share the grid. 'border' padding only affects
        # samples within half a crop pixel of the border, where the mask is (nearly) 0; it avoids a dark fringe
        warped = F.grid_sample(x.reshape(1, b * 3, s, s), self.grid, mode="bilinear", padding_mode="border",
                               align_corners=False).view(b, 3, h, w)
        out = warped.sub_(self.region).mul_(self.mask).add_(self.region)   # photo*(1-mask) + warped*mask
        return out.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def __call__(self, frames: np.ndarray | torch.Tensor) -> np.ndarray:
        """Paste ``B`` generated frames into the photo.

        Args:
            frames: ``uint8 [B,S,S,3]`` RGB or float ``[B,3,S,S]`` in [-1,1] (numpy or torch, any device);
                a single frame without the batch axis is accepted too.

        Returns:
            ``uint8 [B,H,W,3]`` RGB (numpy) at :attr:`output_size`; pixels outside the crop's footprint are
            the photo's own, bit for bit.
        """
        region = self.paste_region(frames).cpu().numpy()        # the only copy back: the box
        out = np.empty((region.shape[0], *self.photo.shape), np.uint8)
        out[:] = self.photo
        x0, y0, x1, y1 = self.bbox
        out[:, y0:y1, x0:x1] = region
        return out

    def __repr__(self) -> str:
        w, h = self.output_size
        return (f"PasteBack(photo={w}x{h}, crop_size={self.crop_size}, bbox={self.bbox}, feather={self.feather}, "
                f"device={self.device})")
