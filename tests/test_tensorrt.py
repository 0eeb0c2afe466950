"""TensorRT build + runner.

Three layers of tests:

* pure logic (everywhere): engine keys, options, profile shapes, error messages;
* the build/cache/runner control flow against a small fake ``tensorrt`` module that implements the
  calls :mod:`edtalk_live.engines.trt_build` and :mod:`edtalk_live.engines.tensorrt_backend` make (everywhere; it
  checks our
  side of the API, not TensorRT);
* the real thing (``-m "tensorrt and gpu"``): engines built from the exported fixture graphs, the
  engine cache, and parity with ``EDTalkModel.render``. Skipped with a reason when ``tensorrt`` is
  not importable or there is no CUDA GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.engines import trt_build
from edtalk_live.engines.trt_build import (
    BuildOptions,
    EngineBuildError,
    batch_axis_name,
    build_all,
    build_engine,
    engine_file,
    engine_key,
    format_parser_errors,
    profile_shapes,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"

#: named tolerances: max abs error of TensorRT FP32 raw frames / coefficients against PyTorch FP32 (CPU)
TOL_FP32 = 1e-3
TOL_COEFF = 1e-4
#: FP16 engine frames against FP32 engine frames
PSNR_FP16_DB = 40.0


# ================================================================================================ pure logic


def test_engine_key_changes_with_every_input(tmp_path):
    onnx_a = tmp_path / "a.onnx"
    onnx_b = tmp_path / "b.onnx"
    onnx_a.write_bytes(b"graph-bytes-1")
    onnx_b.write_bytes(b"graph-bytes-2")
    opts = BuildOptions(fp16=True, max_batch=64)
    key = engine_key(onnx_a, opts, "NVIDIA H100", "10.9.0")
    assert len(key) == 64 and int(key, 16) >= 0
    assert engine_key(onnx_a, BuildOptions(fp16=True, max_batch=64), "NVIDIA H100", "10.9.0") == key
    variants = {
        "onnx bytes": engine_key(onnx_b, opts, "NVIDIA H100", "10.9.0"),
        "fp16": engine_key(onnx_a, BuildOptions(fp16=False, max_batch=64), "NVIDIA H100", "10.9.0"),
        "max batch": engine_key(onnx_a, BuildOptions(fp16=True, max_batch=32), "NVIDIA H100", "10.9.0"),
        "opt batch": engine_key(onnx_a, BuildOptions(fp16=True, opt_batch=8), "NVIDIA H100", "10.9.0"),
        "gpu": engine_key(onnx_a, opts, "NVIDIA A100-SXM4-80GB", "10.9.0"),
        "tensorrt": engine_key(onnx_a, opts, "NVIDIA H100", "11.1.0"),
    }
    for what, other in variants.items():
        assert other != key, f"key does not change with the {what}"
    assert len(set(variants.values())) == len(variants)
    # the timing cache location does not change the engine
    assert engine_key(onnx_a, BuildOptions(fp16=True, timing_cache=tmp_path / "t.cache"), "NVIDIA H100",
                      "10.9.0") == key
    onnx_a.write_bytes(b"graph-bytes-1!")
    assert engine_key(onnx_a, opts, "NVIDIA H100", "10.9.0") != key
    assert engine_file(tmp_path, "decoder", key).name == f"decoder-{key[:16]}.engine"


def test_missing_tensorrt_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # makes `import tensorrt` raise ImportError
    with pytest.raises(EDTalkError) as info:
        trt_build.require_tensorrt()
    msg = str(info.value)
    assert "\n" not in msg
    assert "TensorRT is not installed" in msg and "edtalk-live[tensorrt]" in msg
    with pytest.raises(EDTalkError, match=r"edtalk-live\[tensorrt\]"):
        build_all(tmp_path)
    with pytest.raises(EDTalkError, match=r"edtalk-live\[tensorrt\]"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.engine")
    from edtalk_live.engines.tensorrt_backend import TensorRTRenderer

    with pytest.raises(EDTalkError, match=r"edtalk-live\[tensorrt\]"):
        TensorRTRenderer(tmp_path)


def test_renderer_needs_cuda(monkeypatch, tmp_path):
    from edtalk_live.engines import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "require_tensorrt", lambda: SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EDTalkError, match="needs a CUDA GPU"):
        tensorrt_backend.TensorRTRenderer(tmp_path)


def test_build_options():
    assert BuildOptions(max_batch=8).opt_batch == 8                  # opt clamped to max
    assert BuildOptions(max_batch=64, opt_batch=16).opt_batch == 16
    with pytest.raises(InputError, match="max batch must be >= 1"):
        BuildOptions(max_batch=0)
    with pytest.raises(InputError, match="opt batch"):
        BuildOptions(opt_batch=0)
    with pytest.raises(InputError, match="workspace"):
        BuildOptions(workspace_gb=0)
    assert "timing_cache" not in BuildOptions().key_fields()


def test_profile_shapes_per_input():
    opts = BuildOptions(max_batch=32, opt_batch=8)
    assert batch_axis_name("decoder", "wa") == "src_batch"
    assert batch_axis_name("decoder", "feat3") == "src_batch"
    assert batch_axis_name("decoder", "lip") == "batch"
    assert batch_axis_name("expression", "feat0") == "batch"
    assert profile_shapes("decoder", "wa", (-1, 512), opts) == ((1, 512), (1, 512), (32, 512))
    assert profile_shapes("decoder", "feat1", (-1, 64, 16, 16), opts)[1] == (1, 64, 16, 16)
    assert profile_shapes("decoder", "lip", (-1, 20), opts) == ((1, 20), (8, 20), (32, 20))
    assert profile_shapes("encoder", "image", (-1, 3, 64, 64), opts) == ((1, 3, 64, 64), (8, 3, 64, 64),
                                                                          (32, 3, 64, 64))
    with pytest.raises(EngineBuildError, match="only the batch axis may be dynamic"):
        profile_shapes("encoder", "image", (-1, 3, -1, 64), opts)


def test_parser_errors_are_reported_with_their_nodes():
    def error(node, name, op, desc):
        return SimpleNamespace(node=lambda: node, node_name=lambda: name, node_operator=lambda: op,
                               desc=lambda: desc)

    errors = [error(3, "/dec/GridSample", "GridSample", "Unsupported mode\n'bicubic'"),
              error(7, "/dec/If", "If", "Loop/If not supported")]
    parser = SimpleNamespace(num_errors=2, get_error=lambda i: errors[i])
    msg = format_parser_errors(parser, "exports/decoder.onnx")
    assert "\n" not in msg
    assert msg.startswith("exports/decoder.onnx: TensorRT cannot parse the graph")
    assert "node 3 (/dec/GridSample, GridSample): Unsupported mode 'bicubic'" in msg
    assert "node 7 (/dec/If, If)" in msg


# ================================================================================================ fake TensorRT


def _onnx_graph(path: Path, kind: str = "decoder") -> Path:
    """A tiny graph with the demodulation pattern (pow, matmul, +eps, sqrt, 1/x) and a shape computation."""
    import onnx
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    if kind == "decoder":
        inputs = [helper.make_tensor_value_info("wa", f, ["src_batch", 4]),
                  helper.make_tensor_value_info("feat0", f, ["src_batch", 4]),
                  helper.make_tensor_value_info("lip", f, ["src_batch", 4])]   # merged names, as onnxslim leaves them
        first = "wa"
    else:
        inputs = [helper.make_tensor_value_info("mel", f, ["batch", 4])]
        first = "mel"
    out = helper.make_tensor_value_info("image", f, ["batch", 4])
    inits = [helper.make_tensor("two", f, [], [2.0]), helper.make_tensor("eps", f, [], [1e-8]),
             helper.make_tensor("one", f, [], [1.0]), helper.make_tensor("w", f, [4, 4], [0.1] * 16)]
    nodes = [
        helper.make_node("Pow", [first, "two"], ["sq"], name="/mod/Pow"),
        helper.make_node("MatMul", ["sq", "w"], ["mm"], name="/mod/MatMul"),
        helper.make_node("Add", ["mm", "eps"], ["mm_eps"], name="/mod/Add_eps"),
        helper.make_node("Sqrt", ["mm_eps"], ["sqrt"], name="/mod/Sqrt"),
        helper.make_node("Div", ["one", "sqrt"], ["demod"], name="/mod/Div"),
        helper.make_node("Shape", [first], ["shp"], name="/mod/Shape"),
        helper.make_node("Mul", [first, "demod"], ["image0"], name="/mod/Mul"),
    ]
    if kind == "decoder":
        nodes += [helper.make_node("Add", ["image0", "feat0"], ["image1"], name="/mod/Add_feat"),
                  helper.make_node("Add", ["image1", "lip"], ["image"], name="/mod/Add_lip")]
    else:
        nodes += [helper.make_node("Identity", ["image0"], ["image"], name="/mod/Identity")]
    graph = helper.make_graph(nodes, kind, inputs, [out], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _fake_export(tmp_path: Path) -> Path:
    d = tmp_path / "onnx"
    d.mkdir()
    _onnx_graph(d / "decoder.onnx", "decoder")
    _onnx_graph(d / "audio2lip.onnx", "audio2lip")
    manifest = {"config": {}, "graphs": {"audio2lip": {"file": "audio2lip.onnx", "inputs": {"mel": [-1, 4]},
                                                       "outputs": ["image"]},
                                         "decoder": {"file": "decoder.onnx",
                                                     "inputs": {"wa": [-1, 4], "feat0": [-1, 4], "lip": [-1, 4]},
                                                     "outputs": ["image"]}}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


class _Enum:
    def __init__(self, *names):
        for i, n in enumerate(names):
            setattr(self, n, i)


def make_fake_tensorrt(version: str = "10.9.0", weak_typing: bool = True, parse_ok: bool = True):
    """A stand-in for the ``tensorrt`` module with the calls the project makes (names as in TensorRT 10/11)."""
    import onnx

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32, trt.float16, trt.int64, trt.int32 = "float32", "float16", "int64", "int32"
    trt.LayerType = _Enum("CONVOLUTION", "ELEMENTWISE", "UNARY", "REDUCE", "NORMALIZATION", "MATRIX_MULTIPLY",
                          "GRID_SAMPLE", "CONSTANT", "SHAPE", "IDENTITY")
    trt.UnaryOperation = _Enum("EXP", "SQRT", "RECIP", "ABS")
    trt.ElementWiseOperation = _Enum("SUM", "PROD", "DIV", "POW", "SUB")
    flags = ["TF32", "PREFER_PRECISION_CONSTRAINTS", "OBEY_PRECISION_CONSTRAINTS"]
    trt.BuilderFlag = _Enum(*(flags + ["FP16"] if weak_typing else flags))
    trt.NetworkDefinitionCreationFlag = _Enum("STRONGLY_TYPED")
    trt.MemoryPoolType = _Enum("WORKSPACE")
    trt.TensorIOMode = _Enum("NONE", "INPUT", "OUTPUT")
    trt.calls = []                                              # what the code under test did

    class ILogger:
        def __init__(self):
            pass

    class Tensor:
        def __init__(self, name, shape=(), dtype="float32"):
            self.name, self.shape, self.dtype = name, tuple(shape), dtype
            self.is_execution_tensor, self.is_shape_tensor = True, False
            self.dim_names = {}

        def set_dimension_name(self, index, name):
            self.dim_names[index] = name

    class ILayer:
        def __init__(self, name, type_, op, inputs, outputs):
            self.name, self.type, self.op = name, type_, op
            self._in, self._out = inputs, outputs
            self.precision = None
            self.output_types = {}

        num_inputs = property(lambda self: len(self._in))
        num_outputs = property(lambda self: len(self._out))

        def get_input(self, i):
            return self._in[i]

        def get_output(self, i):
            return self._out[i]

        def set_output_type(self, i, dtype):
            self.output_types[i] = dtype

    class IUnaryLayer(ILayer):
        pass

    class IElementWiseLayer(ILayer):
        pass

    lt, uo, eo = trt.LayerType, trt.UnaryOperation, trt.ElementWiseOperation
    ops = {"Pow": (lt.ELEMENTWISE, eo.POW), "Div": (lt.ELEMENTWISE, eo.DIV), "Add": (lt.ELEMENTWISE, eo.SUM),
           "Mul": (lt.ELEMENTWISE, eo.PROD), "Sqrt": (lt.UNARY, uo.SQRT), "Reciprocal": (lt.UNARY, uo.RECIP),
           "MatMul": (lt.MATRIX_MULTIPLY, None), "Shape": (lt.SHAPE, None), "Identity": (lt.IDENTITY, None)}

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs, self.layers = flags, [], [], []

        num_inputs = property(lambda self: len(self.inputs))
        num_layers = property(lambda self: len(self.layers))

        def get_input(self, i):
            return self.inputs[i]

        def get_layer(self, i):
            return self.layers[i]

    class ParserError:
        def node(self):
            return 4

        def node_name(self):
            return "/mod/Sqrt"

        def node_operator(self):
            return "Sqrt"

        def desc(self):
            return "fake failure"

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            trt.calls.append(("parse_from_file", path))
            return self._load(onnx.load(path))

        def parse(self, data, path=None):
            trt.calls.append(("parse", path))
            return self._load(onnx.load_from_string(data))

        def get_error(self, i):
            return ParserError()

        def _load(self, model):
            if not parse_ok:
                self.num_errors = 1
                return False
            g = model.graph
            tensors = {}
            for v in g.input:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                tensors[v.name] = Tensor(v.name, dims)
                self.network.inputs.append(tensors[v.name])
            for init in g.initializer:
                tensors[init.name] = Tensor(init.name)
                self.network.layers.append(ILayer(init.name, lt.CONSTANT, None, [], [tensors[init.name]]))
            for n in g.node:
                type_, op = ops[n.op_type]
                ins = [tensors[x] for x in n.input]
                dtype = "int64" if n.op_type == "Shape" else "float32"
                outs = [tensors.setdefault(x, Tensor(x, dtype=dtype)) for x in n.output]
                self.network.layers.append(ILayer(n.name, type_, op, ins, outs))
            self.network.outputs = [o.name for o in g.output]
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pool, self.cache = set(), [], {}, None

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            trt.calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.calls.append(("build", network, config))
            plan = {"inputs": {t.name: list(t.shape) for t in network.inputs},
                    "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()},
                    "outputs": network.outputs}
            return json.dumps(plan).encode()

    class Engine:
        def __init__(self, plan):
            self.plan = plan
            self.names = list(plan["inputs"]) + list(plan["outputs"])

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.plan["inputs"] else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.float32

        def get_tensor_shape(self, name):
            return self.plan["inputs"][name] if name in self.plan["inputs"] else [-1, 4]

        def get_tensor_profile_shape(self, name, index):
            return self.plan["profile"][name]

        def create_execution_context(self):
            return Context()

    class Context:
        def __init__(self):
            self.shapes, self.addresses, self.enqueued = {}, {}, []

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def get_tensor_shape(self, name):
            return (max(s[0] for s in self.shapes.values()), 4)

        def execute_async_v3(self, stream_handle):
            self.enqueued.append(stream_handle)
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(json.loads(bytes(data)))

    for cls in (ILogger, OnnxParser, Builder, Runtime, IUnaryLayer, IElementWiseLayer):
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a fake ``tensorrt`` and a fake CUDA device named "Fake GPU" (CPU only)."""
    pytest.importorskip("onnx")

    def install(**kw):
        trt = make_fake_tensorrt(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        trt_build.trt_logger.cache_clear()
        return trt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "device", lambda device=None: contextlib.nullcontext())
    yield install
    trt_build.trt_logger.cache_clear()


