"""Avatars prepared once (the path of :mod:`edtalk_live.avatar.prepare`) and cached on disk.

The cache key is the image's bytes, the weights, the model size and the alignment settings, so a second start with
the same folder is fast, and a changed image or other weights are prepared again. Cache files are
safetensors written atomically; an unreadable or mismatching cache file is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from edtalk_live.avatar.prepare import PreparedAvatar, prepare_avatar, read_face
from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.engines.base import Renderer
from edtalk_live.media.io import read_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_VERSION = "2"


class AvatarStore:
    """Prepares avatar images for one renderer (:mod:`edtalk_live.avatar.prepare`), cached on disk under ``cache_dir``.

    ``align`` and ``face`` are those of :func:`~edtalk_live.avatar.prepare.read_face`.
    """

    def __init__(self, renderer: Renderer, weights_id: str, cache_dir: str | Path | None,
                 align: bool = True, face: int = 0):
        self.renderer = renderer
        self.weights_id = weights_id or "unknown"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.align = align
        self.face = face

    # ------------------------------------------------------------ cache
    def _key(self, data: bytes) -> str:
        h = hashlib.sha256()
        h.update(data)
        h.update(f"|{self.weights_id}|{self.renderer.config.size}|align={self.align}|face={self.face}"
                 f"|v{CACHE_VERSION}".encode())
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
    def prepare(self, path: str | Path, name: str | None = None, keep_photo: bool = False) -> PreparedAvatar:
        """Prepare one image file: from the cache when it holds it, else through :func:`prepare_avatar`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: avatar image not found")
        name = name or path.stem
        cache = self._cache_path(self._key(path.read_bytes()))
        if cache is not None and cache.is_file():
            arrays = self._load_cached(cache)
            if arrays is not None:
                try:
                    prepared = self._from_arrays(name, arrays)
                    prepared.photo = read_image(path) if keep_photo else None
                    logger.info("avatar %s: loaded from cache", name)
                    return prepared
                except (EDTalkError, KeyError) as e:
                    logger.warning("avatar cache %s does not fit (%s); preparing again", cache, e)
        prepared = prepare_avatar(self.renderer, read_face(path, align=self.align, face=self.face, name=name),
                                  keep_photo=keep_photo)
        if cache is not None:
            self._save_cached(cache, self._to_arrays(prepared), {"name": name, "source": path.name,
                                                                 "weights": self.weights_id})
        return prepared

    def prepare_dir(self, folder: str | Path, keep_photo: bool = False
                    ) -> tuple[dict[str, PreparedAvatar], dict[str, str]]:
        """Prepare every image of a folder; a bad image is reported by name and skipped."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: avatar folder not found")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        ok: dict[str, PreparedAvatar] = {}
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
    def _to_arrays(self, p: PreparedAvatar) -> dict[str, np.ndarray]:
        arrays = {f"source.{k}": v for k, v in self.renderer.export_source(p.source).items()}
        arrays.update({"rest_pose": p.rest_pose.numpy(), "rest_lip": p.rest_lip.numpy(),
                       "idle_frame": p.idle_frame, "crop": p.crop, "matrix": np.asarray(p.matrix, np.float64)})
        if p.rest_exp is not None:
            arrays["rest_exp"] = p.rest_exp.numpy()
        return arrays

    def _from_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> PreparedAvatar:
        source = self.renderer.import_source({k[7:]: v for k, v in arrays.items() if k.startswith("source.")})
        has_exp = self.renderer.config.has_expression
        if has_exp != ("rest_exp" in arrays):
            raise InputError("cached avatar was made for the other model family")
        return PreparedAvatar(
            name=name, source=source, rest_pose=torch.from_numpy(arrays["rest_pose"]).float(),
            rest_exp=torch.from_numpy(arrays["rest_exp"]).float() if has_exp else None,
            rest_lip=torch.from_numpy(arrays["rest_lip"]).float(), idle_frame=arrays["idle_frame"],
            crop=arrays["crop"], matrix=arrays["matrix"], cached=True)


def describe(prepared: dict[str, PreparedAvatar], failed: dict[str, str]) -> str:
    """One line per avatar for the start-up log."""
    lines = [f"  {n}: {'cached' if p.cached else 'prepared'}" for n, p in prepared.items()]
    lines += [f"  {n}: SKIPPED ({why})" for n, why in failed.items()]
    return "\n".join(lines)


def manifest(prepared: dict[str, PreparedAvatar]) -> str:
    return json.dumps(sorted(prepared))
