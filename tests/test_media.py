"""media.io: audio decoding and resampling, images, 25 fps video reading, atomic mp4 writing."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from edtalk_live.edtalk.errors import InputError
from edtalk_live.media import io as media

SR = 16000


def _assert_length(wav: np.ndarray, seconds: float) -> None:
    assert wav.dtype == np.float32 and wav.ndim == 1
    expected = seconds * SR
    assert abs(len(wav) - expected) <= 0.01 * expected, (len(wav), expected)


def _decode(path: Path) -> tuple[list[np.ndarray], float, int]:
    """(RGB frames, average fps, decoded mono audio samples at the stream rate) of an mp4."""
    with av.open(str(path)) as c:
        assert c.streams.video and c.streams.audio, "expected a video and an audio stream"
        fps = float(c.streams.video[0].average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
    return frames, fps, samples


# ------------------------------------------------------------------------------------------ audio


def test_load_audio_wav_is_exact(clips, speech):
    wav = media.load_audio(clips["wav_2s"])
    _assert_length(wav, 2.0)
    # 16 kHz mono 16-bit in, same rate out: the samples themselves, no gain or shift
    np.testing.assert_allclose(wav, speech[: len(wav)], atol=1.5 / 32768)


def test_load_audio_stereo_44k_is_mixed_and_resampled(clips, speech):
    wav = media.load_audio(clips["stereo_44k"])
    _assert_length(wav, 1.23)
    n = min(len(wav), 19680)
    corr = np.corrcoef(wav[:n], speech[:n])[0, 1]
    assert corr > 0.95, f"resampled speech does not follow the original (correlation {corr:.3f})"


def test_load_audio_mp3(mp3_clip):
    _assert_length(media.load_audio(mp3_clip), 2.0)


@pytest.mark.parametrize(
    ("name", "seconds"),
    [("teaser.mp3", 45.456), ("pose_source2.mp4", 60.0)],  # 24 kHz mp3; 48 kHz AAC inside an mp4
)
def test_load_audio_other_formats(testdata, name, seconds):
    _assert_length(media.load_audio(testdata / name), seconds)


def test_load_audio_errors(tmp_path, testdata):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all\n" * 50)
    for path, words in [
        (garbage, "garbage.wav"),
        (tmp_path / "missing.wav", "not found"),
        (testdata / "pose_source1.mp4", "no audio stream"),  # a video without sound
    ]:
        with pytest.raises(InputError) as info:
            media.load_audio(path)
        message = str(info.value)
        assert words in message and str(path.name) in message and "\n" not in message


# ------------------------------------------------------------------------------------------ images


def test_load_image(testdata):
    img = media.load_image(testdata / "crop_identity_source.jpg", 64)
    assert img.shape == (1, 3, 64, 64) and img.dtype == torch.float32
    assert -1.0 <= img.min() < -0.5 and 0.5 < img.max() <= 1.0


def test_load_image_rgb_order(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (10, 10), (255, 0, 0)).save(path)
    img = media.load_image(path, 8)
    np.testing.assert_allclose(img[0, :, 4, 4].numpy(), [1.0, -1.0, -1.0], atol=1e-6)


def test_load_image_errors(tmp_path):
    text = tmp_path / "face.jpg"
    text.write_text("not an image")
    with pytest.raises(InputError, match="face.jpg"):
        media.load_image(text, 64)
    with pytest.raises(InputError, match="not found"):
        media.load_image(tmp_path / "missing.png", 64)


def _pattern(w: int, h: int) -> np.ndarray:
    """A smooth, asymmetric RGB picture (a turned or mirrored copy differs everywhere)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 128 + 100 * np.sin(x / 9.0) * np.cos(y / 13.0)], -1)
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize(("orientation", "stored_turn"), [
    (6, Image.Transpose.ROTATE_90),    # 6: "rotate 90 CW to display": the pixels are stored turned CCW
    (8, Image.Transpose.ROTATE_270),   # 8: "rotate 90 CCW to display": stored turned CW
])
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_read_image_honours_exif_orientation(tmp_path, orientation, stored_turn, suffix):
    """A phone photo stored sideways with an EXIF orientation tag reads upright, as the phone shows it."""
    upright = _pattern(96, 64)
    stored = Image.fromarray(upright).transpose(stored_turn)
    assert stored.size == (64, 96)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone{suffix}"
    stored.save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == orientation  # the tag really is in the file

    rgb = media.read_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 96, 3)
    err = np.abs(rgb.astype(int) - upright.astype(int))
    if suffix == ".png":
        assert err.max() == 0
    else:
        assert err.mean() < 2.0, err.mean()  # JPEG rounding only; a wrong turn is off by about 100
    # the readers built on it agree
    np.testing.assert_array_equal(np.asarray(media.open_image(path)), rgb)
    expected = media.image_to_tensor(Image.fromarray(rgb), 32)
    torch.testing.assert_close(media.load_image(path, 32), expected)