def test_fake_build_profiles_flags_and_fp32_layers(fake_trt, tmp_path):
    trt = fake_trt()
    onnx_path = _onnx_graph(tmp_path / "decoder.onnx")
    opts = BuildOptions(fp16=True, max_batch=16, opt_batch=4, timing_cache=tmp_path / "timing.cache")
    out = build_engine(onnx_path, tmp_path / "e" / "decoder.engine", opts)
    assert out.is_file() and not list(out.parent.glob("*.tmp"))
    (_, network, config), = [c for c in trt.calls if c[0] == "build"]
    assert network.flags == 0                                  # TensorRT 10 FP16: weakly typed network
    assert trt.BuilderFlag.FP16 in config.flags and trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS in config.flags
    assert trt.BuilderFlag.TF32 not in config.flags
    assert config.pool[trt.MemoryPoolType.WORKSPACE] == 4 << 30
    profile = config.profiles[0].shapes
    assert profile["wa"] == ((1, 4), (1, 4), (16, 4))           # src_batch: opt 1
    assert profile["feat0"] == ((1, 4), (1, 4), (16, 4))
    assert profile["lip"] == ((1, 4), (4, 4), (16, 4))          # frame batch: opt 4
    names = {t.name: t.dim_names[0] for t in network.inputs}
    assert names == {"wa": "src_batch", "feat0": "src_batch", "lip": "batch"}
    fp32 = {layer.name for layer in network.layers if layer.precision == trt.float32}
    assert fp32 == {"/mod/Pow", "/mod/MatMul", "/mod/Add_eps", "/mod/Sqrt", "/mod/Div"}
    for layer in network.layers:
        if layer.name in fp32:
            assert layer.output_types == {0: trt.float32}
    assert (tmp_path / "timing.cache").read_bytes() == b"+"   # empty cache serialized after the build


