"""One path from a photo to a prepared avatar, shared by ``render``, ``serve`` and ``serve --avatars``.

    read_face(path)            the photo, upright (EXIF), and its face found and aligned   (no model needed)
      .crop(size)              the network input uint8 [S,S,3] and the 2x3 photo -> crop matrix
    prepare_avatar(renderer, face)
                               the source encoded once, the avatar's own pose, mouth and expression,
                               its expression features, its resting frame

Everything a live session and an offline render of the same photo need comes from here, with the same
defaults, so both give the same frames: the avatar's own expression when no emotion is chosen, an
emotion blended from it by :meth:`PreparedAvatar.expression`, and the same paste-back.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edtalk_live.edtalk.errors import InputError
from edtalk_live.engines.base import PreparedSource, Renderer
from edtalk_live.media.faces import Alignment, align_image
from edtalk_live.media.geometry import TEMPLATE_SIZE, scale_matrix, warp_image
from edtalk_live.media.io import read_image, uint8_to_tensor

logger = logging.getLogger(__name__)

__all__ = ["FaceImage", "PreparedAvatar", "default_avatar", "effective_expression", "make_paste_back",
           "prepare_avatar", "read_face"]


def default_avatar() -> Path:
    """The portrait shipped with the package (used when no image is given)."""
    from edtalk_live.avatar.assets import DEFAULT_AVATAR

    return DEFAULT_AVATAR


@dataclass(frozen=True)
class FaceImage:
    """An identity photo, upright, and where its face is: all the checks that need no model."""

    name: str
    photo: np.ndarray                  # uint8 [H,W,3] RGB, upright per its EXIF orientation
    alignment: Alignment | None        # the face aligned at TEMPLATE_SIZE; None: the photo is taken as given

    def crop(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The network input ``uint8 [size,size,3]`` and the 2x3 photo -> crop matrix.

        An aligned face is warped from the photo with the alignment's transform scaled to ``size``
        (detection runs once, at 256, whatever the model size); a photo that already is such a crop,
        or one taken as given, is resized (Lanczos).
        """
        h, w = self.photo.shape[:2]
        a = self.alignment
        if a is None or a.already_aligned:
            if (w, h) == (size, size):
                return self.photo, scale_matrix(size / w, size / h)
            if w != h:
                logger.warning("%s: image %dx%d is not square; it is stretched to %dx%d", self.name, w, h, size, size)
            crop = np.asarray(Image.fromarray(self.photo).resize((size, size), Image.Resampling.LANCZOS))
            return crop, scale_matrix(size / w, size / h)
        k = size / a.size
        matrix = np.asarray(a.matrix, np.float64) * k
        matrix[:, 2] += 0.5 * k - 0.5                  # pixel centres stay pixel centres
        return warp_image(self.photo, matrix, size), matrix


def read_face(path: str | os.PathLike[str] | None = None, align: bool = True, face: int = 0,
              name: str | None = None) -> FaceImage:
    """Read an identity photo (default: the built-in portrait) and find its face.

    ``align``: detect the ``face``-th largest face and fit it onto EDTalk's crop template (an image
    that already is such a crop is only resized); False takes the image as it is. Fails fast with a
    one-line :class:`InputError` naming the file (unreadable, no face, ``face`` out of range).
    """
    path = Path(path) if path is not None else default_avatar()
    if not align and face:
        raise InputError("--face needs alignment (drop --no-align)")
    photo = read_image(path)
    alignment = align_image(photo, size=TEMPLATE_SIZE, face=face, name=str(path)) if align else None
    return FaceImage(name or path.stem, photo, alignment)


