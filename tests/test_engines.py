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


# ------------------------------------------------------------------------------------------- Renderer.device


def _output_devices(r, avatar, lip, pose) -> list[torch.device]:
    """Render once and return the device of what the backend's decoder hook produced."""
    seen = []
    hook = r._render

    def spy(*args, **kwargs):
        out = hook(*args, **kwargs)
        seen.append(out.device if torch.is_tensor(out) else torch.device("cpu"))
        return out

    r._render = spy
    try:
        r.render(avatar, lip, pose)
        r.render(avatar, lip, pose, raw=True)
    finally:
        del r._render
    return seen


def _cpu_and_gpu_renderers(model, onnx_dir):
    yield from _renderers(model, onnx_dir)
    if torch.cuda.is_available():
        import copy

        import onnxruntime as ort

        yield engines.create_renderer("torch", model=copy.deepcopy(model), device="cuda")
        if "CUDAExecutionProvider" in ort.get_available_providers():
            yield engines.create_renderer("onnxruntime", onnx_dir=onnx_dir,
                                          providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_device_is_where_the_outputs_come_from(setup):
    """Every backend reports a torch.device, and its prepared tensors and decoder output live there."""
    d, model, onnx_dir, _ = setup
    lip, pose, exp = _coeffs(d, model, 3)
    for r in _cpu_and_gpu_renderers(model, onnx_dir):
        assert isinstance(r.device, torch.device), r.describe()
        if r.device.type == "cuda":
            assert r.device.index is not None, "a CUDA device names its index"
        src = r.prepare_source(d["inputs"]["source"])
        wa_dev = src.wa.device if torch.is_tensor(src.wa) else torch.device("cpu")
        if torch.is_tensor(src.wa):
            assert wa_dev == r.device, r.describe()
        avatar = r.prepare_expression(src, exp)
        assert _output_devices(r, avatar, lip, pose) == [r.device, r.device], r.describe()
        imported = r.import_source(r.export_source(src))
        if torch.is_tensor(imported.wa):
            assert imported.wa.device == r.device and all(f.device == r.device for f in imported.feats)


def test_cpu_renderers_report_cpu(setup):
    _, model, onnx_dir, _ = setup
    for r in _renderers(model, onnx_dir):
        assert r.device == torch.device("cpu"), r.describe()


def test_onnxruntime_device_follows_the_providers(monkeypatch):
    from edtalk_live.engines.onnxruntime_backend import provider_device

    assert provider_device(["CPUExecutionProvider"]) == torch.device("cpu")
    assert provider_device([]) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert provider_device(["CUDAExecutionProvider", "CPUExecutionProvider"]) == torch.device("cuda", 0)
    assert provider_device([("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]) == torch.device(
        "cuda", 1)
    assert provider_device(["TensorrtExecutionProvider", "CUDAExecutionProvider"]).type == "cuda"
    assert provider_device(["CPUExecutionProvider", "CUDAExecutionProvider"]) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert provider_device(["CUDAExecutionProvider"]) == torch.device("cpu"), "no CUDA for torch: follow-up on cpu"


# ------------------------------------------------------------------------------------------- gathering avatars


def test_avatar_list_equals_each_avatars_frames_alone(setup):
    """Per-frame avatars (three identities, interleaved; one without expression) give the frames that
    rendering each avatar's frames on its own gives, on every CPU backend; a list of one avatar
    repeated is the same as the avatar itself."""
    d, model, onnx_dir, _ = setup
    b = 5
    lip, pose, exp = _coeffs(d, model, b)
    imgs = [d["inputs"]["source"], d["inputs"]["lip_frames"][:1], d["inputs"]["pose_frames"][:1]]
    pattern = [2, 0, 1, 0, 2]
    for r in _renderers(model, onnx_dir):
        avatars = [r.prepare_expression(r.prepare_source(im), e) for im, e in zip(imgs, [exp, None, exp],
                                                                                     strict=True)]
        per_frame = [avatars[k] for k in pattern]
        mixed = r.render(per_frame, lip, pose)
        mixed_raw = r.render(per_frame, lip, pose, raw=True)
        assert mixed.shape == (b, model.config.size, model.config.size, 3) and mixed.dtype == np.uint8
        for k, a in enumerate(avatars):
            idx = [i for i, p in enumerate(pattern) if p == k]
            alone_raw = r.render(a, lip[idx], pose[idx], raw=True)
            assert np.abs(mixed_raw[idx] - alone_raw).max() < 1e-4, r.describe()
            alone = engines.to_uint8_numpy(alone_raw)
            assert np.abs(mixed[idx].astype(int) - alone.astype(int)).max() <= 1, r.describe()
        one = r.render(avatars[0], lip, pose)
        assert np.array_equal(r.render([avatars[0]] * b, lip, pose), one), r.describe()
        assert np.array_equal(r.render([avatars[0]], lip, pose), one), r.describe()
        empty = r.render(per_frame[:0], lip[:0], pose[:0])
        assert empty.shape == (0, model.config.size, model.config.size, 3)


class _Recorder(engines.Renderer):
    """A backend whose decoder records what the base class hands it (numpy native arrays)."""

    name = "recorder"

    def __init__(self, config):
        super().__init__(config, "cpu")
        self.calls = []
        self.converted = 0

    def _prepare_source(self, image):
        n = len(engines.base.feat_shapes(self.config))
        v = float(image.mean())
        return engines.PreparedSource(np.full((1, 2), v, np.float32),
                                      tuple(np.full((1, 1, 2, 2), v + k, np.float32) for k in range(n)), self.name)

    def _expression_feats(self, source, exp):
        return tuple(f + float(exp.sum()) for f in source.feats)

    def _decoder_feats(self, feats):
        self.converted += 1
        return feats

    def _render(self, wa, feats, lip, pose, exp, raw):
        self.calls.append((wa, feats, lip, pose, exp))
        b, s = lip.shape[0], self.config.size
        return np.broadcast_to(wa[:, :1, None, None], (b, 3, s, s)).astype(np.float32) / 10

    def _read_motion(self, images):
        raise NotImplementedError

    def _audio_to_lip(self, mel):
        raise NotImplementedError


def test_base_gathers_avatars_for_the_backend(setup):
    _, model, _, _ = setup
    cfg = model.config
    r = _Recorder(cfg)
    assert r.device == torch.device("cpu")
    s = cfg.size
    srcs = [r.prepare_source(torch.full((1, 3, s, s), v)) for v in (0.1, 0.2, 0.3)]
    exp = torch.full((1, cfg.exp_dim), 0.5) if cfg.has_expression else None
    avatars = [r.prepare_expression(srcs[0], exp), r.prepare_expression(srcs[1], None),
               r.prepare_expression(srcs[2], exp)]
    lip, pose = torch.zeros(5, cfg.lip_dim), torch.zeros(5, cfg.pose_dim)

    r.render(avatars[0], lip, pose)                        # one avatar: batch-1 sources, broadcast later
    r.render([avatars[0]] * 5, lip, pose)                  # the same avatar for every frame: the same
    for wa, feats, _, _, e in r.calls:
        assert wa.shape == (1, 2) and all(f.shape[0] == 1 for f in feats)
        if cfg.has_expression:
            assert e.shape == (5, cfg.exp_dim) and torch.equal(e, exp.expand(5, -1))
        else:
            assert e is None
    assert r.calls[0][1] is r.calls[1][1] and r.converted == 1, "shared sources are converted once, then cached"

    r.calls.clear()
    pattern = [2, 0, 1, 0, 2]
    frames = r.render([avatars[k] for k in pattern], lip, pose, raw=True)
    wa, feats, _, _, e = r.calls[0]
    assert wa.shape == (5, 2) and all(f.shape[0] == 5 for f in feats)
    for row, k in enumerate(pattern):                      # frame order kept
        assert np.array_equal(wa[row], avatars[k].wa[0])
        assert all(np.array_equal(f[row], g[0]) for f, g in zip(feats, avatars[k].feats, strict=True))
        if cfg.has_expression:
            want = torch.zeros(cfg.exp_dim) if avatars[k].exp is None else exp[0]
            assert torch.equal(e[row], want)
    assert np.allclose(frames[:, 0, 0, 0], [avatars[k].wa[0, 0] / 10 for k in pattern])
    assert frames.dtype == np.float32

    with pytest.raises(edtalk.InputError, match="2 avatars for 5 frames"):
        r.render(avatars[:2], lip, pose)
    with pytest.raises(edtalk.InputError, match="mouth coefficients must be"):
        r.render(avatars[0], torch.zeros(5, cfg.lip_dim + 1), pose)
    with pytest.raises(edtalk.InputError, match="expected Avatar objects"):
        r.render([object()] * 5, lip, pose)
    torch_r = engines.create_renderer("torch", model=model, device="cpu")
    with pytest.raises(edtalk.InputError, match="prepared by backend 'recorder'"):
        torch_r.render(avatars[0], lip, pose)


def test_to_frames_converts_every_kind_of_output():
    raw = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    expected = engines.to_uint8_numpy(raw.numpy())
    assert np.array_equal(engines.to_frames(raw), expected)
    assert np.array_equal(engines.to_frames(raw.half()), engines.to_uint8_torch(raw.half()).numpy())
    assert np.array_equal(engines.to_frames(raw.numpy()), expected)
    assert np.array_equal(engines.to_frames(torch.from_numpy(expected)), expected)      # already uint8
    assert engines.to_frames(raw.half(), raw=True).dtype == np.float32
    assert np.array_equal(engines.to_frames(raw.numpy(), raw=True), raw.numpy())


# ------------------------------------------------------------------------------------------- the manifest


def test_export_writes_a_manifest_that_reads_back(setup):
    from edtalk_live.export.manifest import MANIFEST, MANIFEST_FORMAT, read_manifest

    _, model, onnx_dir, graphs = setup
    m = read_manifest(onnx_dir)
    assert m.path == Path(onnx_dir) / MANIFEST and m.format == MANIFEST_FORMAT
    assert m.model_config() == model.config and m.weights == model.weights_id
    assert set(m.graphs) == {g.stage for g in graphs}
    for g in graphs:
        assert m.graph_path(g.stage) == g.path and m.output_names(g.stage) == g.outputs
        assert m.graph(g.stage).inputs == g.inputs
    from edtalk_live.export.stages import feat_shapes

    want = [f"feat{k}" for k in range(len(feat_shapes(model.config)))]
    assert m.feat_names("decoder") == want
    if model.has_expression:
        assert m.feat_names("expression") == want


def test_manifest_validation(tmp_path):
    import json

    from edtalk_live.edtalk.config import ModelConfig
    from edtalk_live.export.manifest import (
        GraphEntry,
        ManifestError,
        graph_entry,
        read_manifest,
        write_manifest,
    )

    with pytest.raises(ManifestError, match="no ONNX export manifest here"):
        read_manifest(tmp_path)
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        read_manifest(tmp_path)
    good = {"config": {}, "graphs": {"decoder": {"file": "decoder.onnx", "inputs": {"wa": [-1, 4]},
                                                 "outputs": ["image"]}}}
    for bad, match in [
        ([], "expected a JSON object"),
        ({**good, "graphs": {}}, "at least one stage"),
        ({**good, "config": []}, "'config' must be an object"),
        ({**good, "format": 99}, "format 99 is newer"),
        ({**good, "graphs": {"decoder": {**good["graphs"]["decoder"], "file": "../x.onnx"}}}, "'file' must be"),
        ({**good, "graphs": {"decoder": {**good["graphs"]["decoder"], "inputs": {"wa": "B,4"}}}}, "'inputs' must"),
        ({**good, "graphs": {"decoder": {**good["graphs"]["decoder"], "outputs": "image"}}}, "'outputs' must"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ManifestError, match=match):
            read_manifest(tmp_path)
    path.write_text(json.dumps(good))                       # no "format": an older export, version 1
    m = read_manifest(tmp_path)
    assert m.format == 1 and m.input_names("decoder") == ["wa"] and m.feat_names() == []
    with pytest.raises(ManifestError, match="the export has no 'encoder' graph"):
        m.graph("encoder")
    with pytest.raises(ManifestError, match="missing ONNX graph"):
        m.graph_path("decoder")
    with pytest.raises(ManifestError, match="model config does not fit"):
        m.model_config()
    assert issubclass(ManifestError, edtalk.EDTalkError)

    cfg = ModelConfig()
    entry = graph_entry("decoder.onnx", {"wa": (-1, 4), "feat0": (-1, 2, 8, 8)}, ("image",))
    assert entry == GraphEntry("decoder.onnx", {"wa": [-1, 4], "feat0": [-1, 2, 8, 8]}, ["image"])
    write_manifest(tmp_path, cfg, {"decoder": entry}, weights="abc", opset=17)
    back = read_manifest(tmp_path)
    assert back.model_config() == cfg and back.weights == "abc" and back.opset == 17
    assert back.graphs == {"decoder": entry} and back.feat_names() == ["feat0"]


def test_no_backend_imports_another():
    """Backends share code through engines.base and export.manifest only."""
    import ast

    root = Path(engines.__file__).parent
    backends = {"torch_backend", "onnxruntime_backend", "tensorrt_backend"}
    for name in backends:
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        others = {m for m in imported if m.rsplit(".", 1)[-1] in backends - {name}}
        assert not others, f"{name} imports {sorted(others)}"


def test_default_backend_is_onnxruntime_on_a_cpu_and_torch_on_cuda(monkeypatch):
    import importlib.util

    from edtalk_live import engines

    want_cpu = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch"
    assert engines.default_backend("cpu") == want_cpu
    assert engines.default_backend("cuda:0") == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engines.default_backend(None) == want_cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engines.default_backend(None) == "torch"