def test_fake_build_fp32_is_strongly_typed(fake_trt, tmp_path):
    trt = fake_trt()
    build_engine(_onnx_graph(tmp_path / "decoder.onnx"), tmp_path / "decoder.engine", BuildOptions(fp16=False))
    (_, network, config), = [c for c in trt.calls if c[0] == "build"]
    assert network.flags == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert trt.BuilderFlag.FP16 not in config.flags
    assert all(layer.precision is None for layer in network.layers)


def test_fake_tensorrt11_fp16_needs_autocast(fake_trt, tmp_path):
    fake_trt(version="11.1.0", weak_typing=False)
    try:
        import modelopt.onnx.autocast  # noqa: F401
    except ImportError:
        with pytest.raises(EDTalkError, match="nvidia-modelopt"):
            build_engine(_onnx_graph(tmp_path / "decoder.onnx"), tmp_path / "d.engine", BuildOptions(fp16=True))
    else:
        pytest.skip("ModelOpt is installed; the AutoCast path is covered by the GPU tests")


def test_fake_parse_failure(fake_trt, tmp_path):
    fake_trt(parse_ok=False)
    with pytest.raises(EngineBuildError) as info:
        build_engine(_onnx_graph(tmp_path / "decoder.onnx"), tmp_path / "d.engine", BuildOptions())
    msg = str(info.value)
    assert "\n" not in msg and "node 4 (/mod/Sqrt, Sqrt): fake failure" in msg
    assert not (tmp_path / "d.engine").exists()


