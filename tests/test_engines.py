"""Every backend against the torch fp32 reference, and the exported graphs against edtalk.load_model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import edtalk_live.edtalk as edtalk
import edtalk_live.engines as engines
from edtalk_live.export.onnx import export_model, read_metadata
from edtalk_live.export.trt_compat import check_graph

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"parity fixtures not found at {FIXTURES}")

#: named tolerances (max abs error of raw output against torch fp32)
TOL_FP32 = 1e-3
TOL_COEFF = 1e-4
PSNR_FP16_DB = 40.0


@pytest.fixture(scope="module", params=["edtalk_s64", "lip_pose_s64"])
def setup(request, tmp_path_factory):
    d = torch.load(FIXTURES / f"{request.param}.pt", weights_only=True)
    model = edtalk.load_model(d["checkpoint"], audio2lip=d["audio2lip_checkpoint"])
    out = tmp_path_factory.mktemp(request.param)
    graphs = export_model(model, out)
    return d, model, out, graphs


def _renderers(model, onnx_dir):
    yield engines.create_renderer("torch", model=model, device="cpu")
    yield engines.create_renderer("onnxruntime", onnx_dir=onnx_dir, providers=["CPUExecutionProvider"])


def _coeffs(d, model, b):
    """b frames of mouth/pose coefficients drawn from the fixture's driving inputs."""
    i = d["inputs"]
    m = model.read_motion(torch.cat([i["lip_frames"], i["pose_frames"]]))
    lip = torch.cat([i["lip_alpha"], m.lip])
    pose = torch.cat([m.pose, m.pose.flip(0)])
    idx = torch.arange(b) % lip.shape[0]
    exp = m.exp[:1] if m.exp is not None else None
    return lip[idx], pose[idx], exp


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_backends_match_torch_fp32(setup, batch):
    d, model, onnx_dir, _ = setup
    lip, pose, exp = _coeffs(d, model, batch)
    src_img = d["inputs"]["source"]
    ref = model.render(model.encode(src_img), lip=lip, pose=pose, exp=exp).numpy()
    for r in _renderers(model, onnx_dir):
        avatar = r.prepare_expression(r.prepare_source(src_img), exp)
        raw = r.render(avatar, lip, pose, raw=True)
        err = float(np.abs(raw - ref).max())
        assert err < TOL_FP32, f"{r.describe()} differs by {err:.2e} at batch {batch}"
        frames = r.render(avatar, lip, pose)
        assert frames.dtype == np.uint8 and frames.shape == (batch, model.config.size, model.config.size, 3)
        expected = np.rint((np.clip(ref, -1, 1) + 1) * 127.5).transpose(0, 2, 3, 1)
        assert np.abs(frames.astype(int) - expected).max() <= 1


def test_per_frame_avatars(setup):
    """Frames of different identities in one call (multi-session batching) equal separate calls."""
    d, model, onnx_dir, _ = setup
    lip, pose, exp = _coeffs(d, model, 4)
    imgs = [d["inputs"]["source"], d["inputs"]["lip_frames"][:1]]
    for r in _renderers(model, onnx_dir):
        avatars = [r.prepare_expression(r.prepare_source(im), exp) for im in imgs]
        per_frame = [avatars[k % 2] for k in range(4)]
        mixed = r.render(per_frame, lip, pose, raw=True)
        for k in range(4):
            alone = r.render(per_frame[k], lip[k:k + 1], pose[k:k + 1], raw=True)
            assert np.abs(mixed[k:k + 1] - alone).max() < 1e-4, r.describe()


def test_motion_and_audio_stages(setup):
    d, model, onnx_dir, _ = setup
    i = d["inputs"]
    ref_m = model.read_motion(i["exp_frames"])
    ref_lip = model.audio_to_lip(i["mel_windows"])
    for r in _renderers(model, onnx_dir):
        m = r.read_motion(i["exp_frames"])
        assert (m.pose - ref_m.pose).abs().max() < TOL_COEFF
        assert (m.lip - ref_m.lip).abs().max() < TOL_COEFF
        if model.has_expression:
            assert (m.exp - ref_m.exp).abs().max() < TOL_COEFF
        assert (r.audio_to_lip(i["mel_windows"]) - ref_lip).abs().max() < TOL_COEFF


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_exported_graphs_match_load_model(setup, batch):
    """Run the exported graphs directly with ONNX Runtime on fixture inputs, stage by stage."""
    import onnxruntime as ort

    d, model, onnx_dir, _ = setup
    sess = {p.stem: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            for p in Path(onnx_dir).glob("*.onnx")}
    imgs = torch.cat([d["inputs"]["lip_frames"], d["inputs"]["pose_frames"], d["inputs"]["exp_frames"]])
    imgs = imgs[torch.arange(batch) % imgs.shape[0]]
    wa, *feats = sess["encoder"].run(None, {"image": imgs.numpy()})
    src = model.encode(imgs)
    assert np.abs(wa - src.wa.numpy()).max() < TOL_COEFF
    for f, g in zip(feats, src.feats, strict=True):
        assert np.abs(f - g.numpy()).max() < TOL_COEFF
    outs = sess["motion"].run(None, {"image": imgs.numpy()})
    m = model.read_motion(imgs)
    for got, ref in zip(outs, [m.lip, m.pose] + ([m.exp] if m.exp is not None else []), strict=True):
        assert np.abs(got - ref.numpy()).max() < TOL_COEFF
    lip, pose, exp = _coeffs(d, model, batch)
    feeds = {"wa": wa, "lip": lip.numpy(), "pose": pose.numpy()}
    dfeats = feats
    if model.has_expression:
        e = exp.expand(batch, -1).contiguous().numpy()
        dfeats = sess["expression"].run(None, {**{f"feat{k}": f for k, f in enumerate(feats)}, "exp": e})
        feeds["exp"] = e
    feeds.update({f"feat{k}": f for k, f in enumerate(dfeats)})
    img = sess["decoder"].run(None, feeds)[0]
    ref = model.render(src, lip=lip, pose=pose, exp=exp.expand(batch, -1) if exp is not None else None)
    assert np.abs(img - ref.numpy()).max() < TOL_FP32


