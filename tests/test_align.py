"""Face alignment (``media.geometry``, ``media.faces``, ``media.clips``, ``clients.prepare``): photos onto
EDTalk's template, clips with one fixed box.

Pictures composed here use the default avatar shipped with the package, so they run without
``../shared``; tests on the EDTalk sample media skip with a reason when it is absent.
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
from PIL import Image

from edtalk_live.avatar.assets import DEFAULT_AVATAR
from edtalk_live.clients import prepare
from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.media import clips, faces, geometry

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TESTDATA = SHARED / "testdata" / "edtalk"
needs_testdata = pytest.mark.skipif(not TESTDATA.is_dir(), reason=f"EDTalk test media not found at {TESTDATA}")

EYE_TOL = 6.0  # px at 256: re-detected eye corners vs the template
NOSE_TOL = 10.0  # the nose base depends more on the face's shape (8.1 px on uncrop_face.jpg)
WARP_TOL = 2.5  # px: re-detected landmarks vs the photo's landmarks mapped by the returned matrix


def _avatar() -> np.ndarray:
    return np.asarray(Image.open(DEFAULT_AVATAR).convert("RGB"))


def _background(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient with mild noise (no faces in it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([100 + 60 * x / w, 120 + 40 * y / h, 140 - 50 * x / w], -1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def _place(canvas: np.ndarray, face: np.ndarray, scale: float, angle: float, cx: float, cy: float):
    """Paste ``face`` scaled, rotated by ``angle`` degrees and centred at (cx, cy); return (image, matrix)."""
    a = np.radians(angle)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) * scale
    m = np.zeros((2, 3))
    m[:, :2] = rot
    m[:, 2] = np.array([cx, cy]) - rot @ ((np.array(face.shape[1::-1]) - 1) / 2)
    h, w = canvas.shape[:2]
    corners = geometry.apply_affine(m, np.array([[0, 0], [face.shape[1], 0], [0, face.shape[0]], face.shape[1::-1]]))
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 2, (w, h))
    local = m.copy()
    local[:, 2] -= (x0, y0)  # warp only the window the face lands in
    warped = geometry.warp_image(face, local, (x1 - x0, y1 - y0), padding="zeros").astype(np.float64)
    mask = geometry.warp_image(np.full_like(face, 255), local, (x1 - x0, y1 - y0), padding="zeros")[..., :1] / 255.0
    out = canvas.copy()
    window = out[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = np.round(window * (1 - mask) + warped * mask).astype(np.uint8)
    return out, m


def _check_on_template(alignment: faces.Alignment) -> np.ndarray:
    """Detect again on the crop: the 5 points must lie on the template and where the matrix says."""
    size = alignment.size
    again = faces.detect_faces(alignment.crop)
    assert again, "no face found again in the aligned crop"
    found = again[0].landmarks * (256 / size)
    err = np.linalg.norm(found - geometry.template_points(256), axis=1)
    assert (err[:4] <= EYE_TOL).all() and err[4] <= NOSE_TOL, f"landmarks off the template by {err.round(1)} px"
    mapped = geometry.apply_affine(alignment.matrix, alignment.landmarks) * (256 / size)
    warp_err = np.linalg.norm(found - mapped, axis=1)
    assert warp_err.max() <= WARP_TOL, f"crop landmarks off the transformed photo landmarks by {warp_err.round(1)}"
    return err


# ----------------------------------------------------------------------------------------------- geometry


def test_similarity_transform_recovers_a_known_transform_without_reflection():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 500, (5, 2))
    a, s, t = np.radians(-23.0), 0.37, np.array([41.0, -7.5])
    rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    dst = src @ rot.T + t
    m = geometry.similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-7)
    # a mirrored point set is fitted by a proper rotation, never a reflection
    mirrored = dst * np.array([-1.0, 1.0])
    assert np.linalg.det(geometry.similarity_transform(src, mirrored)[:, :2]) > 0
    np.testing.assert_allclose(geometry.apply_affine(geometry.invert_affine(m), dst), src, atol=1e-7)


def test_template_points_are_the_five_point_rows_scaled():
    pts = geometry.template_points(256)
    np.testing.assert_array_equal(pts, [[176, 114], [154, 115], [94, 114], [118, 114], [141, 157]])
    np.testing.assert_allclose(geometry.template_points(512), 2 * pts)


@needs_testdata
def test_template_constant_matches_the_fixture():
    fixture = SHARED / "fixtures" / "edtalk_crop_template.npy"
    if not fixture.is_file():
        pytest.skip(f"template fixture not found at {fixture}")
    np.testing.assert_array_equal(geometry.EDTALK_TEMPLATE, np.load(fixture))


def test_missing_dlib_gives_an_install_hint(monkeypatch):
    faces._dlib_models.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)
    try:
        with pytest.raises(EDTalkError, match="pip install dlib-bin face-recognition-models"):
            faces.detect_faces(_background(64, 64))
    finally:
        faces._dlib_models.cache_clear()


# ----------------------------------------------------------------------------------------------- photos


@needs_testdata
@pytest.mark.parametrize("name", ["identity_source.jpg", "uncrop_face.jpg", "leijun.png"])
def test_photos_align_onto_the_template(name):
    alignment = faces.align_file(TESTDATA / name, size=256)
    assert not alignment.already_aligned
    assert alignment.crop.shape == (256, 256, 3) and alignment.crop.dtype == np.uint8
    assert alignment.face_count == 1
    _check_on_template(alignment)


@needs_testdata
def test_frames_of_a_real_clip_align():
    with av.open(str(TESTDATA / "uncrop_Obama.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i % 200 == 0]
    assert len(frames) == 3
    for frame in frames:
        _check_on_template(faces.align_image(frame, size=256))


@pytest.mark.parametrize("angle", [25.0, 50.0])
def test_small_tilted_face_in_a_large_picture(angle):
    picture, placed = _place(_background(1200, 900), _avatar(), scale=0.5, angle=angle, cx=800, cy=330)
    found = faces.detect_faces(picture)
    assert len(found) == 1
    if angle > 45:  # beyond the upright detector: found on a turned copy and mapped back
        assert found[0].angle != 0
    alignment = faces.align_image(picture, size=256)
    assert alignment.face_count == 1
    _check_on_template(alignment)
    # aligning undoes the placement: about 1/0.5 times larger and turned back
    back = geometry._compose(alignment.matrix, placed)
    assert abs(np.degrees(np.arctan2(back[1, 0], back[0, 0]))) < 5.0
    assert abs(np.sqrt(np.linalg.det(back[:, :2])) - 1.0) < 0.1


def test_size_other_than_256():
    picture, _ = _place(_background(640, 480), _avatar(), scale=0.8, angle=-10.0, cx=300, cy=260)
    alignment = faces.align_image(picture, size=128)
    assert alignment.crop.shape == (128, 128, 3)
    _check_on_template(alignment)


def test_the_largest_face_wins_and_face_n_picks_another(tmp_path, capsys):
    picture, big = _place(_background(1000, 700), _avatar(), scale=1.0, angle=0.0, cx=300, cy=350)
    picture, small = _place(picture, _avatar(), scale=0.6, angle=0.0, cx=760, cy=340)
    first = faces.align_image(picture, size=256)
    second = faces.align_image(picture, size=256, face=1)
    assert first.face_count == second.face_count == 2
    assert first.box[2] < 500 < second.box[0], (first.box, second.box)
    # the crops are nearly the same picture: the same face at two sizes
    assert np.abs(first.crop.astype(int) - second.crop.astype(int)).mean() < 20
    with pytest.raises(InputError, match="2 face"):
        faces.align_image(picture, size=256, face=2)

    path = tmp_path / "two.png"
    Image.fromarray(picture).save(path)
    out = tmp_path / "face.png"
    assert prepare.main_prepare(SimpleNamespace(image=str(path), video=None, out=str(out), size=256, face=1)) == 0
    printed = capsys.readouterr().out
    assert "found 2 face(s); using face 1" in printed
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert json.loads(out.with_suffix(".json").read_text())["face_index"] == 1


def test_no_face_fails_cleanly_and_writes_nothing(tmp_path):
    noise = np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(noise).save(path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = SimpleNamespace(image=str(path), video=None, out=str(out_dir / "face.png"), size=256, face=0)
    with pytest.raises(InputError, match=r"noise\.png: no face found"):
        prepare.main_prepare(args)
    assert list(out_dir.iterdir()) == []
    with pytest.raises(InputError, match="no face found"):
        faces.align_image(_background(200, 150))


@needs_testdata
def test_an_aligned_crop_is_used_as_it_is():
    path = TESTDATA / "crop_identity_source.jpg"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    alignment = faces.align_file(path, size=256)
    assert alignment.already_aligned
    np.testing.assert_array_equal(alignment.crop, pixels)
    np.testing.assert_allclose(alignment.matrix, [[1, 0, 0], [0, 1, 0]])
    half = faces.align_file(path, size=128)
    assert half.already_aligned and half.crop.shape == (128, 128, 3)
    expected = np.asarray(Image.fromarray(pixels).resize((128, 128), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(half.crop, expected)
    # a photo that still needs aligning is not mistaken for a crop, though it is square too
    assert not faces.align_file(TESTDATA / "identity_source.jpg", size=256).already_aligned


def test_outside_the_photo_is_filled_by_reflection():
    photo = np.ascontiguousarray(_avatar()[78:, 20:])  # forehead cut off, face near the top edge
    alignment = faces.align_image(photo, size=256)
    assert not alignment.already_aligned
    top = alignment.crop[:24].astype(int)
    # the same warp with zero padding leaves a black band there: the check can fail
    black = geometry.warp_image(photo, alignment.matrix, 256, padding="zeros")[:24].astype(int)
    assert black.max(axis=-1).min() == 0
    assert top.max(axis=-1).min() > 30, "a black region in the crop"
    _check_on_template(alignment)


def test_alignment_json_round_trips_and_maps_the_landmarks(tmp_path):
    picture, _ = _place(_background(800, 600), _avatar(), scale=0.7, angle=12.0, cx=420, cy=280)
    path = tmp_path / "photo.png"
    Image.fromarray(picture).save(path)
    out = tmp_path / "face.png"
    prepare.main_prepare(SimpleNamespace(image=str(path), video=None, out=str(out), size=256, face=0))
    record = faces.load_alignment_json(tmp_path / "face.json")
    fresh = faces.align_file(path, size=256)
    assert record.photo_size == (800, 600) and record.size == 256 and record.source == str(path)
    assert record.face_count == 1 and not record.already_aligned
    np.testing.assert_allclose(record.matrix, fresh.matrix)
    round_trip = geometry.apply_affine(record.inverse, geometry.apply_affine(record.matrix, record.landmarks))
    np.testing.assert_allclose(round_trip, record.landmarks, atol=1e-6)
    mapped = geometry.apply_affine(record.matrix, record.landmarks)
    assert np.linalg.norm(mapped - geometry.template_points(256), axis=1).max() < NOSE_TOL
    np.testing.assert_array_equal(np.asarray(Image.open(out)), fresh.crop)
    with pytest.raises(InputError, match="not an alignment file"):
        (tmp_path / "bad.json").write_text("{}")
        faces.load_alignment_json(tmp_path / "bad.json")


def test_default_avatar_is_an_aligned_crop():
    assert DEFAULT_AVATAR.is_file()
    with Image.open(DEFAULT_AVATAR) as img:
        assert img.format == "PNG" and img.size == (256, 256) and img.mode == "RGB"
    alignment = faces.align_file(DEFAULT_AVATAR, size=256)
    assert alignment.already_aligned and alignment.face_count == 1
    _check_on_template(alignment)


# ----------------------------------------------------------------------------------------------- clips


def _write_clip(path: Path, frames: list[np.ndarray], fps: int, audio_rate: int | None = None) -> Path:
    """Write frames as an H.264 mp4 at ``fps`` (with a 440 Hz tone when ``audio_rate``)."""
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "12"}
        audio = out.add_stream("aac", rate=audio_rate) if audio_rate else None
        if audio is not None:
            audio.layout = "mono"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if audio is not None:
            t = np.arange(len(frames) * audio_rate // fps) / audio_rate
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate = audio_rate
            out.mux(audio.encode(frame))
            out.mux(audio.encode(None))
    return path


@pytest.fixture(scope="module")
def moving_clip(tmp_path_factory) -> Path:
    """2 s at 30 fps, 640×480: the avatar (scale 0.6) drifting 60 px right and nodding ±8°, with a tone."""
    frames, background, avatar = [], _background(640, 480), _avatar()
    for i in range(60):
        picture, _ = _place(background, avatar, 0.6, 8 * np.sin(i / 6), 220 + i, 250)
        frames.append(picture)
    return _write_clip(tmp_path_factory.mktemp("clip") / "moving.mp4", frames, fps=30, audio_rate=16000)


def test_clip_box_is_one_square_box_around_every_face(moving_clip):
    box = clips.find_clip_box(moving_clip)
    x0, y0, x1, y1 = box.box
    assert not box.already_cropped
    assert abs((x1 - x0) - (y1 - y0)) < 1e-6
    assert box.faces_found == box.frames_sampled >= 40
    assert -0.5 <= x0 and x1 <= 639.5 and -0.5 <= y0 and y1 <= 479.5  # slid inside the frame, no padding
    boxes = []
    with av.open(str(moving_clip)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % 6 == 0:
                f = faces.detect_faces(frame.to_ndarray(format="rgb24"), rotations=False)[0]
                assert x0 <= f.box[0] and y0 <= f.box[1] and f.box[2] <= x1 and f.box[3] <= y1, (i, f.box, box.box)
                boxes.append(f.box)
    # the union of the face boxes (the drift included), enlarged as EDTalk's clip preprocessing does
    b = np.array(boxes)
    union = max(b[:, 2].max() - b[:, 0].min(), b[:, 3].max() - b[:, 1].min())
    assert 1.35 < (x1 - x0) / union < 1.65


@needs_testdata
def test_clip_box_of_a_real_clip_contains_every_face():
    path = TESTDATA / "uncrop_Obama.mp4"
    box = clips.find_clip_box(path)
    x0, y0, x1, y1 = box.box
    assert abs((x1 - x0) - (y1 - y0)) < 1e-6 and box.frame_size == (450, 450)
    assert box.faces_found >= 45
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % 25 == 0:
                f = faces.detect_faces(frame.to_ndarray(format="rgb24"), rotations=False)[0]
                assert x0 <= f.box[0] and y0 <= f.box[1] and f.box[2] <= x1 and f.box[3] <= y1, (i, f.box, box.box)


def test_prepare_video_writes_a_fixed_box_25fps_clip(moving_clip, tmp_path, capsys):
    out = tmp_path / "aligned.mp4"
    args = SimpleNamespace(image=None, video=str(moving_clip), out=str(out), size=256, face=0)
    assert prepare.main_prepare(args) == 0
    assert "wrote" in capsys.readouterr().out
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 25 and (stream.width, stream.height) == (256, 256)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert abs(len(frames) - 50) <= 1  # 2 s at 25 fps
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert audio.sample_rate == 16000
        assert abs(float(audio.duration * audio.time_base) - 2.0) < 0.15  # AAC pads to 1024-sample frames
    # one fixed box: the face drifts right inside the crop (the clip's motion is kept)
    first = faces.detect_faces(frames[0], rotations=False)[0].box
    last = faces.detect_faces(frames[-1], rotations=False)[0].box
    shift = (last[0] + last[2]) / 2 - (first[0] + first[2]) / 2
    box = clips.find_clip_box(moving_clip).box
    assert abs(shift - 58 * 256 / (box[2] - box[0])) < 12, shift
    assert [p.name for p in tmp_path.iterdir()] == ["aligned.mp4"]


def test_prepare_video_without_a_face_leaves_no_output(tmp_path):
    frames = [_background(320, 240, seed=i) for i in range(10)]
    clip = _write_clip(tmp_path / "noface.mp4", frames, fps=25)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(InputError, match="no face found"):
        clips.prepare_video(clip, out_dir / "aligned.mp4", size=256)
    assert list(out_dir.iterdir()) == []


@needs_testdata
def test_an_already_cropped_clip_keeps_its_frames():
    path = TESTDATA / "pose_source1.mp4"
    box = clips.find_clip_box(path)
    assert box.already_cropped and box.box == (-0.5, -0.5, 255.5, 255.5)
    frames = list(clips.crop_clip(path, 256, box=box))
    with av.open(str(path)) as container:
        original = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == len(original)
    np.testing.assert_array_equal(frames[7], original[7])


@needs_testdata
def test_a_30fps_clip_is_resampled_to_25fps():
    path = TESTDATA / "expression_source.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        duration = float(stream.frames / stream.average_rate)
    n = sum(1 for _ in clips.crop_clip(path, 64, box=clips.ClipBox((-0.5, -0.5, 255.5, 255.5), (256, 256), 0, 0,
                                                                     True)))
    assert abs(n - duration * 25) <= 1