def test_fake_build_all_caches_engines(fake_trt, tmp_path):
    trt = fake_trt()
    onnx_dir = _fake_export(tmp_path)
    cache = tmp_path / "engines"
    opts = BuildOptions(fp16=True, max_batch=8)
    first = build_all(onnx_dir, cache, opts, progress=False)
    assert set(first) == {"audio2lip", "decoder"}
    assert sum(c[0] == "build" for c in trt.calls) == 2
    key = engine_key(onnx_dir / "decoder.onnx", opts, "Fake GPU", "10.9.0")
    assert first["decoder"] == cache / f"decoder-{key[:16]}.engine"
    assert list(cache.glob("timing-fake-gpu-trt10.9.0.cache"))
    mtimes = {s: p.stat().st_mtime_ns for s, p in first.items()}

    def no_build(*a, **kw):
        raise AssertionError("rebuilt a cached engine")

    second = build_all(onnx_dir, cache, opts, progress=False, builder=no_build)
    assert second == first
    assert {s: p.stat().st_mtime_ns for s, p in second.items()} == mtimes
    # another option: new engines next to the old ones
    third = build_all(onnx_dir, cache, BuildOptions(fp16=False, max_batch=8), progress=False)
    assert third["decoder"] != first["decoder"] and first["decoder"].is_file()


