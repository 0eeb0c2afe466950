"""End to end: ``edtalk-live render`` on the size-64 fixture networks, and its user errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import edtalk_live.edtalk as edtalk
from edtalk_live.avatar.driving import pingpong
from edtalk_live.avatar.speech import lips_for_audio, lipsync_config
from edtalk_live.clients.cli import main
from edtalk_live.edtalk.errors import CheckpointError, InputError
from edtalk_live.engines.torch_backend import TorchRenderer
from edtalk_live.media import io as media
from edtalk_live.media.weights import find_weights, load_preset

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = edtalk.audio.SAMPLE_RATE
FPS = edtalk.audio.FPS


def _probe(path: Path) -> dict:
    """Frames, fps, size and the audio of an mp4: stream durations (seconds) and decoded samples."""
    with av.open(str(path)) as c:
        video, audio = c.streams.video[0], (c.streams.audio[0] if c.streams.audio else None)
        info = {
            "fps": float(video.average_rate),
            "size": (video.width, video.height),
            "video_seconds": float(video.duration * video.time_base),
            "audio": audio is not None,
            "audio_seconds": float(audio.duration * audio.time_base) if audio is not None else 0.0,
            "audio_rate": audio.rate if audio is not None else 0,
        }
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        info["audio_samples"] = sum(f.samples for f in c.decode(audio=0)) if c.streams.audio else 0
    info.update(frames=len(frames), pixels=np.stack(frames))
    return info


def _render(weights: Path, image: Path, audio: Path, out: Path, *extra: str) -> int:
    argv = ["render", "--weights", str(weights), "--image", str(image), "--audio", str(audio)]
    return main([*argv, "--out", str(out), "--no-progress", *extra])


def _expected_frames(path: Path) -> int:
    return edtalk.audio.num_frames(len(media.load_audio(path)))


def _check_output(out: Path, frames: int) -> dict:
    """The mp4 has ``frames`` frames at 25 fps and an audio track of the same length (within one frame)."""
    info = _probe(out)
    assert info["frames"] == frames
    assert info["fps"] == FPS and info["size"] == (64, 64)
    assert info["audio"], "no audio stream in the output"
    assert abs(info["video_seconds"] - frames / FPS) < 1e-6
    assert abs(info["audio_seconds"] - frames / FPS) <= 1 / FPS, (info["audio_seconds"], frames / FPS)
    # decoded AAC: every input sample, plus at most the padding of the last 1024-sample AAC frame
    assert info["audio_rate"] == SAMPLE_RATE
    assert 0 <= info["audio_samples"] - frames * SAMPLE_RATE // FPS < 1024, info["audio_samples"]
    return info


@pytest.fixture(scope="module")
def short_pose_clip(tmp_path_factory, testdata) -> Path:
    """The first 0.6 s (15 frames) of pose_source1.mp4: shorter than the audio, so it is ping-ponged."""
    path = tmp_path_factory.mktemp("pose") / "pose_short.mp4"
    media.write_video(path, media.iter_video_frames(testdata / "pose_source1.mp4", 64, max_frames=15))
    return path


@pytest.fixture(scope="module")
def still_render(tmp_path_factory, edtalk_weights, face_image, clips) -> dict:
    out = tmp_path_factory.mktemp("still") / "still.mp4"
    assert _render(edtalk_weights, face_image, clips["wav_2s"], out) == 0
    return {**_probe(out), "path": out}


# ------------------------------------------------------------------------------------------ success


def test_render_default(still_render, clips, capsys):
    frames = _expected_frames(clips["wav_2s"])
    assert frames == 50
    _check_output(still_render["path"], frames)
    assert still_render["pixels"][0].std() > 5.0, "the frames are blank"


def test_render_cuts_audio_to_whole_frames(tmp_path, edtalk_weights, face_image, clips, capsys):
    # 1.23 s = 30.75 frames -> 30 frames, and the audio in the mp4 is cut to 1.20 s
    out = tmp_path / "cut.mp4"
    assert _render(edtalk_weights, face_image, clips["wav_1_23s"], out, "--still") == 0
    _check_output(out, 30)
    assert "30 frames" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mp4"]


def test_render_pose_video_and_emotion(tmp_path, edtalk_weights, face_image, clips, short_pose_clip, still_render):
    out = tmp_path / "posed.mp4"
    rc = _render(
        edtalk_weights, face_image, clips["wav_2s"], out, "--pose-video", str(short_pose_clip), "--emotion", "happy"
    )
    assert rc == 0
    info = _check_output(out, 50)
    difference = np.abs(info["pixels"].astype(float) - still_render["pixels"]).mean()
    assert difference > 1.0, "pose video and emotion did not change the picture"


def test_render_exp_video_stereo_audio(tmp_path, edtalk_weights, face_image, clips, testdata):
    out = tmp_path / "exp.mp4"
    exp_video = testdata / "expression_source.mp4"  # 30 fps
    assert _render(edtalk_weights, face_image, clips["stereo_44k"], out, "--exp-video", str(exp_video)) == 0
    _check_output(out, _expected_frames(clips["stereo_44k"]))


def test_render_lip_pose_family(tmp_path, lip_pose_weights, face_image, clips, short_pose_clip):
    out = tmp_path / "lp.mp4"
    assert _render(lip_pose_weights, face_image, clips["wav_2s"], out, "--pose-video", str(short_pose_clip)) == 0
    _check_output(out, 50)


def test_render_mp3_odd_batch_size(tmp_path, lip_pose_weights, face_image, mp3_clip):
    out = tmp_path / "mp3.mp4"
    assert _render(lip_pose_weights, face_image, mp3_clip, out, "--batch-size", "7") == 0
    _check_output(out, _expected_frames(mp3_clip))


def test_lip_pipeline_matches_fixture(tmp_path, fixtures_dir, edtalk_weights):
    """Audio file -> load_audio -> mel -> Audio2Lip -> smooth gives the published mouth coefficients."""
    fixture = torch.load(fixtures_dir / "edtalk_s64.pt", weights_only=True)
    wav_16k = fixture["inputs"]["wav_16k"].numpy()
    path = tmp_path / "fixture.wav"
    with av.open(str(path), "w", format="wav") as out:  # float wav: no int16 rounding
        stream = out.add_stream("pcm_f32le", rate=SAMPLE_RATE)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wav_16k[None], format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    wav = media.load_audio(path)
    frames = edtalk.audio.num_frames(len(wav))
    weights = find_weights(edtalk_weights)
    model = edtalk.load_model(weights.gen, audio2lip=weights.audio2lip)
    renderer = TorchRenderer(model)
    windows = edtalk.audio.mel_windows(edtalk.audio.melspectrogram(edtalk.audio.fit_to_frames(wav, frames)), frames)
    lip = edtalk.audio.smooth(renderer.audio_to_lip(windows))
    expected = fixture["outputs"]["audio2lip.smoothed"]
    assert lip.shape == expected.shape
    torch.testing.assert_close(lip, expected, atol=1e-4, rtol=0)
    # render's (and a live session's) path hears silence around the file: the same mouth but at its end
    ours = lips_for_audio(renderer.audio_to_lip, wav, frames, config=lipsync_config(silence_db=None))
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours[:-5], expected[:-5], atol=1e-4, rtol=0)


def test_pingpong():
    seq = torch.arange(4)
    assert pingpong(seq, 12).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert pingpong(seq, 3).tolist() == [0, 1, 2]
    assert pingpong(torch.tensor([[7.0, 8.0]]), 3).tolist() == [[7.0, 8.0]] * 3


# ------------------------------------------------------------------------------------------ weights


def test_find_weights(edtalk_weights, lip_pose_weights, tmp_path):
    w = find_weights(edtalk_weights)
    assert w.gen.name == "EDTalk.pt" and w.family_hint == "edtalk" and w.audio2lip.name == "Audio2Lip.pt"
    assert sorted(w.presets) == [
        "angry", "contempt", "disgusted", "fear", "happy", "neutral", "sad", "surprised",
    ]  # fmt: skip
    assert load_preset(w.presets["happy"]).shape == (1, 10)
    lp = find_weights(lip_pose_weights)
    assert lp.gen.name == "EDTalk_lip_pose.pt" and lp.family_hint == "lip_pose" and lp.presets == {}

    with pytest.raises(CheckpointError, match="EDTalk.pt or EDTalk_lip_pose.pt"):
        find_weights(tmp_path)
    with pytest.raises(CheckpointError, match="weights folder not found"):
        find_weights(tmp_path / "missing")
    with pytest.raises(InputError, match="happy"):
        w.preset("joyful")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 10), np.float32))
    with pytest.raises(CheckpointError, match=r"\[1,10\]"):
        load_preset(bad)


def test_find_weights_prefers_expression_model(tmp_path, edtalk_weights, lip_pose_weights):
    both = tmp_path / "ckpts"  # the reference repository's layout: DIR/ckpts/*.pt
    both.mkdir()
    for src in [*edtalk_weights.iterdir(), lip_pose_weights / "EDTalk_lip_pose.pt"]:
        (both / src.name).symlink_to(src)
    w = find_weights(tmp_path)
    assert w.gen.name == "EDTalk.pt" and w.family_hint == "edtalk" and "happy" in w.presets


# ------------------------------------------------------------------------------------------ errors


@pytest.fixture()
def bad_inputs(
    tmp_path, face_image, clips, edtalk_weights, lip_pose_weights, wav_writer
) -> dict[str, tuple[list[str], str]]:
    text_image = tmp_path / "face.jpg"
    text_image.write_text("not an image\n")
    noise_audio = tmp_path / "speech.wav"
    noise_audio.write_bytes(os.urandom(4096))
    damaged = tmp_path / "damaged_weights"
    damaged.mkdir()
    (damaged / "EDTalk.pt").write_bytes(b"PK\x03\x04 truncated")
    (damaged / "Audio2Lip.pt").write_bytes(b"")
    tiny_audio = wav_writer(tmp_path / "tiny.wav", np.zeros(300), SAMPLE_RATE)
    ok = {"--weights": edtalk_weights, "--image": face_image, "--audio": clips["wav_1_23s"]}

    def args(**changes) -> list[str]:
        merged = {**ok, **{f"--{k.replace('_', '-')}": v for k, v in changes.items()}}
        return [str(x) for kv in merged.items() for x in kv]

    return {
        "missing image": (args(image=tmp_path / "nobody.jpg"), "nobody.jpg"),
        "text file as image": (args(image=text_image), "face.jpg"),
        "undecodable audio": (args(audio=noise_audio), "speech.wav"),
        "audio shorter than a frame": (args(audio=tiny_audio), "too short"),
        "missing weights": (args(weights=tmp_path / "no_weights"), "no_weights"),
        "damaged checkpoint": (args(weights=damaged), "EDTalk.pt"),
        "unknown emotion": (args(emotion="joyful"), "happy"),  # the message lists the available names
        "emotion with lip_pose": (args(weights=lip_pose_weights, emotion="happy"), "EDTalk.pt"),
        "exp video with lip_pose": (args(weights=lip_pose_weights, exp_video=face_image), "EDTalk.pt"),
        "text file as pose video": (args(pose_video=text_image), "face.jpg"),
        "batch size 0": (args(batch_size=0), "batch size"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing image",
        "text file as image",
        "undecodable audio",
        "audio shorter than a frame",
        "missing weights",
        "damaged checkpoint",
        "unknown emotion",
        "emotion with lip_pose",
        "exp video with lip_pose",
        "text file as pose video",
        "batch size 0",
    ],
)
def test_render_user_errors(case, bad_inputs, tmp_path, capsys):
    argv, words = bad_inputs[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.mp4"
    rc = main(["render", *argv, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0], lines[0]
    assert list(out_dir.iterdir()) == [], "a failed render left a file behind"


def test_render_exclusive_options(tmp_path, edtalk_weights, face_image, clips, short_pose_clip, capsys):
    out = tmp_path / "out.mp4"
    rc = _render(edtalk_weights, face_image, clips["wav_2s"], out, "--pose-video", str(short_pose_clip), "--still")
    assert rc == 2 and "not allowed with" in capsys.readouterr().err
    assert not out.exists()


def test_render_crash_midway_leaves_no_file(tmp_path, edtalk_weights, face_image, clips, monkeypatch):
    calls = {"n": 0}
    original = TorchRenderer._render

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TorchRenderer, "_render", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):  # a bug, not a user error: traceback kept
        _render(edtalk_weights, face_image, clips["wav_2s"], tmp_path / "out.mp4")
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []


def _decode_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)


def test_render_backends_agree(tmp_path, edtalk_weights, face_image, clips, still_render, capsys):
    """--backend onnxruntime (exported into the cache on first use) gives the torch backend's video."""
    out = tmp_path / "ort.mp4"
    assert _render(edtalk_weights, face_image, clips["wav_2s"], out, "--backend", "onnxruntime") == 0
    _check_output(out, 50)
    a, b = _decode_frames(out), _decode_frames(still_render["path"])
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 0.5, np.abs(a - b).mean()


