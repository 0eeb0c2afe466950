"""Avatars for the server: prepared once (alignment, source encoding, own motion, idle frame), cached on disk.

The cache key is the image's bytes, the weights and the alignment setting, so a second start with
the same folder is fast, and a changed image or other weights are prepared again. Cache files are
safetensors written atomically; an unreadable or mismatching cache file is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.engines.base import Renderer
from edtalk_live.realtime.session import AvatarAssets

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_VERSION = "1"

#: alignment: uint8 photo [H,W,3], size -> (uint8 crop [S,S,3], 2x3 photo->crop matrix or None)
Aligner = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray | None]]


@dataclass
class Prepared:
    """An avatar ready to serve, and what it was made from."""

    assets: AvatarAssets
    crop: np.ndarray                        # uint8 [S,S,3], the aligned input of the networks
    photo: np.ndarray | None                # uint8 [H,W,3] original photo (for paste-back), None if not kept
    matrix: np.ndarray | None               # 2x3 photo -> crop, None when the image was taken as it is
    cached: bool = False


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: not a readable image ({type(e).__name__})") from None


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.LANCZOS))


class AvatarStore:
    """Prepares avatar images for one renderer, with an on-disk cache under ``cache_dir``."""

    def __init__(self, renderer: Renderer, weights_id: str, cache_dir: str | Path | None,
                 aligner: Aligner | None = None, clip_poses: torch.Tensor | None = None):
        self.renderer = renderer
        self.weights_id = weights_id or "unknown"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.aligner = aligner
        self.clip_poses = clip_poses

    # ------------------------------------------------------------ cache
    def _key(self, data: bytes) -> str:
        h = hashlib.sha256()
        h.update(data)
        h.update(f"|{self.weights_id}|{self.renderer.config.size}|align={self.aligner is not None}|v{CACHE_VERSION}"
                 .encode())
        return h.hexdigest()[:24]

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / "avatars" / f"{key}.safetensors"

    def _load_cached(self, path: Path) -> dict[str, np.ndarray] | None:
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged cache file is rebuilt, never fatal
            logger.warning("ignoring unreadable avatar cache %s (%s)", path, e)
            return None

    def _save_cached(self, path: Path, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> None:
        from safetensors.numpy import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("could not write the avatar cache %s (%s)", path, e)
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------ prepare
    def prepare(self, path: str | Path, name: str | None = None, keep_photo: bool = False) -> Prepared:
        """Prepare one image file (aligned unless the store has no aligner)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: avatar image not found")
        data = path.read_bytes()
        name = name or path.stem
        key = self._key(data)
        cache = self._cache_path(key)
        photo = _read_rgb(path) if (keep_photo or cache is None or not cache.is_file()) else None
        if cache is not None and cache.is_file():
            arrays = self._load_cached(cache)
            if arrays is not None:
                try:
                    prepared = self._from_arrays(name, arrays)
                    if keep_photo and photo is None:
                        photo = _read_rgb(path)
                    prepared.photo = photo
                    prepared.assets.photo, prepared.assets.matrix = photo, prepared.matrix
                    logger.info("avatar %s: loaded from cache", name)
                    return prepared
                except (EDTalkError, KeyError) as e:
                    logger.warning("avatar cache %s does not fit (%s); preparing again", cache, e)
            photo = _read_rgb(path)
        size = self.renderer.config.size
        if self.aligner is not None:
            crop, matrix = self.aligner(photo, size)
        else:
            crop, matrix = _resize(photo, size), None
        prepared = self._prepare_crop(name, crop, matrix)
        prepared.photo = photo if keep_photo else None
        prepared.assets.photo, prepared.assets.matrix = prepared.photo, matrix
        if cache is not None:
            self._save_cached(cache, self._to_arrays(prepared), {"name": name, "source": path.name,
                                                                 "weights": self.weights_id})
        return prepared

    def _prepare_crop(self, name: str, crop: np.ndarray, matrix: np.ndarray | None) -> Prepared:
        image = torch.from_numpy(np.array(crop, copy=True)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        assets = prepare_avatar(self.renderer, name, image, clip_poses=self.clip_poses)
        logger.info("avatar %s: prepared", name)
        return Prepared(assets, crop, None, matrix)

    def prepare_dir(self, folder: str | Path, keep_photo: bool = False) -> tuple[dict[str, Prepared], dict[str, str]]:
        """Prepare every image of a folder; a bad image is reported by name and skipped."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: avatar folder not found")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        ok: dict[str, Prepared] = {}
        failed: dict[str, str] = {}
        for p in files:
            name = p.stem
            if name in ok:
                failed[p.name] = f"another image is already called {name!r}"
                continue
            try:
                ok[name] = self.prepare(p, name, keep_photo=keep_photo)
            except EDTalkError as e:
                failed[p.name] = str(e)
                logger.warning("avatar %s skipped: %s", p.name, e)
        return ok, failed

    # ------------------------------------------------------------ (de)serialisation
    def _to_arrays(self, p: Prepared) -> dict[str, np.ndarray]:
        a = p.assets
        arrays = {f"source.{k}": v for k, v in self.renderer.export_source(a.source).items()}
        arrays.update({"rest_pose": a.rest_pose.numpy(), "rest_lip": a.rest_lip.numpy(),
                       "idle_frame": a.idle_frame, "crop": p.crop})
        if a.rest_exp is not None:
            arrays["rest_exp"] = a.rest_exp.numpy()
        if p.matrix is not None:
            arrays["matrix"] = np.asarray(p.matrix, np.float64)
        return arrays

    def _from_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> Prepared:
        source = self.renderer.import_source({k[7:]: v for k, v in arrays.items() if k.startswith("source.")})
        has_exp = self.renderer.config.has_expression
        if has_exp != ("rest_exp" in arrays):
            raise InputError("cached avatar was made for the other model family")
        assets = AvatarAssets(
            name=name, source=source, rest_pose=torch.from_numpy(arrays["rest_pose"]).float(),
            rest_exp=torch.from_numpy(arrays["rest_exp"]).float() if has_exp else None,
            rest_lip=torch.from_numpy(arrays["rest_lip"]).float(), idle_frame=arrays["idle_frame"],
            clip_poses=self.clip_poses)
        return Prepared(assets, arrays["crop"], None, arrays.get("matrix"), cached=True)


def prepare_avatar(renderer: Renderer, name: str, image: torch.Tensor,
                   clip_poses: torch.Tensor | None = None) -> AvatarAssets:
    """Encode an identity image ``[1,3,S,S]`` in [-1,1] once and read its own pose, expression and mouth."""
    source = renderer.prepare_source(image)
    own = renderer.read_motion(image)
    rest_exp = own.exp[:1] if own.exp is not None else None
    avatar = renderer.prepare_expression(source, rest_exp)
    idle = renderer.render(avatar, own.lip[:1], own.pose[:1])[0]
    return AvatarAssets(name=name, source=source, rest_pose=own.pose[0], rest_exp=rest_exp, rest_lip=own.lip[0],
                        idle_frame=idle, clip_poses=clip_poses)


def describe(prepared: dict[str, Prepared], failed: dict[str, str]) -> str:
    """One line per avatar for the start-up log."""
    lines = [f"  {n}: {'cached' if p.cached else 'prepared'}" for n, p in prepared.items()]
    lines += [f"  {n}: SKIPPED ({why})" for n, why in failed.items()]
    return "\n".join(lines)


def manifest(prepared: dict[str, Prepared]) -> str:
    return json.dumps(sorted(prepared))
