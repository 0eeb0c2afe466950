"""Exactness against the published networks: every output pinned by the fixtures, fp32 on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import edtalk_live.edtalk as edtalk

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"parity fixtures not found at {FIXTURES}")

TOL = 1e-4  # codes, coefficients, bases
TOL_IMG = 1e-3  # images


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {list(a.shape)} != {list(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", params=["edtalk_s64", "lip_pose_s64"])
def case(request):
    d = torch.load(FIXTURES / f"{request.param}.pt", weights_only=True)
    model = edtalk.load_model(d["checkpoint"], audio2lip=d["audio2lip_checkpoint"])
    return d, model


def test_config_inferred(case):
    d, model = case
    cfg = model.config
    assert cfg.family == d["variant"]
    assert cfg.size == d["size"]
    assert cfg.channels == {int(k): int(v) for k, v in d["channels"].items()}
    assert (cfg.style_dim, cfg.lip_dim, cfg.pose_dim, cfg.exp_dim) == (
        d["style_dim"],
        d["lip_dim"],
        d["pose_dim"],
        d["exp_dim"],
    )


def test_encoder(case):
    d, model = case
    src = model.encode(d["inputs"]["source"])
    o = d["outputs"]
    assert _max_err(src.wa, o["enc.wa"]) < TOL
    n = sum(1 for k in o if k.startswith("enc.feats."))
    assert len(src.feats) == n
    for i, f in enumerate(src.feats):
        assert _max_err(f, o[f"enc.feats.{i}"]) < TOL, f"feature map {i}"


def test_bases(case):
    d, model = case
    err = _max_err(model.Q, d["outputs"]["Q_all"])
    assert err < TOL, f"Q differs by {err}"
    eye = model.Q.T @ model.Q
    assert _max_err(eye, torch.eye(eye.shape[0])) < 1e-5


def test_motion_reader(case):
    d, model = case
    i, o = d["inputs"], d["outputs"]
    assert _max_err(model.read_motion(i["lip_frames"]).lip, o["alpha.lip"]) < TOL
    assert _max_err(model.read_motion(i["pose_frames"]).pose, o["alpha.pose"]) < TOL
    if model.has_expression:
        assert _max_err(model.read_motion(i["exp_frames"]).exp, o["alpha.exp"]) < TOL
    else:
        assert model.read_motion(i["exp_frames"]).exp is None


def _drivers(d, model):
    i = d["inputs"]
    lip = model.read_motion(i["lip_frames"]).lip
    pose = model.read_motion(i["pose_frames"]).pose
    exp = model.read_motion(i["exp_frames"]).exp if model.has_expression else None
    return lip, pose, exp


def test_video_driven(case):
    d, model = case
    lip, pose, exp = _drivers(d, model)
    src = model.encode(d["inputs"]["source"])
    err = _max_err(model.render(src, lip=lip, pose=pose, exp=exp), d["outputs"]["out.V"])
    assert err < TOL_IMG, f"V differs by {err}"


def test_audio_driven(case):
    d, model = case
    _, pose, exp = _drivers(d, model)
    src = model.encode(d["inputs"]["source"])
    err = _max_err(model.render(src, lip=d["inputs"]["lip_alpha"], pose=pose, exp=exp), d["outputs"]["out.A"])
    assert err < TOL_IMG, f"A differs by {err}"


def test_expression_weights(case):
    d, model = case
    if not model.has_expression:
        pytest.skip("lip_pose family has no expression")
    lip, pose, _ = _drivers(d, model)
    i, o = d["inputs"], d["outputs"]
    ew = o["in.exp_weights"]
    src = model.encode(i["source"])
    assert _max_err(model.render(src, lip=i["lip_alpha"], pose=pose, exp=ew), o["out.A_expw"]) < TOL_IMG
    assert _max_err(model.render(src, lip=lip, pose=pose, exp=ew), o["out.V_expw"]) < TOL_IMG


def test_reconstruction_lip_pose(case):
    d, model = case
    if model.has_expression:
        pytest.skip("recon output exists for the lip_pose family only")
    m = model.read_motion(d["inputs"]["lip_frames"])
    src = model.encode(d["inputs"]["source"])
    assert _max_err(model.render(src, lip=m.lip, pose=m.pose), d["outputs"]["out.recon"]) < TOL_IMG


def test_audio2lip(case):
    d, model = case
    raw = model.audio_to_lip(d["inputs"]["mel_windows"])
    assert _max_err(raw, d["outputs"]["audio2lip.raw"]) < TOL
    assert _max_err(edtalk.audio.smooth(raw), d["outputs"]["audio2lip.smoothed"]) < TOL


def test_source_broadcast_and_batch_consistency(case):
    """A batch-1 source renders B frames; each frame equals rendering it alone."""
    d, model = case
    lip, pose, exp = _drivers(d, model)
    src = model.encode(d["inputs"]["source"])
    lips = torch.cat([lip, lip.flip(0), lip])
    poses = torch.cat([pose, pose, pose.flip(0)])
    exps = exp[:1] if exp is not None else None
    batch = model.render(src, lip=lips, pose=poses, exp=exps)
    for k in range(lips.shape[0]):
        one = model.render(src, lip=lips[k : k + 1], pose=poses[k : k + 1], exp=exps)
        assert _max_err(batch[k : k + 1], one) < 1e-4