def test_graphs_are_tensorrt_compatible_and_stamped(setup):
    d, model, onnx_dir, graphs = setup
    stages = {g.stage for g in graphs}
    expected = {"encoder", "motion", "audio2lip", "decoder"} | ({"expression"} if model.has_expression else set())
    assert stages == expected
    for g in graphs:
        assert check_graph(g.path) == [], g.stage
        meta = read_metadata(g.path)
        assert meta["edtalk.family"] == model.config.family
        assert meta["edtalk.size"] == str(model.config.size)
        assert meta["edtalk.weights"] == model.weights_id
        assert meta["edtalk.stage"] == g.stage
        onnx.checker.check_model(str(g.path))
        graph = onnx.load(str(g.path)).graph
        ops = {n.op_type for n in graph.node}
        assert not ops & {"Loop", "If"}, g.stage
        axes = {v.name: v.type.tensor_type.shape.dim[0].dim_param for v in [*graph.input, *graph.output]}
        for name, axis in axes.items():
            tied_to_source = g.stage == "decoder" and (name == "wa" or name.startswith("feat"))
            assert axis == ("src_batch" if tied_to_source else "batch"), (g.stage, name, axis)


def test_trt_check_rejects_per_sample_conv(tmp_path):
    """A convolution whose weights are a graph input (per-sample modulated conv) is flagged."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, ["batch", 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "c", 8, 8])
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1])
    qr = helper.make_node("Einsum", ["x"], ["z"], equation="bchw->bc")
    graph = helper.make_graph([node, qr], "g", [x, w], [y])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    problems = check_graph(path)
    assert any("non-constant weights" in p for p in problems)
    assert any("axis 1 is dynamic" in p for p in problems)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    a = np.clip(a, -1, 1)
    b = np.clip(b, -1, 1)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_torch_cuda_fp16_psnr(setup, batch):
    d, model, _, _ = setup
    lip, pose, exp = _coeffs(d, model, batch)
    ref = model.render(model.encode(d["inputs"]["source"]), lip=lip, pose=pose, exp=exp).numpy()
    import copy

    r = engines.create_renderer("torch", model=copy.deepcopy(model), device="cuda")
    avatar = r.prepare_expression(r.prepare_source(d["inputs"]["source"]), exp)
    raw = r.render(avatar, lip, pose, raw=True)
    assert _psnr(raw, ref) >= PSNR_FP16_DB
    frames = r.render(avatar, lip, pose)                 # CUDA-graph path
    expected = np.rint((np.clip(ref, -1, 1) + 1) * 127.5).transpose(0, 2, 3, 1)
    assert _psnr(frames / 127.5 - 1, expected / 127.5 - 1) >= PSNR_FP16_DB - 3


def test_unknown_backend():
    with pytest.raises(edtalk.EDTalkError, match="unknown backend 'tensorflow'"):
        engines.create_renderer("tensorflow")


def test_render_rejects_bad_coefficients(setup):
    d, model, onnx_dir, _ = setup
    r = engines.create_renderer("torch", model=model, device="cpu")
    avatar = r.prepare_expression(r.prepare_source(d["inputs"]["source"]), None)
    with pytest.raises(edtalk.InputError, match="pose coefficients must be"):
        r.render(avatar, torch.zeros(2, 20), torch.zeros(3, 6))
    with pytest.raises(edtalk.InputError, match="2 avatars for 3 frames"):
        r.render([avatar, avatar], torch.zeros(3, 20), torch.zeros(3, 6))


def test_expression_cache_is_lru(setup):
    d, model, _, _ = setup
    if not model.has_expression:
        pytest.skip("lip_pose family has no expression")
    from edtalk_live.engines.base import EXPRESSION_CACHE_SIZE

    r = engines.create_renderer("torch", model=model, device="cpu")
    src = r.prepare_source(d["inputs"]["source"])
    keep = r.prepare_expression(src, torch.ones(1, 10))
    for k in range(EXPRESSION_CACHE_SIZE * 2):
        r.prepare_expression(src, torch.full((1, 10), float(k) / 100))
        assert r.prepare_expression(src, torch.ones(1, 10)) is keep     # used often: never evicted
    assert len(src.cache) == EXPRESSION_CACHE_SIZE
