"""Build TensorRT engines from the per-stage ONNX graphs, once per GPU, TensorRT version and graph.

    options = BuildOptions(fp16=True, max_batch=64)
    paths = build_all("exports/edtalk", options=options)      # {"encoder": Path(...), "decoder": ...}

Every graph of an export directory (see :func:`edtalk_live.export.onnx.export_model`) becomes one serialized
engine with one optimization profile over the batch axis: min 1, opt ``opt_batch``, max
``max_batch``; the decoder's source inputs (``wa``, ``feat*``, axis ``src_batch``) get min 1, opt 1,
max ``max_batch`` because one avatar usually drives the whole batch. Engines are cached under
``<cache>/<stage>-<key[:16]>.engine`` where the key (:func:`engine_key`) hashes the ONNX bytes, the
build options, the GPU name and the TensorRT version, so a second start loads instead of rebuilding.
A timing cache next to the engines makes rebuilds after an option change fast.

FP16 keeps the overflow-prone layers in FP32: instance normalization, reductions, the StyleGAN2
demodulation (``rsqrt(s² · Σw² + eps)``: pow, matmul, the ``+eps`` addition, sqrt/reciprocal,
division) and grid sampling. TensorRT 10 does this with ``BuilderFlag.FP16`` and per-layer
precision constraints; TensorRT 11 removed weak typing, so there the graph is first converted to
mixed precision with ModelOpt AutoCast (same FP32 list) and built as a strongly typed network.

``tensorrt`` is imported lazily: this module imports (and :func:`engine_key` works) without it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.export.manifest import read_manifest

logger = logging.getLogger(__name__)

#: bump when the build recipe (layer precisions, profile layout) changes, to invalidate cached engines
RECIPE_VERSION = 1

TENSORRT_MISSING = "TensorRT is not installed: pip install 'edtalk-live[tensorrt]' (needs an NVIDIA GPU and driver)"
MODELOPT_MISSING = ("TensorRT {version} has no FP16 builder flag (strong typing only): FP16 engines need ModelOpt "
                    "AutoCast: pip install 'nvidia-modelopt[onnx]', or build FP32 without --fp16")

#: decoder inputs whose batch axis is ``src_batch`` (1 = one avatar broadcast over the frames)
SRC_BATCH_STAGE = "decoder"
SRC_BATCH_INPUT = re.compile(r"wa|feat\d+")

#: ONNX operators kept in FP32 by the AutoCast path (TensorRT 11); the TensorRT 10 path marks the
#: equivalent layers (see :func:`fp32_layer_indices`)
FP32_ONNX_OPS = ("InstanceNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Pow", "Sqrt",
                 "Reciprocal", "Div", "MatMul", "GridSample")


class EngineBuildError(EDTalkError):
    """TensorRT could not parse a graph or build an engine from it."""


def require_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module, or raise :class:`EDTalkError` with the install hint."""
    try:
        import tensorrt
    except ImportError:
        raise EDTalkError(TENSORRT_MISSING) from None
    return tensorrt


@dataclass(frozen=True)
class BuildOptions:
    """How engines are built.

    ``fp16``: FP16 kernels where safe (overflow-prone layers stay FP32). ``max_batch``: the
    largest batch an engine accepts (bigger batches are split by the runner). ``opt_batch``: the
    batch TensorRT tunes kernels for (clamped to ``max_batch``). ``workspace_gb``: scratch memory
    limit for tactics. ``tf32``: allow TF32 math in FP32 layers (faster on Ampere and later, about
    1e-3 relative error; off so FP32 engines match PyTorch). ``timing_cache``: timing cache file
    (default: next to the engines, one per GPU and TensorRT version).
    """

    fp16: bool = True
    max_batch: int = 64
    opt_batch: int = 16
    workspace_gb: float = 4.0
    tf32: bool = False
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if int(self.max_batch) < 1:
            raise InputError(f"max batch must be >= 1, got {self.max_batch}")
        if int(self.opt_batch) < 1:
            raise InputError(f"opt batch must be >= 1, got {self.opt_batch}")
        if not self.workspace_gb > 0:
            raise InputError(f"workspace must be > 0 GB, got {self.workspace_gb}")
        object.__setattr__(self, "max_batch", int(self.max_batch))
        object.__setattr__(self, "opt_batch", min(int(self.opt_batch), self.max_batch))
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))

    def key_fields(self) -> dict:
        """The options that change the engine (the timing cache location does not)."""
        d = asdict(self)
        d.pop("timing_cache")
        return d


