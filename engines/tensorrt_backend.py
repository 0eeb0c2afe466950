"""TensorRT backend: serialized engines per stage, run on torch CUDA tensors (no pycuda).

    renderer = TensorRTRenderer("exports/edtalk", fp16=True, max_batch=64)   # builds or loads engines
    avatar = renderer.prepare_expression(renderer.prepare_source(image), exp)
    frames = renderer.render(avatar, lip, pose)                              # uint8 [B,S,S,3]

:class:`TRTEngine` binds torch tensors directly: inputs are made contiguous in the engine's dtype,
outputs are allocated with ``torch.empty`` on the device, their ``data_ptr()`` go to
``set_tensor_address`` and the engine is enqueued with ``execute_async_v3`` on the current torch
stream, so TensorRT work is ordered with the surrounding torch work and the caching allocator.
Source encodings (``wa``, feature maps) stay on the GPU; frames are converted to uint8 on the
device before the copy back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.edtalk.motion import Motion
from edtalk_live.engines.base import PreparedSource, Renderer
from edtalk_live.engines.trt_build import BuildOptions, build_all, require_tensorrt, trt_logger
from edtalk_live.export.manifest import read_manifest

logger = logging.getLogger(__name__)


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """The torch dtype of a ``trt.DataType`` (float32, float16, bfloat16, int8/32/64, uint8, bool)."""
    table = {}
    for trt_name, t in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
                        ("int8", torch.int8), ("int32", torch.int32), ("int64", torch.int64),
                        ("uint8", torch.uint8), ("bool", torch.bool)):
        if hasattr(trt, trt_name):
            table[getattr(trt, trt_name)] = t
    if dtype not in table:
        raise EDTalkError(f"TensorRT data type {dtype} has no torch equivalent here")
    return table[dtype]


class TRTEngine:
    """One deserialized engine and its execution context: ``infer(named CUDA tensors) -> named tensors``.

    Inputs must match the engine's input names; each is checked against the engine's shape (every
    axis but a dynamic batch axis is fixed) and the batch range of its optimization profile, moved
    to the engine's device, cast to the engine's dtype and made contiguous. Outputs are new tensors
    on the device. Calls are serialized by a lock (one execution context).
    """

    def __init__(self, engine_path: str | Path, device: str | torch.device = "cuda", trt_log: Any = None):
        trt = require_tensorrt()
        self.path = Path(engine_path)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._trt = trt
        self._lock = threading.Lock()
        with self._on_device():
            self.runtime = trt.Runtime(trt_log or trt_logger())
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise EDTalkError(f"{self.path}: TensorRT {trt.__version__} cannot load this engine (built by another "
                                  "TensorRT version or for another GPU?); delete it to rebuild")
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EDTalkError(f"{self.path}: could not create an execution context (out of GPU memory?)")
        self.inputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.outputs: dict[str, torch.dtype] = {}
        #: (min, max) batch per input, from optimization profile 0
        self.batch_range: dict[str, tuple[int, int]] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = torch_dtype(trt, self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                shape = tuple(self.engine.get_tensor_shape(name))
                self.inputs[name] = (shape, dtype)
                if shape and shape[0] < 0:
                    lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                    self.batch_range[name] = (int(lo[0]), int(hi[0]))
            else:
                self.outputs[name] = dtype

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @property
    def max_batch(self) -> int:
        """The largest batch every input accepts."""
        return min((hi for _, hi in self.batch_range.values()), default=1)

    def _check(self, name: str, t: torch.Tensor) -> torch.Tensor:
        shape, dtype = self.inputs[name]
        got = tuple(t.shape)
        if len(got) != len(shape) or any(s >= 0 and s != g for s, g in zip(shape, got, strict=True)):
            want = ",".join("B" if s < 0 else str(s) for s in shape)
            raise InputError(f"{self.path.name}: input '{name}' must be [{want}], got {list(got)}")
        if name in self.batch_range:
            lo, hi = self.batch_range[name]
            if not lo <= got[0] <= hi:
                raise InputError(f"{self.path.name}: input '{name}' has batch {got[0]}, the engine accepts {lo}..{hi}")
        return t.to(self.device, dtype).contiguous()

    def infer(self, inputs: Mapping[str, torch.Tensor], stream: torch.cuda.Stream | None = None
              ) -> dict[str, torch.Tensor]:
        """Run the engine on ``inputs`` (name -> tensor); return ``{output name: tensor on the device}``.

        Work is enqueued on ``stream`` (default: the current torch stream of the device) and not
        waited for: reading the outputs from torch on the same stream (or copying them to the CPU)
        is ordered after it.
        """
        missing = [n for n in self.inputs if n not in inputs]
        extra = [n for n in inputs if n not in self.inputs]
        if missing or extra:
            raise InputError(f"{self.path.name}: inputs must be {sorted(self.inputs)}"
                             + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
        with self._lock, self._on_device():
            s = stream if stream is not None else torch.cuda.current_stream(self.device)
            with torch.cuda.stream(s):
                return self._enqueue(inputs, s)

    def _enqueue(self, inputs: Mapping[str, torch.Tensor], s: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        feeds = {name: self._check(name, torch.as_tensor(inputs[name])) for name in self.inputs}
        ctx = self.context
        for name, t in feeds.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise InputError(f"{self.path.name}: TensorRT rejected shape {list(t.shape)} for input '{name}'")
            ctx.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name, dtype in self.outputs.items():
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EDTalkError(f"{self.path.name}: output '{name}' has unresolved shape {list(shape)}")
            outs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            ctx.set_tensor_address(name, outs[name].data_ptr())
        if not ctx.execute_async_v3(s.cuda_stream):
            raise EDTalkError(f"{self.path.name}: TensorRT execution failed (see the 'engines.tensorrt' log)")
        return outs

    def close(self) -> None:
        self.context = None
        self.engine = None
        self.runtime = None


class TensorRTRenderer(Renderer):
    """Runs the graphs of an ONNX export directory as TensorRT engines on one CUDA device.

    Engines are built on first use and cached (:func:`edtalk_live.engines.trt_build.build_all`); ``fp16``
    builds FP16 engines with the overflow-prone layers in FP32. Batches above ``max_batch`` are
    split into chunks. Source encodings and expression feature maps stay on the GPU.
    """

    name = "tensorrt"

    def __init__(self, onnx_dir: str | Path, fp16: bool = True, max_batch: int = 64,
                 device: str | torch.device = "cuda", cache_dir: str | Path | None = None, opt_batch: int = 16,
                 workspace_gb: float = 4.0, progress: bool = True):
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise EDTalkError("the tensorrt backend needs a CUDA GPU, and torch.cuda.is_available() is False")
        dev = torch.device(device)
        if dev.type != "cuda":
            raise InputError(f"the tensorrt backend runs on a CUDA device, not {dev}")
        self.onnx_dir = Path(onnx_dir)
        self.manifest = read_manifest(self.onnx_dir)
        super().__init__(self.manifest.model_config(), dev)       # cuda -> cuda:<current device>
        self.options = BuildOptions(fp16=fp16, max_batch=max_batch, opt_batch=opt_batch, workspace_gb=workspace_gb)
        paths = build_all(self.onnx_dir, cache_dir, self.options, progress=progress, device=self.device)
        self.engines = {stage: TRTEngine(path, self.device) for stage, path in paths.items()}
        self.max_batch = self.options.max_batch
        self.stream = torch.cuda.Stream(self.device)
        self._trt_version = str(trt.__version__)
        self._gpu = torch.cuda.get_device_name(self.device)

    def describe(self) -> str:
        precision = "fp16" if self.options.fp16 else "fp32"
        return f"tensorrt {self._trt_version} ({precision}, max batch {self.max_batch}, {self._gpu})"

    # ------------------------------------------------------------------ helpers
    def _engine(self, stage: str) -> TRTEngine:
        if stage not in self.engines:
            raise EDTalkError(f"{self.onnx_dir}: the export has no '{stage}' graph")
        return self.engines[stage]

    def _on_stream(self):
        """Run on the renderer's stream, after whatever the caller queued on its current stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    def _run(self, stage: str, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run ``stage`` on feeds sharing one batch, in chunks of at most ``max_batch``; outputs in manifest order."""
        engine = self._engine(stage)
        feeds = {k: torch.as_tensor(v).to(self.device) for k, v in feeds.items()}
        b = next(iter(feeds.values())).shape[0]
        step = min(self.max_batch, engine.max_batch)
        chunks = [engine.infer({k: v[i: i + step] for k, v in feeds.items()}, self.stream) for i in range(0, b, step)]
        names = self.manifest.output_names(stage)
        return [chunks[0][n] if len(chunks) == 1 else torch.cat([c[n] for c in chunks]) for n in names]

    # ------------------------------------------------------------------ hooks
    def _prepare_source(self, image: torch.Tensor) -> PreparedSource:
        with self._on_stream(), torch.no_grad():
            wa, *feats = self._run("encoder", {"image": image})
        self.stream.synchronize()             # rare; makes the cached tensors safe to read from any stream
        return PreparedSource(wa, tuple(feats), self.name)

    def _expression_feats(self, source: PreparedSource, exp: torch.Tensor) -> tuple:
        with self._on_stream(), torch.no_grad():
            feeds = dict(zip(self.manifest.feat_names("expression"), source.feats, strict=True))
            feeds["exp"] = exp
            feats = tuple(self._run("expression", feeds))
        self.stream.synchronize()
        return feats

    def _read_motion(self, images: torch.Tensor) -> Motion:
        with self._on_stream(), torch.no_grad():
            return self._motion(self._run("motion", {"image": images}))

    def _audio_to_lip(self, mel: torch.Tensor) -> torch.Tensor:
        with self._on_stream(), torch.no_grad():
            return self._run("audio2lip", {"mel": mel})[0].float().cpu()

    def _render(self, wa: torch.Tensor, feats: tuple, lip: torch.Tensor, pose: torch.Tensor,
                exp: torch.Tensor | None, raw: bool) -> torch.Tensor:
        """Decoder on ``B`` frames: ``wa [1|B,D]``, ``feat* [1|B,C,H,W]``, ``lip [B,L]``, ``pose [B,P]``, ``exp [B,E]``.

        Source inputs of batch 1 (one avatar for every frame) are fed once per chunk (``src_batch`` 1,
        broadcast inside the engine); per-frame ones are split with the frames into chunks of at most
        ``max_batch``. Returns the raw image ``[B,3,S,S]`` on the device, ready on the caller's current
        stream (the base class converts it to uint8 there before the copy back).
        """
        engine = self._engine("decoder")
        b = lip.shape[0]
        shared = wa.shape[0] == 1
        step = min(self.max_batch, engine.max_batch)
        with self._on_stream(), torch.no_grad():
            coeffs = {"lip": lip, "pose": pose, **({"exp": exp} if exp is not None else {})}
            coeffs = {k: v.to(self.device) for k, v in coeffs.items()}
            sources = {"wa": wa, **dict(zip(self.manifest.feat_names("decoder"), feats, strict=True))}
            outs = []
            for i in range(0, b, step):
                feeds = {k: v if shared else v[i: i + step] for k, v in sources.items()}
                feeds.update({k: v[i: i + step] for k, v in coeffs.items()})
                outs.append(engine.infer(feeds, self.stream)["image"])
            image = outs[0] if len(outs) == 1 else torch.cat(outs)
        # the base class converts the image on the caller's stream: order that after the engine's work
        caller = torch.cuda.current_stream(self.device)
        caller.wait_stream(self.stream)
        image.record_stream(caller)
        return image

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()
