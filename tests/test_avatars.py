"""Avatar folders: prepared once, cached on disk by image and weights, bad images skipped by name."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import edtalk_live.edtalk as edtalk
import edtalk_live.engines as engines
from edtalk_live.avatar.store import AvatarStore
from edtalk_live.media.weights import find_weights


@pytest.fixture(scope="module")
def renderer(edtalk_weights):
    w = find_weights(edtalk_weights)
    model = edtalk.load_model(w.gen, audio2lip=w.audio2lip)
    return engines.create_renderer("torch", model=model, device="cpu"), model


def test_folder_prepared_cached_and_bad_image_skipped(tmp_path, renderer, face_image):
    r, model = renderer
    folder = tmp_path / "avatars"
    folder.mkdir()
    shutil.copy(face_image, folder / "alice.png")
    flipped = folder / "bob.png"
    from PIL import Image

    Image.open(face_image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored")
    store = AvatarStore(r, model.weights_id, tmp_path / "cache")
    ok, failed = store.prepare_dir(folder)
    assert sorted(ok) == ["alice", "bob"]
    assert list(failed) == ["broken.jpg"] and "not a readable image" in failed["broken.jpg"]
    assert not any(p.cached for p in ok.values())
    assert len(list((tmp_path / "cache" / "avatars").glob("*.safetensors"))) == 2

    again, _ = AvatarStore(r, model.weights_id, tmp_path / "cache").prepare_dir(folder)
    assert all(p.cached for p in again.values())
    for name in ok:
        a, b = ok[name], again[name]
        torch.testing.assert_close(a.source.wa, b.source.wa)
        for fa, fb in zip(a.source.feats, b.source.feats, strict=True):
            torch.testing.assert_close(fa, fb)
        torch.testing.assert_close(a.rest_pose, b.rest_pose)
        np.testing.assert_array_equal(a.idle_frame, b.idle_frame)

    # other weights or a changed image: prepared again, not served from the stale cache
    other = AvatarStore(r, "other-weights", tmp_path / "cache").prepare(folder / "alice.png")
    assert not other.cached
    Image.open(face_image).rotate(10).save(folder / "alice.png")
    assert not AvatarStore(r, model.weights_id, tmp_path / "cache").prepare(folder / "alice.png").cached


def test_damaged_cache_is_rebuilt(tmp_path, renderer, face_image):
    r, model = renderer
    store = AvatarStore(r, model.weights_id, tmp_path)
    store.prepare(face_image)
    (cache_file,) = (tmp_path / "avatars").glob("*.safetensors")
    cache_file.write_bytes(b"garbage")
    p = AvatarStore(r, model.weights_id, tmp_path).prepare(face_image)
    assert not p.cached


def test_source_export_import_between_backends(renderer, face_image):
    """A cached source (host arrays) imports into the ONNX Runtime backend and renders the same frame."""
    r, model = renderer
    from edtalk_live.media.io import load_image

    img = load_image(face_image, model.config.size)
    src = r.prepare_source(img)
    arrays = r.export_source(src)
    ort = engines.create_renderer("onnxruntime", model=model)
    src2 = ort.import_source(arrays)
    m = r.read_motion(img)
    a = r.render(r.prepare_expression(src, m.exp), m.lip, m.pose, raw=True)
    b = ort.render(ort.prepare_expression(src2, m.exp), m.lip, m.pose, raw=True)
    assert np.abs(a - b).max() < 1e-3
    arrays["feat0"] = arrays["feat0"][:, :-1]
    with pytest.raises(edtalk.InputError, match="feature 0 has shape"):
        ort.import_source(arrays)


def test_empty_or_missing_folder(tmp_path, renderer):
    r, model = renderer
    store = AvatarStore(r, model.weights_id, None)
    with pytest.raises(edtalk.InputError, match="avatar folder not found"):
        store.prepare_dir(tmp_path / "nope")
    with pytest.raises(edtalk.InputError, match="no images"):
        store.prepare_dir(tmp_path)