def test_fake_build_all_reads_the_manifest(fake_trt, tmp_path):
    from edtalk_live.export.manifest import ManifestError

    fake_trt()
    with pytest.raises(ManifestError, match="no ONNX export manifest here"):
        build_all(tmp_path, tmp_path / "engines", BuildOptions(), progress=False)
    onnx_dir = _fake_export(tmp_path)
    (onnx_dir / "audio2lip.onnx").unlink()
    with pytest.raises(ManifestError, match=r"audio2lip.onnx: missing ONNX graph \(listed in .*manifest.json\)"):
        build_all(onnx_dir, tmp_path / "engines", BuildOptions(), progress=False)


def test_fake_runner_binds_tensors(fake_trt, tmp_path):
    from edtalk_live.engines.tensorrt_backend import TRTEngine

    fake_trt()
    path = build_engine(_onnx_graph(tmp_path / "decoder.onnx"), tmp_path / "decoder.engine",
                        BuildOptions(fp16=False, max_batch=8, opt_batch=2))
    engine = TRTEngine(path, device="cpu")
    assert set(engine.inputs) == {"wa", "feat0", "lip"} and set(engine.outputs) == {"image"}
    assert engine.max_batch == 8 and engine.batch_range["wa"] == (1, 8)
    wa = torch.zeros(1, 4, dtype=torch.float64)                 # cast to the engine dtype
    lip = torch.zeros(4, 8)[:, ::2]                             # non-contiguous: made contiguous
    outs = engine._enqueue({"wa": wa, "feat0": torch.zeros(1, 4), "lip": lip}, SimpleNamespace(cuda_stream=7))
    assert outs["image"].shape == (4, 4) and outs["image"].dtype == torch.float32
    ctx = engine.context
    assert ctx.shapes == {"wa": (1, 4), "feat0": (1, 4), "lip": (4, 4)}
    assert ctx.addresses["image"] == outs["image"].data_ptr() and ctx.enqueued == [7]
    with pytest.raises(InputError, match=r"input 'lip' must be \[B,4\], got \[2, 5\]"):
        engine._enqueue({"wa": wa, "feat0": wa, "lip": torch.zeros(2, 5)}, SimpleNamespace(cuda_stream=0))
    with pytest.raises(InputError, match="has batch 9, the engine accepts 1..8"):
        engine._enqueue({"wa": wa, "feat0": wa, "lip": torch.zeros(9, 4)}, SimpleNamespace(cuda_stream=0))
    with pytest.raises(InputError, match="missing"):
        engine.infer({"wa": wa})