def engine_key(onnx_path: str | Path, options: BuildOptions, gpu_name: str, trt_version: str) -> str:
    """Hex sha256 identifying one engine: the ONNX file bytes, the build options, the GPU and TensorRT version."""
    h = hashlib.sha256()
    with open(onnx_path, "rb") as f:
        for chunk in iter(functools.partial(f.read, 1 << 20), b""):
            h.update(chunk)
    meta = {"options": options.key_fields(), "gpu": gpu_name, "tensorrt": trt_version, "recipe": RECIPE_VERSION}
    h.update(b"\0" + json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def engine_file(cache_dir: str | Path, stage: str, key: str) -> Path:
    """``<cache_dir>/<stage>-<key[:16]>.engine``."""
    return Path(cache_dir) / f"{stage}-{key[:16]}.engine"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def default_timing_cache(cache_dir: str | Path, gpu_name: str, trt_version: str) -> Path:
    """``<cache_dir>/timing-<gpu>-trt<version>.cache``: timing caches only apply to one GPU and TensorRT version."""
    return Path(cache_dir) / f"timing-{_slug(gpu_name)}-trt{_slug(trt_version)}.cache"


def batch_axis_name(stage: str, input_name: str) -> str:
    """Name of the batch axis of one input: ``src_batch`` for the decoder's source inputs, else ``batch``."""
    return "src_batch" if stage == SRC_BATCH_STAGE and SRC_BATCH_INPUT.fullmatch(input_name) else "batch"


def profile_shapes(stage: str, input_name: str, shape: Iterable[int], options: BuildOptions
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one input for the optimization profile; ``shape`` has -1 on the batch axis only."""
    shape = tuple(int(d) for d in shape)
    rest = shape[1:]
    if not shape or any(d < 0 for d in rest):
        raise EngineBuildError(f"input '{input_name}' of the {stage} graph has shape {list(shape)}: only the batch "
                               "axis may be dynamic (re-export the graphs)")
    opt = 1 if batch_axis_name(stage, input_name) == "src_batch" else options.opt_batch
    return (1, *rest), (opt, *rest), (options.max_batch, *rest)


def format_parser_errors(parser: Any, onnx_path: str | Path) -> str:
    """Every error of a failed ``trt.OnnxParser`` parse, with its node, as one line."""
    parts = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"node {err.node()}"
        name = err.node_name() if hasattr(err, "node_name") else ""
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        if name or op:
            where += f" ({', '.join(x for x in (name, op) if x)})"
        parts.append(f"{where}: {' '.join(str(err.desc()).split())}")
    detail = "; ".join(parts) or "no parser error reported"
    return f"{onnx_path}: TensorRT cannot parse the graph: {detail}"


@functools.cache
def trt_logger() -> Any:
    """One ``trt.ILogger`` per process that forwards TensorRT messages to :mod:`logging` (``engines.tensorrt``)."""
    trt = require_tensorrt()
    log = logging.getLogger("engines.tensorrt")
    # TensorRT severities: INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE (TensorRT's INFO is chatty: DEBUG)
    levels = (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.DEBUG, 5)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:  # noqa: ANN001 - called by TensorRT, must not raise
            try:
                level = levels[min(int(severity), len(levels) - 1)]
                if log.isEnabledFor(level):
                    log.log(level, "%s", msg)
            except Exception:  # noqa: BLE001 - log() is noexcept on the C++ side
                pass

    return _Logger()


# ------------------------------------------------------------------------------------------------ precision


def _is_float_activation_layer(layer: Any, trt: Any) -> bool:
    """True when every input and output of ``layer`` is a float execution tensor (not a shape computation)."""
    floats = {trt.float32, trt.float16}
    if layer.type == trt.LayerType.CONSTANT or layer.num_outputs == 0:
        return False
    for j in range(layer.num_outputs):
        out = layer.get_output(j)
        if out is None or out.dtype not in floats or not out.is_execution_tensor or out.is_shape_tensor:
            return False
    for j in range(layer.num_inputs):
        inp = layer.get_input(j)
        if inp is not None and inp.dtype not in floats:
            return False
    return True


def fp32_layer_indices(network: Any, trt: Any) -> list[int]:
    """Indices of the layers of a parsed network to keep in FP32 when building FP16.

    Normalization, reduce, matrix multiply (the demodulation sum and the small style projections)
    and grid-sample layers; unary SQRT/RECIP and the elementwise layer feeding them (the ``+eps``);
    elementwise POW and DIV. Layers on integer or shape tensors are skipped.
    """
    lt = trt.LayerType
    always = {lt.NORMALIZATION, lt.REDUCE, lt.MATRIX_MULTIPLY, lt.GRID_SAMPLE}
    unary_ops = {trt.UnaryOperation.SQRT, trt.UnaryOperation.RECIP}
    elementwise_ops = {trt.ElementWiseOperation.POW, trt.ElementWiseOperation.DIV}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer: dict[str, int] = {}
    for i, layer in enumerate(layers):
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = i
    chosen: set[int] = set()
    for i, layer in enumerate(layers):
        if layer.type in always:
            chosen.add(i)
        elif layer.type == lt.UNARY:
            layer.__class__ = trt.IUnaryLayer          # get_layer() returns the base class (Polygraphy does this)
            if layer.op in unary_ops:
                chosen.add(i)
                src = layer.get_input(0)
                k = producer.get(src.name) if src is not None else None
                if k is not None and layers[k].type == lt.ELEMENTWISE:
                    chosen.add(k)                      # the "+ eps" before the square root
        elif layer.type == lt.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            if layer.op in elementwise_ops:
                chosen.add(i)
    return sorted(i for i in chosen if _is_float_activation_layer(layers[i], trt))


def keep_fp32_layers(network: Any, trt: Any) -> int:
    """Constrain the layers of :func:`fp32_layer_indices` to FP32 (precision and output types); return how many."""
    indices = fp32_layer_indices(network, trt)
    for i in indices:
        layer = network.get_layer(i)
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
    return len(indices)


def _autocast_fp16(onnx_path: Path) -> bytes:
    """The graph converted to mixed FP16/FP32 with ModelOpt AutoCast (TensorRT 11 has no FP16 builder flag)."""
    trt = require_tensorrt()
    try:
        import onnx
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        raise EDTalkError(MODELOPT_MISSING.format(version=trt.__version__)) from None
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    eps_adds = []
    for node in graph.node:
        if node.op_type in ("Sqrt", "Reciprocal") and node.input:
            p = producer.get(node.input[0])
            if p is not None and p.op_type == "Add" and p.name:
                eps_adds.append(f"^{re.escape(p.name)}$")
    model = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16",
                                       nodes_to_exclude=eps_adds, op_types_to_exclude=list(FP32_ONNX_OPS),
                                       data_max=float("inf"), keep_io_types=True)
    return model.SerializeToString()


# ------------------------------------------------------------------------------------------------ build


def _atomic_write(path: Path, data: Any) -> None:
    """Write bytes (or any buffer, e.g. ``trt.IHostMemory``) to ``path`` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_timing_cache(config: Any, path: Path | None) -> None:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise ValueError("rejected")
        if data:
            logger.info("loaded timing cache %s", path)
    except Exception as e:  # noqa: BLE001 - a stale cache must never stop a build
        logger.warning("timing cache %s unusable (%s); starting an empty one", path, e)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    try:
        cache = config.get_timing_cache()
        if cache is not None:
            _atomic_write(path, cache.serialize())
    except Exception as e:  # noqa: BLE001
        logger.warning("could not save timing cache %s: %s", path, e)


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions = BuildOptions(),
                 trt_log: Any = None, stage: str | None = None) -> Path:
    """Parse ``onnx_path``, build a serialized engine with ``options`` and write it atomically to ``engine_path``.

    ``stage`` (default: the file's stem) decides which inputs are ``src_batch`` inputs. ``trt_log`` is a
    ``trt.ILogger`` (default: :func:`trt_logger`). Raises :class:`EngineBuildError` with every parser
    error on one line when the graph cannot be parsed, or when TensorRT cannot build it.
    """
    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    stage = stage or onnx_path.stem
    if not onnx_path.is_file():
        raise EDTalkError(f"{onnx_path}: no such ONNX graph")
    log = trt_log or trt_logger()
    builder = trt.Builder(log)
    # TensorRT 10: FP16 through the (weak typing) builder flag and per-layer constraints.
    # TensorRT 11 (no BuilderFlag.FP16): strongly typed network from an AutoCast mixed-precision graph.
    weak_fp16 = options.fp16 and hasattr(trt.BuilderFlag, "FP16")
    flags = 0
    if not weak_fp16 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if options.fp16 and not weak_fp16:
        ok = parser.parse(_autocast_fp16(onnx_path), path=str(onnx_path))
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok or parser.num_errors:
        raise EngineBuildError(format_parser_errors(parser, onnx_path))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if not options.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        n = keep_fp32_layers(network, trt)
        logger.info("%s: FP16 with %d overflow-prone layers kept in FP32", stage, n)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        # ONNX dim names are equality constraints in TensorRT; the export may merge ``src_batch`` and
        # ``batch`` (shape inference sees them broadcast), so name the batch axes explicitly.
        tensor.set_dimension_name(0, batch_axis_name(stage, tensor.name))
        if shape and shape[0] >= 0 and all(d >= 0 for d in shape):
            continue                                   # fully static input: nothing to profile
        lo, opt, hi = profile_shapes(stage, tensor.name, shape, options)
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)

    timing_cache = options.timing_cache
    _load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT {trt.__version__} could not build an engine "
                               "(see the 'engines.tensorrt' log above)")
    _save_timing_cache(config, timing_cache)
    _atomic_write(engine_path, serialized)
    return engine_path


