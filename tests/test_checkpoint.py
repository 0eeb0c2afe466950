"""Checkpoint layout, configuration inference and refusal of wrong or damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import edtalk_live.edtalk as edtalk
from edtalk_live.edtalk.audio2lip import Audio2Lip
from edtalk_live.edtalk.generator import Generator

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"parity fixtures not found at {FIXTURES}")

SMALL = edtalk.ModelConfig(family="edtalk", size=32, widths=(16, 16, 8, 8), style_dim=64, eem_hidden=16)


def _layout():
    return json.loads((FIXTURES / "official_checkpoint_layout.json").read_text())


@needs_fixtures
@pytest.mark.parametrize("file,family", [("EDTalk.pt", "edtalk"), ("EDTalk_lip_pose.pt", "lip_pose")])
def test_official_layout(file, family):
    spec = _layout()[file]
    cfg = spec["config"]
    config = edtalk.ModelConfig(
        family=family,
        size=cfg["size"],
        style_dim=cfg["style_dim"],
        lip_dim=cfg["lip_dim"],
        pose_dim=cfg["pose_dim"],
        exp_dim=cfg["exp_dim"],
    )
    gen = Generator(config)
    got = {k: list(v.shape) for k, v in gen.state_dict().items()}
    assert got == spec["tensors"]


@needs_fixtures
def test_audio2lip_layout():
    spec = _layout()["Audio2Lip.pt"]["tensors"]
    got = {k: list(v.shape) for k, v in Audio2Lip().state_dict().items()}
    assert got == spec


@pytest.mark.parametrize("family,exp_dim", [("edtalk", 10), ("lip_pose", 0)])
def test_config_roundtrip_other_sizes(family, exp_dim):
    """Size and widths are configuration: a non-official config is inferred back from its own tensors."""
    cfg = edtalk.ModelConfig(
        family=family, size=32, widths=(24, 16, 12, 8), style_dim=64, exp_dim=exp_dim, eem_hidden=16 if exp_dim else 128
    )
    torch.manual_seed(0)
    sd = Generator(cfg).state_dict()
    model = edtalk.load_model({"gen": sd})
    assert model.config == cfg
    src = model.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    exp = torch.zeros(2, exp_dim) if exp_dim else None
    out = model.render(src, lip=torch.randn(2, 20), pose=torch.randn(2, 6), exp=exp)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def _small_sd():
    torch.manual_seed(0)
    return Generator(SMALL).state_dict()


def test_load_from_path_and_bare_dict(tmp_path):
    sd = _small_sd()
    torch.save({"gen": sd}, tmp_path / "EDTalk.pt")
    a = edtalk.load_model(tmp_path / "EDTalk.pt")
    b = edtalk.load_model(sd)
    assert a.config == b.config == SMALL
    assert a.weights_id == b.weights_id and a.weights_id


def test_missing_file(tmp_path):
    with pytest.raises(edtalk.CheckpointError, match="EDTalk.pt.*not found"):
        edtalk.load_model(tmp_path / "EDTalk.pt")


def test_truncated_file(tmp_path):
    torch.save({"gen": _small_sd()}, tmp_path / "EDTalk.pt")
    data = (tmp_path / "EDTalk.pt").read_bytes()
    (tmp_path / "EDTalk.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(edtalk.CheckpointError, match="EDTalk.pt: cannot read") as e:
        edtalk.load_model(tmp_path / "EDTalk.pt")
    assert "\n" not in str(e.value)


def test_wrong_shape_names_tensor(tmp_path):
    sd = _small_sd()
    sd["dec.convs.1.conv.weight"] = sd["dec.convs.1.conv.weight"][:, :, :-1]
    torch.save({"gen": sd}, tmp_path / "EDTalk.pt")
    with pytest.raises(edtalk.CheckpointError, match=r"EDTalk.pt: tensor 'dec.convs.1.conv.weight' has shape"):
        edtalk.load_model(tmp_path / "EDTalk.pt")


def test_missing_tensor_named():
    sd = _small_sd()
    del sd["dec.to_flows.2.bias"]
    with pytest.raises(edtalk.CheckpointError, match="missing tensor 'dec.to_flows.2.bias'"):
        edtalk.load_model({"gen": sd})


def test_extra_tensor_named():
    sd = _small_sd()
    sd["dec.bogus"] = torch.zeros(1)
    with pytest.raises(edtalk.CheckpointError, match="unexpected tensor 'dec.bogus'"):
        edtalk.load_model({"gen": sd})


def test_nan_tensor_refused():
    sd = _small_sd()
    sd["fc.1.weight"][0, 0] = float("nan")
    with pytest.raises(edtalk.CheckpointError, match="fc.1.weight.*NaN"):
        edtalk.load_model({"gen": sd})


def test_swapped_files_refused(tmp_path):
    torch.save({"audio2lip": Audio2Lip().state_dict()}, tmp_path / "Audio2Lip.pt")
    torch.save({"gen": _small_sd()}, tmp_path / "EDTalk.pt")
    with pytest.raises(edtalk.CheckpointError, match="Audio2Lip"):
        edtalk.load_model(tmp_path / "Audio2Lip.pt")
    with pytest.raises(edtalk.CheckpointError, match="not Audio2Lip"):
        edtalk.load_model(tmp_path / "EDTalk.pt", audio2lip=tmp_path / "EDTalk.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "EDTalk.pt").write_text("hello")
    with pytest.raises(edtalk.CheckpointError, match="EDTalk.pt"):
        edtalk.load_model(tmp_path / "EDTalk.pt")


def test_bases_refresh_after_load():
    """Q follows the loaded directions (computed at load, not per frame)."""
    sd = _small_sd()
    model = edtalk.load_model({"gen": sd})
    q0 = model.Q.clone()
    sd2 = dict(sd)
    sd2["direction_lipnonlip.weight"] = torch.randn_like(sd["direction_lipnonlip.weight"])
    model.generator.load_state_dict(sd2)
    assert not torch.allclose(model.Q, q0)
    assert torch.allclose(model.Q.T @ model.Q, torch.eye(model.Q.shape[1]), atol=1e-5)


def test_no_qr_and_no_encoder_per_frame(monkeypatch):
    model = edtalk.load_model({"gen": _small_sd()})
    src = model.encode(torch.zeros(1, 3, 32, 32))
    calls = {"qr": 0, "enc": 0, "eem": 0}
    real_qr = torch.linalg.qr
    monkeypatch.setattr(
        torch.linalg, "qr", lambda *a, **k: (calls.__setitem__("qr", calls["qr"] + 1), real_qr(*a, **k))[1]
    )
    model.generator.enc.register_forward_hook(lambda *a: calls.__setitem__("enc", calls["enc"] + 1))
    for eem in model.generator.dec.fineadainresblock:
        eem.register_forward_hook(lambda *a: calls.__setitem__("eem", calls["eem"] + 1))
    exp = torch.randn(1, 10)
    for _ in range(3):
        model.render(src, lip=torch.randn(4, 20), pose=torch.randn(4, 6), exp=exp)
    n_eem = len(model.generator.dec.fineadainresblock)
    assert calls == {"qr": 0, "enc": 0, "eem": n_eem}, calls


def test_bad_coefficients_rejected():
    model = edtalk.load_model({"gen": _small_sd()})
    src = model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(edtalk.InputError, match=r"mouth coefficients must be \[B,20\]"):
        model.render(src, lip=torch.zeros(2, 19), pose=torch.zeros(2, 6))
    with pytest.raises(edtalk.InputError, match="images must be"):
        model.encode(torch.zeros(1, 3, 64, 64))