# ================================================================================================ real TensorRT


def _require_trt_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not (FIXTURES / "edtalk_s64.pt").is_file():
        pytest.skip(f"parity fixtures not found at {FIXTURES}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(fixture dict, CPU fp32 model, ONNX export dir) for the edtalk size-64 parity fixture."""
    _require_trt_gpu()
    import edtalk_live.edtalk as edtalk
    from edtalk_live.export.onnx import export_model

    d = torch.load(FIXTURES / "edtalk_s64.pt", weights_only=True)
    model = edtalk.load_model(d["checkpoint"], audio2lip=d["audio2lip_checkpoint"])
    out = tmp_path_factory.mktemp("trt_onnx")
    export_model(model, out)
    return d, model, out


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("trt_engines")


def _renderer(onnx_dir, cache, fp16):
    from edtalk_live.engines.tensorrt_backend import TensorRTRenderer

    return TensorRTRenderer(onnx_dir, fp16=fp16, max_batch=8, opt_batch=4, cache_dir=cache, progress=False)


def _coeffs(d, model, b):
    i = d["inputs"]
    m = model.read_motion(torch.cat([i["lip_frames"], i["pose_frames"]]))
    lip = torch.cat([i["lip_alpha"], m.lip])
    pose = torch.cat([m.pose, m.pose.flip(0)])
    idx = torch.arange(b) % lip.shape[0]
    return lip[idx], pose[idx], m.exp[:1]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_all_second_start_is_a_cache_hit(exported, engine_cache, monkeypatch):
    _, _, onnx_dir = exported
    opts = BuildOptions(fp16=False, max_batch=8, opt_batch=4)
    first = build_all(onnx_dir, engine_cache, opts, progress=False)
    assert set(first) == {"encoder", "motion", "audio2lip", "expression", "decoder"}
    mtimes = {s: p.stat().st_mtime_ns for s, p in first.items()}

    def no_build(*a, **kw):
        raise AssertionError("rebuilt a cached engine")

    monkeypatch.setattr(trt_build, "build_engine", no_build)
    second = build_all(onnx_dir, engine_cache, opts, progress=False, builder=no_build)
    assert second == first
    assert {s: p.stat().st_mtime_ns for s, p in second.items()} == mtimes
    assert list(engine_cache.glob("timing-*.cache"))


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_fp32_engines_match_torch(exported, engine_cache, batch):
    d, model, onnx_dir = exported
    lip, pose, exp = _coeffs(d, model, batch)
    src_img = d["inputs"]["source"]
    ref = model.render(model.encode(src_img), lip=lip, pose=pose, exp=exp).numpy()
    r = _renderer(onnx_dir, engine_cache, fp16=False)
    assert r.device == torch.device("cuda", torch.cuda.current_device())
    avatar = r.prepare_expression(r.prepare_source(src_img), exp)
    assert avatar.wa.is_cuda and all(f.is_cuda for f in avatar.feats)
    assert avatar.wa.device == r.device and all(f.device == r.device for f in avatar.feats)
    raw = r.render(avatar, lip, pose, raw=True)
    assert raw.dtype == np.float32 and raw.shape == ref.shape
    err = float(np.abs(raw - ref).max())
    assert err < TOL_FP32, f"{r.describe()} differs by {err:.2e} at batch {batch}"
    frames = r.render(avatar, lip, pose)
    expected = np.rint((np.clip(ref, -1, 1) + 1) * 127.5).transpose(0, 2, 3, 1)
    assert frames.dtype == np.uint8 and np.abs(frames.astype(int) - expected).max() <= 1
    plain = r.prepare_expression(r.prepare_source(src_img), None)         # exp=None: zeros in the graph
    ref0 = model.render(model.encode(src_img), lip=lip, pose=pose).numpy()
    assert np.abs(r.render(plain, lip, pose, raw=True) - ref0).max() < TOL_FP32


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_per_frame_avatars_and_chunking(exported, engine_cache):
    """Frames of different identities in one call, and a batch above max_batch (split into chunks)."""
    d, model, onnx_dir = exported
    r = _renderer(onnx_dir, engine_cache, fp16=False)
    b = r.max_batch + 3
    lip, pose, exp = _coeffs(d, model, b)
    imgs = [d["inputs"]["source"], d["inputs"]["lip_frames"][:1]]
    avatars = [r.prepare_expression(r.prepare_source(im), exp) for im in imgs]
    per_frame = [avatars[k % 2] for k in range(b)]
    mixed = r.render(per_frame, lip, pose, raw=True)
    assert mixed.shape[0] == b
    for k in (0, 1, b - 1):
        alone = r.render(per_frame[k], lip[k:k + 1], pose[k:k + 1], raw=True)
        assert np.abs(mixed[k:k + 1] - alone).max() < TOL_FP32
    shared = r.render(avatars[0], lip, pose, raw=True)
    src = model.encode(imgs[0])
    ref = model.render(src, lip=lip, pose=pose, exp=exp).numpy()
    assert np.abs(shared - ref).max() < TOL_FP32


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_motion_and_audio_engines(exported, engine_cache):
    d, model, onnx_dir = exported
    i = d["inputs"]
    r = _renderer(onnx_dir, engine_cache, fp16=False)
    ref_m = model.read_motion(i["exp_frames"])
    m = r.read_motion(i["exp_frames"])
    for got, ref in ((m.lip, ref_m.lip), (m.pose, ref_m.pose), (m.exp, ref_m.exp)):
        assert (got - ref).abs().max() < TOL_COEFF
    lip = r.audio_to_lip(i["mel_windows"])                       # 251 windows: chunks of max_batch
    assert (lip - model.audio_to_lip(i["mel_windows"])).abs().max() < TOL_COEFF


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_fp16_engines_psnr(exported, engine_cache, batch):
    d, model, onnx_dir = exported
    lip, pose, exp = _coeffs(d, model, batch)
    src_img = d["inputs"]["source"]
    frames = {}
    for fp16 in (False, True):
        r = _renderer(onnx_dir, engine_cache, fp16=fp16)
        frames[fp16] = r.render(r.prepare_expression(r.prepare_source(src_img), exp), lip, pose)
        r.close()
    psnr = _psnr(frames[True], frames[False])
    assert psnr >= PSNR_FP16_DB, f"fp16 engines: {psnr:.1f} dB against fp32 at batch {batch}"