def build_all(onnx_dir: str | Path, out_dir: str | Path | None = None, options: BuildOptions = BuildOptions(),
              progress: bool = True, device: Any = None,
              builder: Callable[..., Path] | None = None) -> dict[str, Path]:
    """Engines for every graph of an ONNX export directory: ``{stage: engine path}``, built only when not cached.

    ``out_dir`` defaults to ``engines.cache_dir() / "tensorrt"``. The key of each engine comes from
    the ONNX bytes, ``options``, ``torch.cuda.get_device_name(device)`` and ``tensorrt.__version__``;
    a cached engine is returned as is. ``builder`` replaces :func:`build_engine` (tests).
    """
    import torch

    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise EDTalkError("TensorRT engines need a CUDA GPU, and torch.cuda.is_available() is False")
    onnx_dir = Path(onnx_dir)
    if out_dir is None:
        from edtalk_live.engines import cache_dir

        out_dir = cache_dir() / "tensorrt"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device)
    version = str(trt.__version__)
    if options.timing_cache is None:
        options = dataclasses.replace(options, timing_cache=default_timing_cache(out_dir, gpu, version))
    build = builder or build_engine
    manifest = read_manifest(onnx_dir)
    stages = list(manifest.graphs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(stages), desc="TensorRT engines", unit="engine")
    paths: dict[str, Path] = {}
    try:
        for stage in stages:
            onnx_path = manifest.graph_path(stage)
            key = engine_key(onnx_path, options, gpu, version)
            path = engine_file(out_dir, stage, key)
            if bar is not None:
                bar.set_postfix_str(stage)
            if path.is_file():
                logger.info("%s: cached engine %s", stage, path)
            else:
                precision = "fp16" if options.fp16 else "fp32"
                logger.info("%s: building %s engine (batch 1..%d) on %s with TensorRT %s", stage, precision,
                            options.max_batch, gpu, version)
                t0 = time.perf_counter()
                with torch.cuda.device(device):
                    build(onnx_path, path, options, stage=stage)
                logger.info("%s: built %s in %.1f s (%.1f MB)", stage, path.name, time.perf_counter() - t0,
                            path.stat().st_size / 2**20)
            paths[stage] = path
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return paths