def effective_expression(rest: torch.Tensor | None, emotion: torch.Tensor | None,
                         intensity: float = 1.0) -> torch.Tensor | None:
    """The expression ``[1,10]`` shown for ``emotion`` at ``intensity`` on an avatar whose own is ``rest``.

    No emotion: the avatar's own expression. Otherwise ``rest + intensity * (emotion - rest)``
    (exactly ``emotion`` at intensity 1). ``None`` for a model without expression (``rest`` None).
    """
    if rest is None:
        return None
    if emotion is None:
        return rest.clone()
    if intensity == 1.0:
        return emotion.clone()
    return rest + intensity * (emotion - rest)


@dataclass
class PreparedAvatar:
    """An avatar ready to render: its encoded source, its own motion, what it was made from."""

    name: str
    source: PreparedSource
    rest_pose: torch.Tensor                 # [6] the photo's own head pose
    rest_exp: torch.Tensor | None           # [1,10] the photo's own expression (None: lip_pose family)
    rest_lip: torch.Tensor                  # [20] the photo's own mouth (the resting mouth)
    idle_frame: np.ndarray                  # uint8 [S,S,3] the photo's own face, rendered
    crop: np.ndarray                        # uint8 [S,S,3] the network input
    matrix: np.ndarray                      # 2x3 photo -> crop
    photo: np.ndarray | None = None         # uint8 [H,W,3] the upright photo (for paste-back), if kept
    cached: bool = False                    # loaded from the on-disk cache

    @property
    def has_expression(self) -> bool:
        return self.rest_exp is not None

    def expression(self, emotion: torch.Tensor | None = None, intensity: float = 1.0) -> torch.Tensor | None:
        """See :func:`effective_expression`."""
        return effective_expression(self.rest_exp, emotion, intensity)


@torch.inference_mode()
def encode_crop(renderer: Renderer, name: str, crop: np.ndarray, matrix: np.ndarray,
                photo: np.ndarray | None = None) -> PreparedAvatar:
    """Encode an aligned crop once and read its own pose, mouth and expression; render its resting frame."""
    image = uint8_to_tensor(crop[None])
    source = renderer.prepare_source(image)
    own = renderer.read_motion(image)
    rest_exp = own.exp[:1].clone() if own.exp is not None else None
    avatar = renderer.prepare_expression(source, rest_exp)
    idle = renderer.render(avatar, own.lip[:1], own.pose[:1])[0]
    logger.info("avatar %s: prepared", name)
    return PreparedAvatar(name=name, source=source, rest_pose=own.pose[0].clone(), rest_exp=rest_exp,
                          rest_lip=own.lip[0].clone(), idle_frame=idle, crop=np.ascontiguousarray(crop),
                          matrix=np.asarray(matrix, np.float64), photo=photo)


def prepare_avatar(renderer: Renderer, face: FaceImage, keep_photo: bool = True) -> PreparedAvatar:
    """A photo read by :func:`read_face`, cropped to the model size and encoded (see :func:`encode_crop`)."""
    crop, matrix = face.crop(renderer.config.size)
    return encode_crop(renderer, face.name, crop, matrix, face.photo if keep_photo else None)


def make_paste_back(avatar: PreparedAvatar, size: int, device: str | torch.device = "cpu",
                    max_size: int | None = None):
    """``uint8 [B,S,S,3]`` faces -> ``uint8 [B,H,W,3]`` photos with the face blended back (even sizes).

    One for an avatar, on the renderer's device; ``max_size`` bounds the longest side of the output.
    """
    if avatar.photo is None:
        raise InputError(f"avatar {avatar.name!r} has no photo to paste back into")
    from edtalk_live.engines.pasteback import PasteBack

    paste = PasteBack(avatar.photo, avatar.matrix, size, device=device, max_size=max_size)
    pw, ph = paste.output_size
    if pw % 2 == 0 and ph % 2 == 0:
        return paste

    def even(frames: np.ndarray) -> np.ndarray:      # video encoders (yuv420p) want even sizes
        return paste(frames)[:, : ph - ph % 2, : pw - pw % 2]

    even.output_size = (pw - pw % 2, ph - ph % 2)   # type: ignore[attr-defined]
    return even
