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


@pytest.mark.parametrize("orientation", [6, 8])
def test_sideways_phone_photo_is_served_and_rendered_upright(tmp_path, renderer, testdata, clips, edtalk_weights,
                                                             orientation):
    """A photo stored sideways with an EXIF rotation gives the avatar of the upright photo, live and offline."""
    from PIL import Image

    from edtalk_live.avatar.prepare import read_face
    from edtalk_live.avatar.render import render_file

    r, model = renderer
    upright = tmp_path / "upright.png"
    sideways = tmp_path / "sideways.jpg"
    with Image.open(testdata / "uncrop_face.jpg") as img:
        img = img.convert("RGB")
        img.save(upright)
        # what a phone does: the sensor's pixels stored as they are, the rotation in the EXIF tag
        stored = img.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(sideways, quality=98, exif=exif)
    a, b = read_face(upright), read_face(sideways)
    assert b.photo.shape == a.photo.shape
    crop_a, crop_b = a.crop(64)[0].astype(float), b.crop(64)[0].astype(float)
    assert np.abs(crop_a - crop_b).mean() < 3.0          # JPEG, nothing else
    # serve (the avatar store) and render take the same path
    served = AvatarStore(r, model.weights_id, None).prepare(sideways)
    reference = AvatarStore(r, model.weights_id, None).prepare(upright)
    assert np.abs(served.crop.astype(float) - reference.crop.astype(float)).mean() < 3.0
    assert np.abs(served.idle_frame.astype(float) - reference.idle_frame.astype(float)).mean() < 3.0
    rotated = np.rot90(reference.crop, 1 if orientation == 6 else -1).astype(float)
    assert np.abs(served.crop.astype(float) - rotated).mean() > 10.0, "the test photo is not orientation-sensitive"
    outs = []
    for name, photo in (("a", upright), ("b", sideways)):
        out = tmp_path / f"{name}.mp4"
        render_file(edtalk_weights, photo, clips["wav_1_23s"], out, progress=False)
        import av

        with av.open(str(out)) as c:
            outs.append(next(c.decode(video=0)).to_ndarray(format="rgb24").astype(float))
    assert np.abs(outs[0] - outs[1]).mean() < 6.0             # JPEG, through the random networks and H.264