def test_read_image_without_exif_and_other_modes(tmp_path):
    upright = _pattern(40, 30)
    Image.fromarray(upright).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(media.read_image(tmp_path / "plain.png"), upright)
    Image.fromarray(upright).convert("L").save(tmp_path / "grey.png")
    grey = media.read_image(tmp_path / "grey.png")
    assert grey.shape == (30, 40, 3) and (grey[..., 0] == grey[..., 2]).all()
    Image.fromarray(upright).convert("RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(media.read_image(tmp_path / "alpha.png"), upright)


def test_read_image_errors_are_one_line_and_name_the_file(tmp_path):
    text = tmp_path / "face.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    Image.fromarray(_pattern(64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    for path, what in [(text, "not a readable image"), (truncated, "not a readable image"),
                       (tmp_path / "missing.png", "not found"), (tmp_path, "not a file")]:
        with pytest.raises(InputError) as info:
            media.read_image(path)
        message = str(info.value)
        assert what in message and str(path) in message and "\n" not in message, message


def test_read_image_refuses_images_over_the_byte_and_pixel_caps(tmp_path, monkeypatch):
    from edtalk_live.media import io as media_io

    # a 12000 x 5000 image is 60 megapixels, over the cap; PNG of one colour keeps the file small
    wide = tmp_path / "wide.png"
    Image.new("RGB", (12000, 5000), (10, 20, 30)).save(wide)
    assert wide.stat().st_size < 2**20
    with pytest.raises(InputError, match="image too large: .*12000x5000"):
        media.read_image(wide)
    small = tmp_path / "small.png"
    Image.fromarray(_pattern(64, 64)).save(small)
    assert media.read_image(small).shape == (64, 64, 3)
    monkeypatch.setattr(media_io, "MAX_IMAGE_BYTES", small.stat().st_size - 1)
    with pytest.raises(InputError, match="image file too large"):
        media.read_image(small)


def test_to_uint8_clamps_and_rounds():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = -2.0  # below range -> 0
    x[0, 1] = 2.0  # above range -> 255
    x[0, 2] = 0.0  # (0 + 1) * 127.5 = 127.5 -> 128
    x[1] = 0.5  # 191.25 -> 191
    out = media.to_uint8(x)
    assert out.shape == (2, 4, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, 0].tolist() == [0, 255, 128]
    assert (out[1] == 191).all()
    # no per-video normalisation: a dark frame stays dark
    assert (media.to_uint8(torch.full((1, 3, 2, 2), -0.9)) == 13).all()


# ------------------------------------------------------------------------------------------ video in


def test_read_video_25fps_passthrough(testdata):
    frames = list(media.iter_video_frames(testdata / "pose_source1.mp4", 64))
    assert len(frames) == 250
    assert frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    first = media.read_video_frames(testdata / "pose_source1.mp4", 64, max_frames=3)
    assert first.shape == (3, 3, 64, 64) and -1.0 <= first.min() and first.max() <= 1.0


def test_read_video_30fps_resampled_to_25(testdata):
    # 389 frames at 30 fps = 12.97 s -> 12.97 * 25 = 324.2 ticks
    n = sum(1 for _ in media.iter_video_frames(testdata / "expression_source.mp4", 32))
    assert n == 325


def test_read_video_picks_nearest_frame(tmp_path):
    # 30 frames at 30 fps, frame i a flat grey of level 8*i; output tick k must be frame round(k*30/25)
    path = tmp_path / "ramp30.mp4"
    with media.VideoWriter(path, 32, fps=30, crf=0) as writer:
        for i in range(30):
            writer.write(np.full((32, 32, 3), 8 * i, np.uint8))
    levels = [int(f.mean().round()) for f in media.iter_video_frames(path, 32)]
    expected = [8 * round(k * 30 / 25) for k in range(25)]
    assert len(levels) == 25
    assert max(abs(a - b) for a, b in zip(levels, expected, strict=True)) <= 2, (levels, expected)


def test_read_video_errors(tmp_path, testdata):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(InputError, match="clip.mp4"):
        media.probe_video(bad)
    with pytest.raises(InputError, match="no video stream"):
        media.probe_video(testdata / "mouth_source.wav")


# ------------------------------------------------------------------------------------------ video out


def test_write_video_roundtrip(tmp_path, testdata, speech):
    face = media.to_uint8(media.load_image(testdata / "crop_identity_source.jpg", 64))  # [1,64,64,3]
    out = tmp_path / "out.mp4"
    batches = (np.repeat(face, 8, axis=0) for _ in range(4))  # 32 frames, a generator
    assert media.write_video(out, batches, speech[: 32 * 640]) == 32
    frames, fps, samples = _decode(out)
    assert len(frames) == 32 and fps == 25.0
    assert abs(samples / SR - 32 / 25) <= 0.04
    error = np.abs(frames[5].astype(float) - face[0]).mean()
    assert error < 6.0, f"decoded frame differs from the input by {error:.1f} (colour order?)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_write_video_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out.mp4"

    def frames():
        for _ in range(3):
            yield np.zeros((2, 64, 64, 3), np.uint8)
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="renderer crashed"):
        media.write_video(out, frames(), np.zeros(16000, np.float32))
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(InputError, match="no video frames"):
        media.write_video(out, iter([]), None)
    assert list(tmp_path.iterdir()) == []


def test_write_video_failure_keeps_existing_file(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(ValueError, match="uint8"):
        media.write_video(out, [np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.float32)])
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_write_video_missing_folder(tmp_path):
    with pytest.raises(InputError, match="output folder does not exist"):
        media.write_video(tmp_path / "nope" / "out.mp4", [np.zeros((64, 64, 3), np.uint8)])