def test_export_command(tmp_path, edtalk_weights, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "--weights", str(edtalk_weights), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrote 5 graphs" in text and "decoder.onnx" in text
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["audio2lip.onnx", "decoder.onnx", "encoder.onnx", "expression.onnx", "manifest.json", "motion.onnx"]
    )
    assert main(["export", "--weights", str(tmp_path / "nothing"), "--out", str(out)]) == 1
    assert capsys.readouterr().err.startswith("error: ")


# ------------------------------------------------------------------------------------------ process


def test_module_entry_point_exit_codes(tmp_path, lip_pose_weights, face_image, clips):
    out = tmp_path / "proc.mp4"
    base = [sys.executable, "-m", "edtalk_live.clients.cli", "render", "--weights", str(lip_pose_weights)]
    base += ["--image", str(face_image), "--out", str(out), "--no-progress"]
    ok = subprocess.run([*base, "--audio", str(clips["wav_1_23s"])], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.exists() and "30 frames" in ok.stdout
    out.unlink()

    bad = subprocess.run([*base, "--audio", str(tmp_path / "none.wav")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------ avatars


def test_render_default_avatar(tmp_path, edtalk_weights, clips, capsys):
    """No --image: the portrait shipped with the package is used (the README's run command)."""
    out = tmp_path / "default.mp4"
    rc = main(["render", "--weights", str(edtalk_weights), "--audio", str(clips["wav_1_23s"]), "--out", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    info = _check_output(out, 30)
    assert info["pixels"][0].shape[:2] == (64, 64)


def test_render_paste_back_keeps_the_photo_outside_the_face(tmp_path, edtalk_weights, clips, testdata, capsys):
    from PIL import Image

    photo = np.asarray(Image.open(testdata / "uncrop_face.jpg").convert("RGB"))
    out = tmp_path / "pasted.mp4"
    rc = main(["render", "--weights", str(edtalk_weights), "--image", str(testdata / "uncrop_face.jpg"),
               "--audio", str(clips["wav_1_23s"]), "--out", str(out), "--paste-back", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    frames = _decode_frames(out)
    h, w = photo.shape[0] - photo.shape[0] % 2, photo.shape[1] - photo.shape[1] % 2
    assert frames.shape[1:3] == (h, w)
    # the bottom rows (shoulders, far below the face crop) are the photo, up to H.264 coding noise
    assert np.abs(frames[0, -120:].astype(int) - photo[h - 120:h, :w].astype(int)).mean() < 3.0
    # the face region changed (the fixture networks draw noise there)
    cy, cx = h // 3, w // 2
    assert np.abs(frames[0, cy - 20:cy + 20, cx - 20:cx + 20].astype(int)
                  - photo[cy - 20:cy + 20, cx - 20:cx + 20].astype(int)).mean() > 10


def test_render_no_face_fails_cleanly(tmp_path, edtalk_weights, clips, capsys):
    from PIL import Image

    blank = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (120, 130, 140)).save(blank)
    out = tmp_path / "out.mp4"
    rc = main(["render", "--weights", str(edtalk_weights), "--image", str(blank), "--audio", str(clips["wav_2s"]),
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "no face found" in err and err.count("\n") == 1
    assert not out.exists()
