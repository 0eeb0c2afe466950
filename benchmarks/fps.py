"""Benchmark this machine: frames per second of the per-frame path per backend and batch size, against
the published per-frame path, then the whole pipeline (offline render throughput).

    edtalk-live bench --configs official,test --batches 1,4,16,64 --json run.json --plot fps.png
    edtalk-live bench --compare before.json after.json
    python -m edtalk_live.benchmarks.fps ...         # the same program, the same options

Models (``--configs``): ``official`` (256², the published widths) and ``test`` (64², the widths of the
parity fixtures) with seeded random weights (speed does not depend on the weight values), and
``weights``, the user's own model: ``--weights DIR``, by default the weights folder when it holds
weights. Every model goes through the loaders of ``render`` and ``serve`` (random weights are written
as an official weights folder first) and the report says which it was: family, size, widths, weights
hash. For each, one identity image is encoded and one expression applied *once*, and then
``Renderer.render(avatar, lip, pose)`` is timed for every batch size: the decoder, the conversion to
``uint8 [B,S,S,3]`` and the copy back to the host, i.e. exactly what the server pays per frame.

Every cell reports the median time per batch, the time per frame, FPS (median, p10, p90 over the
timed iterations), ``x eager`` (FPS over the FPS of torch fp32 eager on the same device, config and
batch, measured in the same run) and ``x reference`` (FPS over the FPS of the published per-frame
path below, same config, same device).

The reference row is the published demo's per-frame work, run with the *same weights* at batch 1 (the
demo renders one frame at a time): the source image is re-encoded, the QR of the motion bases is
recomputed (twice, as ``Direction_exp`` does), the expression blocks (EEM, both branches) run, and
every modulated convolution is the per-sample grouped convolution, with the FIR filters as the
published ``upfirdn2d_native``. It leaves out the published demo's second encoder pass on the driving
pose frame (pose coefficients are given here), so its ratios are a lower bound. Before timing, the
reference and our path are compared on one frame on the CPU in fp32; at the small configs they must
agree to 1e-3 or the benchmark stops.

Then the whole pipeline (:mod:`benchmarks.pipeline`), one row per model: the offline render's
throughput (``edtalk-live render``'s own code, audio seconds rendered per second), with the backend
and batch of the model's fastest per-frame cell (``--no-render`` skips it); and the live path
(:func:`benchmarks.capacity.live_row`): ``serve`` started with that backend and WebRTC sessions
ramped through ``--live-sessions`` (each client its own process, on this machine) until a level
does not keep up; the most sessions at 25 fps with at most 1 % of frames late (``--no-live`` skips
it).

The ONNX Runtime (and TensorRT) backends export the model into the usual cache
(``$EDTALK_LIVE_CACHE`` or ``~/.cache/edtalk-live``, key: the model's weights hash) on the first
run; later runs reuse it, and so does the render. The tables are Markdown, printed on stdout;
progress goes to stderr. ``--json`` writes the run with the machine, the versions and the command,
``--plot`` draws it (:mod:`benchmarks.plot`), ``--compare`` sets two runs side by side
(:mod:`benchmarks.compare`).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.decoder import Synthesis
from edtalk_live.edtalk.encoder import Encoder
from edtalk_live.edtalk.generator import Generator
from edtalk_live.edtalk.layers import Blur, ConvLayer, ModulatedConv2d, ResBlock, StyledConv, ToFlow, ToRGB
from edtalk_live.edtalk.model import EDTalkModel
from edtalk_live.edtalk.timing import FRAME_SECONDS

__all__ = ["BenchConfig", "Cell", "ModelInfo", "Results", "build_model", "build_parser", "format_number",
           "format_ratio", "machine_description", "main", "reference_check", "reference_decoder_forward",
           "reference_frame", "to_json", "versions"]

logger = logging.getLogger(__name__)

#: tolerance of the reference-vs-ours check (raw images, fp32 on the CPU), as in the parity tests
REFERENCE_TOL = 1e-3
#: configs at which the reference check must pass (at 256² random weights are too chaotic to promise it)
CHECKED_CONFIGS = ("test", "tiny")
#: random flow-predicting weights are scaled by this, as in the parity fixtures (trained flows are small)
FLOW_WEIGHT_SCALE = 0.1
REFERENCE_NAME = "reference"


# ================================================================================================ configs


@dataclass(frozen=True)
class BenchConfig:
    """A named model shape to benchmark."""

    name: str
    size: int
    widths: tuple[int, ...] | None     # None: the published widths
    style_dim: int = 512

    def model_config(self, family: str) -> ModelConfig:
        kw = {} if self.widths is None else {"widths": self.widths}
        exp_dim = 0 if family == "lip_pose" else 10
        return ModelConfig(family=family, size=self.size, style_dim=self.style_dim, exp_dim=exp_dim, **kw)


CONFIGS = {
    "official": BenchConfig("official", 256, None),
    "test": BenchConfig("test", 64, (64, 64, 64, 32, 16)),
    # 128², the test widths one level up: the size at which a live session runs on a small CPU
    "small": BenchConfig("small", 128, (128, 128, 128, 64, 32, 16)),
    "tiny": BenchConfig("tiny", 32, (16, 16, 8, 8), style_dim=64),   # for the smoke test; not listed in --help
}


def build_model(config: ModelConfig, seed: int = 0) -> EDTalkModel:
    """An :class:`EDTalkModel` with seeded random weights, CPU fp32, ``weights_id`` unique to those weights.

    The flow-predicting convolutions are scaled by :data:`FLOW_WEIGHT_SCALE`, like the parity
    fixtures, so that flows are small and smooth and nothing overflows in fp16.
    """
    from edtalk_live.edtalk.checkpoint import weights_hash

    torch.manual_seed(seed)
    model = EDTalkModel(config, with_audio2lip=False).eval()
    with torch.no_grad():
        for tf in model.generator.dec.to_flows:
            tf.conv.weight.mul_(FLOW_WEIGHT_SCALE)
    model.weights_id = f"random-{weights_hash(model.generator.state_dict())}"
    return model


@dataclass
class Inputs:
    """What a session provides: one identity image, one expression (or None), coefficients per batch size."""

    image: torch.Tensor                  # [1,3,S,S] in [-1,1]
    exp: torch.Tensor | None             # [1,E]
    lip: torch.Tensor                    # [Bmax,lip_dim]
    pose: torch.Tensor                   # [Bmax,pose_dim]


def make_inputs(config: ModelConfig, max_batch: int, seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    s = config.size
    image = torch.rand(1, 3, s, s, generator=g) * 2 - 1
    exp = torch.randn(1, config.exp_dim, generator=g) * 0.5 if config.has_expression else None
    lip = torch.randn(max_batch, config.lip_dim, generator=g) * 0.5
    pose = torch.randn(max_batch, config.pose_dim, generator=g) * 0.5
    return Inputs(image, exp, lip, pose)


# ================================================================================================ reference
# The published per-frame path (EDTalk ``networks/generator.py`` + ``networks/styledecoder.py``),
# re-expressed over our modules so it runs the very same weights. Benchmark-only code, kept here for
# the comparison: the project's own networks use the batch-friendly formulation in ``edtalk/layers.py``.


def _native_upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
                      pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The published ``upfirdn2d_native``: zero insertion by reshapes, one single-channel conv over B*C maps."""
    _, minor, in_h, in_w = x.shape
    kh, kw = kernel.shape
    p0, p1 = pad
    out = x.reshape(-1, minor, in_h, 1, in_w, 1)
    out = F.pad(out, [0, up - 1, 0, 0, 0, up - 1, 0, 0])
    out = out.reshape(-1, minor, in_h * up, in_w * up)
    out = F.pad(out, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    out = out[:, :, max(-p0, 0): out.shape[2] - max(-p1, 0), max(-p0, 0): out.shape[3] - max(-p1, 0)]
    out = out.reshape([-1, 1, in_h * up + p0 + p1, in_w * up + p0 + p1])
    w = torch.flip(kernel, [0, 1]).reshape(1, 1, kh, kw).to(out.dtype)
    out = F.conv2d(out, w)
    out = out.reshape(-1, minor, in_h * up + p0 + p1 - kh + 1, in_w * up + p0 + p1 - kw + 1)
    return out[:, :, ::down, ::down]


def _ref_blur(blur: Blur, x: torch.Tensor) -> torch.Tensor:
    return _native_upfirdn2d(x, blur.kernel, pad=blur.pad)


def _ref_conv_layer(layer: ConvLayer, x: torch.Tensor) -> torch.Tensor:
    for m in layer:
        x = _ref_blur(m, x) if isinstance(m, Blur) else m(x)
    return x


def _ref_encoder(enc: Encoder, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The published ``EncoderApp.forward``: code ``[B,D]`` and the feature maps 8x8 ... SxS."""
    res = []
    for conv in enc.net_app.convs:
        if isinstance(conv, ResBlock):
            x = (_ref_conv_layer(conv.conv2, _ref_conv_layer(conv.conv1, x)) + _ref_conv_layer(conv.skip, x)) \
                / math.sqrt(2)
        elif isinstance(conv, ConvLayer):
            x = _ref_conv_layer(conv, x)
        else:
            x = conv(x)                                             # the final EqualConv2d
        res.append(x)
    return res[-1].squeeze(-1).squeeze(-1), res[::-1][2:]


def _ref_modulated_conv(conv: ModulatedConv2d, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """The published grouped form: one modulated (and demodulated) weight per sample, ``groups=B``."""
    batch, in_ch, height, width = x.shape
    out_ch, k = conv.out_channels, conv.kernel_size
    style = conv.modulation(style).view(batch, 1, in_ch, 1, 1)
    weight = conv.scale * conv.weight * style                      # [B,Cout,Cin,k,k]
    if conv.demodulate:
        demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)
        weight = weight * demod.view(batch, out_ch, 1, 1, 1)
    weight = weight.view(batch * out_ch, in_ch, k, k)
    if conv.upsample:
        x = x.reshape(1, batch * in_ch, height, width)
        weight = weight.view(batch, out_ch, in_ch, k, k).transpose(1, 2).reshape(batch * in_ch, out_ch, k, k)
        out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
        out = out.view(batch, out_ch, *out.shape[2:])
        return _ref_blur(conv.blur, out)
    x = x.reshape(1, batch * in_ch, height, width)
    out = F.conv2d(x, weight, padding=conv.padding, groups=batch)
    return out.view(batch, out_ch, *out.shape[2:])


def _ref_styled_conv(layer: StyledConv, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    return layer.activate(_ref_modulated_conv(layer.conv, x, style))


def _ref_upsample(up, x: torch.Tensor) -> torch.Tensor:
    return _native_upfirdn2d(x, up.kernel, up=up.factor, pad=up.pad)


def _ref_to_rgb(layer: ToRGB, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    out = _ref_conv_layer(layer.conv, x) + layer.bias
    if skip is not None:
        out = out + _ref_upsample(layer.upsample, skip)
    return out


def _ref_to_flow(layer: ToFlow, x: torch.Tensor, style: torch.Tensor, feat: torch.Tensor,
                 skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The published ``ToFlow.forward``: the sampling grid is rebuilt with NumPy and copied over every call."""
    out = _ref_modulated_conv(layer.conv, x, style) + layer.bias
    xs = np.linspace(-1, 1, x.size(2))
    xs = np.stack(np.meshgrid(xs, xs), 2)
    xs = torch.tensor(xs).float().unsqueeze(0).repeat(x.size(0), 1, 1, 1).to(x.device)
    if skip is not None:
        out = out + _ref_upsample(layer.upsample, skip)
    sampler = torch.tanh(out[:, 0:2, :, :])
    mask = torch.sigmoid(out[:, 2:3, :, :])
    flow = sampler.permute(0, 2, 3, 1) + xs.to(out.dtype)
    feat_warp = F.grid_sample(feat, flow, align_corners=False) * mask
    return feat_warp, feat_warp + x * (1.0 - mask), out


def _ref_eem(eem, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The published EEM: the first branch is computed and thrown away, as published."""
    dx = F.leaky_relu(eem.norm1(eem.conv1(x), z))                  # noqa: F841 - discarded, as published
    dx = eem.norm2(eem.conv2(x), z)
    return dx + x


def reference_decoder_forward(dec: Synthesis, latent: torch.Tensor, feats: Sequence[torch.Tensor],
                              exp_latent: torch.Tensor | None = None) -> torch.Tensor:
    """The published ``Synthesis.forward`` (grouped modulated convolutions, EEM every frame) on our weights.

    ``latent [B,D]``, ``feats`` the *unmodulated* source maps (coarse to fine), ``exp_latent [B,D]``
    or ``None``. Returns the raw image ``[B,3,S,S]``. Benchmark-only: the published formulation, for
    comparison with :meth:`edtalk.decoder.Synthesis.forward`.
    """
    n_latent = int(math.log2(dec.size)) * 2 - 2
    latent = latent.unsqueeze(1).repeat(1, n_latent, 1)
    out = dec.input.input.repeat(latent.shape[0], 1, 1, 1)
    out = _ref_styled_conv(dec.conv1, out, latent[:, 0])
    eems = getattr(dec, "fineadainresblock", None)
    skip = skip_flow = None
    i = 1
    for k, feat in enumerate(feats):
        out = _ref_styled_conv(dec.convs[2 * k], out, latent[:, i])
        out = _ref_styled_conv(dec.convs[2 * k + 1], out, latent[:, i + 1])
        if eems is not None and exp_latent is not None:
            feat = _ref_eem(eems[k], feat, exp_latent)
        out_warp, out, skip_flow = _ref_to_flow(dec.to_flows[k], out, latent[:, i + 2], feat, skip_flow)
        skip = _ref_to_rgb(dec.to_rgbs[k], out_warp, skip)
        i += 2
    return skip


@torch.no_grad()
def reference_frame(gen: Generator, image: torch.Tensor, lip: torch.Tensor, pose: torch.Tensor,
                    exp: torch.Tensor | None) -> torch.Tensor:
    """One frame the published way (``test_EDTalk_A_use_exp_weight`` / the lip_pose demo): raw ``[B,3,S,S]``.

    Re-encodes ``image [B,3,S,S]``, recomputes the QR of the bases (twice with expression, as
    ``Direction_exp`` does), builds the latent through ``diag_embed``, then runs
    :func:`reference_decoder_forward` with the EEM blocks.
    """
    wa, feats = _ref_encoder(gen.enc, image)
    cfg = gen.config
    if exp is None:
        alpha = torch.cat([lip, pose], dim=-1)
        if cfg.has_expression:   # published: no expression latent -> EEM off, but the bases are still the joint QR
            weight = torch.cat([gen.direction_lipnonlip.weight, gen.direction_exp.weight], -1) + 1e-8
            q, _ = torch.linalg.qr(weight)
            q = q[:, : alpha.shape[1]]
        else:
            q, _ = torch.linalg.qr(gen.direction_lipnonlip.weight + 1e-8)
        latent = wa + torch.matmul(torch.diag_embed(alpha), q.T).sum(1)
        return reference_decoder_forward(gen.dec, latent, feats, None)
    alpha = torch.cat([lip, pose, exp], dim=-1)
    weight = torch.cat([gen.direction_lipnonlip.weight, gen.direction_exp.weight], -1) + 1e-8
    q, _ = torch.linalg.qr(weight)                                  # get_shared_out
    a = torch.matmul(torch.diag_embed(alpha), q.T)                  # [B,n,D]
    e = a[:, cfg.lip_dim + cfg.pose_dim:].sum(1)                    # get_exp_latent
    q2, _ = torch.linalg.qr(weight)                                 # Direction_exp.forward: the QR again
    latent = wa + torch.matmul(torch.diag_embed(alpha), q2.T).sum(1)
    return reference_decoder_forward(gen.dec, latent, feats, e)


def reference_check(model: EDTalkModel, inputs: Inputs) -> tuple[float, torch.Tensor]:
    """Max abs difference between the reference path and our renderer on one frame (CPU, fp32, raw output).

    Returns the difference and our raw frame ``[1,3,S,S]`` (what the other backends are compared with).
    """
    from edtalk_live.engines.torch_backend import TorchRenderer

    model = copy.deepcopy(model).cpu().float().eval()
    renderer = TorchRenderer(model, device="cpu")
    avatar = renderer.prepare_expression(renderer.prepare_source(inputs.image), inputs.exp)
    ours = torch.from_numpy(renderer.render(avatar, inputs.lip[:1], inputs.pose[:1], raw=True))
    ref = reference_frame(model.generator, inputs.image, inputs.lip[:1], inputs.pose[:1], inputs.exp)
    return float((ours - ref.float()).abs().max()), ours


# ================================================================================================ backends


@dataclass(frozen=True)
class Variant:
    """A backend as benchmarked: ``name`` as given to ``--backends``, the device it runs on."""

    name: str
    device: str          # "cpu" or "cuda"
    make: Callable[[EDTalkModel, argparse.Namespace], object] = field(repr=False, compare=False)


def _make_torch(device: str, **options):
    def make(model: EDTalkModel, args: argparse.Namespace):
        from edtalk_live.engines import create_renderer

        return create_renderer("torch", model=copy.deepcopy(model), device=device, **options)
    return make


def _export_dir(model: EDTalkModel) -> Path:
    """The model's ONNX export in the usual cache, exported once (:func:`~edtalk_live.engines.ensure_onnx`).

    Exported without the exporter's own parity check: with random weights at 256² the decoder is
    chaotic enough that two correct implementations differ by more than its 1e-3 tolerance. Instead
    the benchmark compares one rendered frame of every backend with torch and reports the difference.
    """
    from edtalk_live.engines import ensure_onnx

    return ensure_onnx(model, verify=False)


def _make_exported(backend: str, device: str):
    def make(model: EDTalkModel, args: argparse.Namespace):
        from edtalk_live.engines import create_renderer

        options = {"onnx_dir": _export_dir(model)}
        if backend == "onnxruntime":
            options["providers"] = _ort_providers(device)
            if args.threads:
                options["threads"] = args.threads
        else:
            options["device"] = "cuda"
        return create_renderer(backend, **options)
    return make


def _ort_providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _ort_device(device: str) -> str:
    """Where ONNX Runtime will run for ``device``: cuda only when it has its CUDA provider."""
    return "cuda" if _ort_providers(device)[0] == "CUDAExecutionProvider" else "cpu"


#: the fp32 eager baseline of each device (the denominator of "x eager")
BASELINE = {"cpu": "torch", "cuda": "torch-cuda-fp32"}


def variants(device: str) -> dict[str, Variant]:
    """Every variant this machine can run, by name."""
    from edtalk_live.engines import available_backends

    avail = available_backends()
    out = {"torch": Variant("torch", "cpu", _make_torch("cpu"))}
    if torch.cuda.is_available():
        out["torch-cuda-fp32"] = Variant("torch-cuda-fp32", "cuda", _make_torch(
            "cuda", dtype=torch.float32, cuda_graphs=False, channels_last=False))
        out["torch-cuda-fp16"] = Variant("torch-cuda-fp16", "cuda", _make_torch("cuda"))
    if not avail.get("onnxruntime"):
        out["onnxruntime"] = Variant("onnxruntime", _ort_device(device), _make_exported("onnxruntime", device))
    if not avail.get("tensorrt"):
        out["tensorrt"] = Variant("tensorrt", "cuda", _make_exported("tensorrt", "cuda"))
    return out


def default_backends(device: str, available: dict[str, Variant]) -> list[str]:
    if device == "cuda":
        names = ["torch-cuda-fp32", "torch-cuda-fp16", "onnxruntime", "tensorrt"]
        return [n for n in names if n in available and available[n].device == "cuda"]
    return [n for n in ("torch", "onnxruntime") if n in available]


# ================================================================================================ timing


@dataclass
class Cell:
    """One measured cell of the table: seconds per call of ``batch`` frames, one entry per timed iteration."""

    backend: str
    config: str
    batch: int
    device: str
    times: list[float] = field(default_factory=list)
    error: str = ""
    cores: float = 0.0       # CPU cores the process used while timing (CPU time / wall time)
    x_eager: float | None = None
    x_reference: float | None = None

    @property
    def ok(self) -> bool:
        return bool(self.times) and not self.error

    def _pct(self, q: float) -> float:
        return float(np.percentile(self.times, q))

    @property
    def median_s(self) -> float:
        return float(np.median(self.times))

    @property
    def fps(self) -> float:
        return self.batch / self.median_s

    @property
    def fps_p10(self) -> float:        # slow end: 90th percentile of the time
        return self.batch / self._pct(90)

    @property
    def fps_p90(self) -> float:
        return self.batch / self._pct(10)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.ok:
            d.update(median_ms=self.median_s * 1e3, ms_per_frame=self.median_s * 1e3 / self.batch, fps=self.fps,
                     fps_p10=self.fps_p10, fps_p90=self.fps_p90)
        return d


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: str, warmup: int, iters: int, min_time: float,
               max_time: float, what: str) -> tuple[list[float], float]:
    """Per-iteration wall times of ``fn`` after ``warmup`` calls, and the CPU cores the process used meanwhile.

    Times at least ``iters`` calls and for at least ``min_time`` seconds, but stops as soon as the
    timed calls have taken ``max_time`` seconds (after at least one): big CPU batches get one or two.
    The cores used (process CPU time over wall time) fall below the thread count when other work
    competes for the CPU, which makes CPU numbers unreliable.
    """
    for _ in range(warmup):
        t0 = time.perf_counter()
        _sync(device)
        fn()
        _sync(device)
        logger.info("%s: warm-up %.2f s", what, time.perf_counter() - t0)
    times: list[float] = []
    cpu0 = time.process_time()
    while True:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        total = sum(times)
        if total >= max_time or (len(times) >= iters and total >= min_time):
            break
    return times, (time.process_time() - cpu0) / max(sum(times), 1e-9)


# ================================================================================================ report


def _load() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except (OSError, AttributeError):
        return ""


def machine_description() -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    info = {"cpu": f"{cpu}, {os.cpu_count()} logical cores", "torch": torch.__version__,
            "torch_threads": str(torch.get_num_threads()), "python": platform.python_version()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    load = _load()
    if load:
        info["load"] = load
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages * page / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    return info


def _git_revision(folder: Path) -> str:
    """The commit of the git checkout whose top level is ``folder`` (+ " (modified)"), or "" when it is none."""
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", "-C", str(folder), *cmd], capture_output=True, text=True, timeout=20)
        return done.stdout.strip() if done.returncode == 0 else ""
    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != folder:
            return ""
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short=12", "HEAD") + (" (modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    """The software measured: edtalk-live (version, git commit of a checkout, where it was imported from),
    Python, torch (and its CUDA), NumPy, ONNX Runtime and TensorRT when installed."""
    import importlib.metadata
    import importlib.util

    import edtalk_live

    try:
        own = importlib.metadata.version("edtalk-live")
    except importlib.metadata.PackageNotFoundError:
        own = "not installed"
    folder = Path(list(edtalk_live.__path__)[0]).resolve()
    info = {"edtalk-live": own}
    revision = _git_revision(folder)
    if revision:
        info["git"] = revision
    info.update({"edtalk_live_path": str(folder), "python": platform.python_version(), "torch": torch.__version__,
                 "torch_cuda": torch.version.cuda or "none", "numpy": np.__version__})
    for module in ("onnxruntime", "tensorrt"):
        if importlib.util.find_spec(module) is not None:
            try:
                info[module] = __import__(module).__version__
            except Exception as e:  # noqa: BLE001 - a broken optional install is reported, not fatal
                info[module] = f"unusable ({type(e).__name__})"
    return info


def format_number(x: float) -> str:
    """A number in a table: 3 significant digits below 100, thousands separated above."""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def format_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def format_table(cells: Sequence[Cell]) -> str:
    head = ["backend", "config", "batch", "ms / batch", "ms / frame", "FPS median", "FPS p10", "FPS p90",
            "× eager", "× reference", "iters", "CPU cores"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    f = format_number
    for c in cells:
        name = "reference (published per-frame path)" if c.backend == REFERENCE_NAME else c.backend
        if not c.ok:
            row = [name, c.config, str(c.batch), f"failed: {c.error}"] + [""] * (len(head) - 4)
        else:
            med = c.median_s * 1e3
            row = [name, c.config, str(c.batch), f(med), f(med / c.batch), f(c.fps), f(c.fps_p10),
                   f(c.fps_p90), format_ratio(c.x_eager), format_ratio(c.x_reference), str(len(c.times)),
                   f"{c.cores:.2f}" if c.device == "cpu" else "—"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fill_ratios(cells: Sequence[Cell]) -> None:
    by_key = {(c.backend, c.config, c.batch): c for c in cells if c.ok}
    for c in cells:
        if not c.ok:
            continue
        base = by_key.get((BASELINE[c.device], c.config, c.batch))
        if c.backend == REFERENCE_NAME:
            base = by_key.get((BASELINE[c.device], c.config, 1))
        c.x_eager = c.fps / base.fps if base is not None else None
        ref = next((r for r in cells if r.ok and r.backend == REFERENCE_NAME and r.config == c.config
                    and r.device == c.device), None)
        c.x_reference = c.fps / ref.fps if ref is not None else None


# ================================================================================================ models

#: the config name of the user's own model (``--weights``)
WEIGHTS_CONFIG = "weights"


@dataclass(frozen=True)
class ModelInfo:
    """Which model a config measured: what the report and the JSON say about it."""

    config: str                  # official, test, tiny or weights
    source: str                  # "seeded random weights (seed 0)" or the generator file
    family: str
    size: int
    widths: tuple[int, ...]
    style_dim: int
    weights_hash: str            # the model's weights_id: the generator's hash, then Audio2Lip's (the export cache key)

    @classmethod
    def of(cls, config: str, source: str, model: EDTalkModel) -> ModelInfo:
        c = model.config
        return cls(config, source, c.family, c.size, tuple(c.widths), c.style_dim, model.weights_id)

    def describe(self) -> str:
        widths = ", ".join(map(str, self.widths))
        return (f"`{self.config}`: {self.source}; family {self.family}, {self.size}², widths ({widths}), "
                f"style {self.style_dim}, weights hash {self.weights_hash}")


@dataclass
class Measured:
    """A model to measure: loaded from ``folder``, the folder ``edtalk-live render --weights`` is given."""

    model: EDTalkModel
    folder: Path
    info: ModelInfo


def _user_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Measured | None:
    """The user's model: ``--weights DIR``, else the weights folder when it holds weights; None without one.

    Loaded before anything is timed, with the loaders of ``render`` and ``serve``, so that a wrong
    folder or a damaged file is a usage error at once.
    """
    from edtalk_live.edtalk.errors import EDTalkError
    from edtalk_live.edtalk.model import load_model
    from edtalk_live.media.weights import default_weights_dir, find_weights

    wanted = WEIGHTS_CONFIG in args.configs
    if args.no_weights:
        if wanted or args.weights is not None:
            parser.error("--no-weights cannot be combined with --weights or --configs weights")
        return None
    try:
        files = find_weights(args.weights)
    except EDTalkError as e:
        if args.weights is None and not wanted:
            logger.info("no model of your own measured (%s); --weights DIR measures one", e)
            return None
        parser.error(str(e))
    folder = Path(args.weights).expanduser() if args.weights is not None else default_weights_dir()
    try:
        model = load_model(files.gen, audio2lip=files.audio2lip)
    except EDTalkError as e:
        parser.error(str(e))
    source = str(files.gen) + (f" + {files.audio2lip.name}" if files.audio2lip else " (no Audio2Lip.pt)")
    info = ModelInfo.of(WEIGHTS_CONFIG, source, model)
    logger.info("your model: %s", info.describe())
    return Measured(model, folder, info)


def _random_model(cname: str, args: argparse.Namespace, tmp: Path) -> Measured:
    """Seeded random weights of config ``cname`` written as an official weights folder, loaded like the user's.

    The same folder then goes to the offline render, so both measure the same model, and ONNX
    exports are shared (one cache key, the model's ``weights_id``).
    """
    from edtalk_live.benchmarks.latency import write_random_weights
    from edtalk_live.edtalk.model import load_model
    from edtalk_live.media.weights import find_weights

    folder, _ = write_random_weights(tmp / cname, cname, args.family, args.seed)
    files = find_weights(folder)
    model = load_model(files.gen, audio2lip=files.audio2lip)
    return Measured(model, folder, ModelInfo.of(cname, f"seeded random weights (seed {args.seed})", model))


# ================================================================================================ CLI


def _csv(kind: Callable = str):
    def parse(text: str):
        try:
            items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items
    return parse


PROG = "python -m edtalk_live.benchmarks.fps"
DEFAULT_RENDER_SECONDS = 4.0


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The benchmark's one parser: ``python -m edtalk_live.benchmarks.fps`` and ``edtalk-live bench`` (``prog``)."""
    from edtalk_live.benchmarks.latency import positive_ints

    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark this machine. Frames per second of the per-frame path (decoder + uint8 + copy back) "
                    "per backend and batch size, against torch fp32 eager and the published per-frame path, for "
                    "random-weight models of the published size (official) and of the tests (test) and for your "
                    "own weights; then the whole pipeline: offline render throughput. Prints Markdown tables.")
    what = p.add_argument_group("what to measure")
    what.add_argument("--configs", type=_csv(), default=["official", "test"],
                      help="models: official (256², published widths, random weights), test (64², fixture widths, "
                           "random weights), weights (your model, see --weights) (default: official,test, plus "
                           "weights when there are any)")
    what.add_argument("--weights", metavar="DIR", default=None,
                      help="your weights folder (EDTalk.pt or EDTalk_lip_pose.pt, Audio2Lip.pt), measured as config "
                           "'weights' besides the random ones (default: the weights folder, $EDTALK_LIVE_WEIGHTS or "
                           "~/.cache/edtalk-live/weights, when it holds weights)")
    what.add_argument("--no-weights", action="store_true", help="do not measure the weights folder's model")
    what.add_argument("--family", choices=("edtalk", "lip_pose"), default="edtalk",
                      help="family of the random models: edtalk (with expression, EEM) or lip_pose (default: edtalk)")
    what.add_argument("--backends", type=_csv(), default=None,
                      help="torch (CPU fp32 eager), onnxruntime, and with CUDA torch-cuda-fp32 (eager), "
                           "torch-cuda-fp16 (fp16 + channels-last + CUDA graphs), tensorrt "
                           "(default: every one available on --device)")
    what.add_argument("--batches", type=positive_ints, default=[1, 4, 16, 64], help="batch sizes (default: 1,4,16,64)")
    what.add_argument("--max-batch", type=int, default=None, help="skip batch sizes above this")
    what.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where the default backends and the reference run (default: cuda when available)")
    what.add_argument("--no-reference", action="store_true", help="skip timing the published per-frame path")
    what.add_argument("--no-render", action="store_true",
                      help="skip the offline render throughput (the whole `edtalk-live render` path per model)")
    what.add_argument("--no-live", action="store_true",
                      help="skip the live sessions (the capacity benchmark's ramp of WebRTC sessions against `serve`)")
    what.add_argument("--live-sessions", type=positive_ints, default=[1, 2, 4], metavar="N,N,...",
                      help="levels of the live ramp, stopped at the first that does not keep up (default: 1,2,4)")
    what.add_argument("--render-seconds", type=float, default=DEFAULT_RENDER_SECONDS, metavar="S",
                      help=f"seconds of speech-like audio rendered per model (default: {DEFAULT_RENDER_SECONDS:g})")
    timing = p.add_argument_group("timing")
    timing.add_argument("--iters", type=int, default=5, help="timed iterations per cell, at least (default: 5)")
    timing.add_argument("--min-time", type=float, default=2.0,
                        help="keep timing a cell for at least this many seconds (default: 2)")
    timing.add_argument("--max-time", type=float, default=30.0,
                        help="stop timing a cell once its timed iterations took this long, after at least one "
                             "(default: 30; big CPU batches get one or two iterations)")
    timing.add_argument("--warmup", type=int, default=1, help="untimed calls per cell first (default: 1)")
    timing.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
    timing.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    out = p.add_argument_group("results")
    out.add_argument("--json", metavar="FILE", default=None,
                     help="also write the results as JSON: machine, versions, command, models, every cell with its "
                          "per-iteration times, the pipeline rows")
    out.add_argument("--plot", metavar="FILE.png", default=None,
                     help="also draw frames/s against batch size per backend, one panel per model, with the "
                          "published per-frame path and the 25 fps line (needs matplotlib: "
                          "pip install 'edtalk-live[plot]')")
    out.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                     help="measure nothing: print the ratios B / A of two runs' --json files, cell by cell "
                          "(two machines, or before and after a change)")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import importlib.util

    for c in args.configs:
        if c not in CONFIGS and c != WEIGHTS_CONFIG:
            p.error(f"unknown config {c!r}; choose from official, test, {WEIGHTS_CONFIG}")
    if args.iters < 1 or args.warmup < 0 or args.min_time < 0 or args.max_time <= 0:
        p.error("--iters must be >= 1, --warmup >= 0, --min-time >= 0, --max-time > 0")
    if not args.no_render and args.render_seconds < FRAME_SECONDS:
        p.error(f"--render-seconds must be at least one frame ({FRAME_SECONDS} s); --no-render skips the render")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not Path(path).expanduser().resolve().parent.is_dir():
            p.error(f"{option} {path}: the folder {Path(path).expanduser().resolve().parent} does not exist")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        from edtalk_live.benchmarks.plot import INSTALL_HINT

        p.error(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}")


def _command_line(argv: Sequence[str] | None, prog: str = PROG) -> str:
    if argv is None:
        argv = sys.argv[1:]
    return shlex.join([*prog.split(), *argv])


def _backend_names(parser: argparse.ArgumentParser, args: argparse.Namespace, device: str,
                   available: dict[str, Variant]) -> list[str]:
    if args.backends is None:
        names = default_backends(device, available)
    else:
        names = list(dict.fromkeys(args.backends))
        from edtalk_live.engines import BACKENDS, available_backends

        for n in names:
            if n not in available:
                reason = available_backends().get(n) if n in BACKENDS else None
                known = ", ".join(sorted({*BACKENDS, "torch-cuda-fp32", "torch-cuda-fp16"}))
                parser.error(f"backend {n!r} is not available here" + (f": {reason}" if reason else
                                                                        f" (known: {known}; CUDA ones need a GPU)"))
    # the fp32 eager baseline of every device in use is always measured (the denominator of "x eager")
    for dev in dict.fromkeys(available[n].device for n in names):
        if BASELINE[dev] not in names:
            logger.info("adding %s: the fp32 eager baseline for %s", BASELINE[dev], dev)
            names.insert(0, BASELINE[dev])
    return names


@dataclass
class Results:
    """Everything one run measured."""

    cells: list[Cell] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)               # config -> |reference - ours|
    labels: dict[str, str] = field(default_factory=dict)                 # backend -> what it is
    diffs: dict[str, dict[str, float]] = field(default_factory=dict)     # backend -> config -> |x - torch fp32|
    models: dict[str, ModelInfo] = field(default_factory=dict)
    pipeline: list = field(default_factory=list)                         # benchmarks.pipeline.PipelineRow


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run the benchmark; print the tables on stdout. Returns 0 (usage errors exit 2 via argparse).

    ``prog`` is how the command was called (``edtalk-live bench`` runs this with its own name), for
    the help and the command line the report shows.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.compare:
        from edtalk_live.benchmarks.compare import compare_files

        try:
            print(compare_files(*args.compare))
        except ValueError as e:
            parser.error(str(e))
        return 0
    _check_args(parser, args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = _load()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    available = variants(device)
    names = _backend_names(parser, args, device, available)
    batches = sorted(b for b in dict.fromkeys(args.batches) if args.max_batch is None or b <= args.max_batch)
    if not batches:
        parser.error("no batch size left under --max-batch")
    user = _user_model(parser, args)
    configs = list(dict.fromkeys(args.configs))
    if user is None:
        configs = [c for c in configs if c != WEIGHTS_CONFIG]
    elif WEIGHTS_CONFIG not in configs:
        configs.append(WEIGHTS_CONFIG)

    res = Results()
    with tempfile.TemporaryDirectory(prefix="edtalk-bench-") as tmp:
        for cname in configs:
            if cname == WEIGHTS_CONFIG:
                measured, user = user, None
            else:
                measured = _random_model(cname, args, Path(tmp))
            res.models[cname] = measured.info
            logger.info("config %s", measured.info.describe())
            _measure_config(cname, measured.model, names, available, batches, args, device, res)
            measured.model = None     # free it before the render loads its own copy
            if not args.no_render:
                res.pipeline.append(_render_row(cname, measured, res.cells, args))
            if not args.no_live:
                res.pipeline.append(_live_row(cname, measured, res.cells, args))
            if cname != WEIGHTS_CONFIG:
                shutil.rmtree(measured.folder, ignore_errors=True)

    _fill_ratios(res.cells)
    command, machine, software = _command_line(argv, prog), machine_description(), versions()
    print(_report(res, args, command, machine, software, load_start))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(res, args, command, machine, software), indent=2))
        logger.info("wrote %s", args.json)
    if args.plot:
        from edtalk_live.benchmarks.plot import plot_fps

        plot_fps(res.cells, res.models, args.plot, title=f"{_machine_line(machine)}\n{_versions_line(software)}")
        logger.info("wrote %s", args.plot)
    return 0


def to_json(res: Results, args: argparse.Namespace, command: str, machine: dict[str, str],
            software: dict[str, str]) -> dict:
    """The run as JSON: when, machine, versions, command, options, models, per-frame cells, pipeline rows."""
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine,
            "versions": software, "command": command, "options": vars(args), "family": args.family,
            "models": {c: asdict(m) for c, m in res.models.items()}, "reference_check": res.checks,
            "backends": res.labels, "max_abs_diff_to_torch_fp32": res.diffs,
            "cells": [c.to_dict() for c in res.cells], "pipeline": [r.to_dict() for r in res.pipeline]}


def _measure_config(cname: str, model: EDTalkModel, names: Sequence[str], available: dict[str, Variant],
                    batches: Sequence[int], args: argparse.Namespace, device: str, res: Results) -> None:
    """The per-frame cells of one model: the reference, then every backend at every batch size."""
    inputs = make_inputs(model.config, max(batches), args.seed + 1)
    err, ours = reference_check(model, inputs)
    res.checks[cname] = err
    logger.info("config %s: reference vs ours, max abs difference %.2e", cname, err)
    if cname in CHECKED_CONFIGS and not err < REFERENCE_TOL:
        raise AssertionError(f"reference and our per-frame path differ by {err:.3e} at config {cname} "
                             f"(tolerance {REFERENCE_TOL:.0e}): the comparison would not be fair")
    if not args.no_reference:
        res.cells.append(_time_reference(model, inputs, cname, device, args))
    for name in names:
        res.cells.extend(_time_backend(available[name], model, inputs, ours, cname, batches, args, res.labels,
                                       res.diffs))


def _render_row(cname: str, measured: Measured, cells: Sequence[Cell], args: argparse.Namespace):
    """Offline render throughput of one model, with the backend and batch of its fastest per-frame cell."""
    from edtalk_live.benchmarks import pipeline

    what = f"offline render, {cname} {measured.info.size}²"
    cell = pipeline.best_render_cell(cells, cname)
    if cell is None:
        return pipeline.PipelineRow(what, "—", 0, None, pipeline.RENDER_UNIT, error="no backend that `render` runs "
                                    f"was measured ({', '.join(pipeline.RENDER_BACKENDS)})")
    return pipeline.render_throughput(measured.folder, what, cell, args.render_seconds, args.seed)


def _live_row(cname: str, measured: Measured, cells: Sequence[Cell], args: argparse.Namespace):
    """Live sessions of one model (the capacity benchmark's ramp), with the backend of its fastest per-frame cell
    that ``serve`` runs."""
    from edtalk_live.benchmarks import capacity, pipeline

    what = f"live sessions, {cname} {measured.info.size}²"
    cell = pipeline.best_render_cell(cells, cname)
    if cell is None:
        return pipeline.PipelineRow(what, "—", 0, None, capacity.LIVE_UNIT, error="no backend that `serve` runs "
                                    f"was measured ({', '.join(pipeline.RENDER_BACKENDS)})")
    avatar = measured.folder / "avatar.png"
    return capacity.live_row(measured.folder, avatar if avatar.is_file() else None, what,
                             pipeline.RENDER_BACKENDS[cell.backend], args.live_sessions)


def _time_reference(model: EDTalkModel, inputs: Inputs, cname: str, device: str,
                    args: argparse.Namespace) -> Cell:
    gen = copy.deepcopy(model.generator).to(device).float().eval()
    image, lip, pose = inputs.image, inputs.lip[:1], inputs.pose[:1]
    exp = inputs.exp
    from edtalk_live.engines.base import to_uint8_torch

    def frame():
        # per frame, as the demo does: host inputs -> device, the whole published path, uint8 back on the host
        raw = reference_frame(gen, image.to(device), lip.to(device), pose.to(device),
                              None if exp is None else exp.to(device))
        return to_uint8_torch(raw).cpu().numpy()

    cell = Cell(REFERENCE_NAME, cname, 1, device)
    what = f"{cname} | reference | batch 1"
    try:
        cell.times, cell.cores = time_calls(frame, device, args.warmup, args.iters, args.min_time, args.max_time, what)
        logger.info("%s: %.1f ms/frame (%d iters)", what, cell.median_s * 1e3, len(cell.times))
    except (RuntimeError, MemoryError) as e:
        cell.error = str(e).splitlines()[0][:120]
        logger.error("%s failed: %s", what, cell.error)
    return cell


def _time_backend(variant: Variant, model: EDTalkModel, inputs: Inputs, ours: torch.Tensor, cname: str,
                  batches: Sequence[int], args: argparse.Namespace, labels: dict[str, str],
                  diffs: dict[str, dict[str, float]]) -> list[Cell]:
    logger.info("%s | %s: preparing (export and engine build on first use)", cname, variant.name)
    renderer = variant.make(model, args)
    try:
        labels[variant.name] = renderer.describe()
        if variant.name == "torch-cuda-fp32" and torch.backends.cudnn.allow_tf32:
            labels[variant.name] += ", cuDNN TF32 convolutions (the torch default)"
        avatar = renderer.prepare_expression(renderer.prepare_source(inputs.image), inputs.exp)
        raw = renderer.render(avatar, inputs.lip[:1], inputs.pose[:1], raw=True)
        diffs.setdefault(variant.name, {})[cname] = float(np.abs(raw.astype(np.float32) - ours.numpy()).max())
        cells = []
        for b in batches:
            cell = Cell(variant.name, cname, b, variant.device)
            what = f"{cname} | {variant.name} | batch {b}"
            lip, pose = inputs.lip[:b], inputs.pose[:b]
            try:
                cell.times, cell.cores = time_calls(lambda lip=lip, pose=pose: renderer.render(avatar, lip, pose),
                                                    variant.device, args.warmup, args.iters, args.min_time,
                                                    args.max_time, what)
                logger.info("%s: %.1f ms/batch, %.2f FPS (%d iters)", what, cell.median_s * 1e3, cell.fps,
                            len(cell.times))
            except (RuntimeError, MemoryError) as e:       # e.g. out of memory at a big batch: report, go on
                cell.error = str(e).splitlines()[0][:120]
                logger.error("%s failed: %s", what, cell.error)
                if variant.device == "cuda":
                    torch.cuda.empty_cache()
            cells.append(cell)
        return cells
    finally:
        renderer.close()


def _machine_line(m: dict[str, str], load_start: str = "") -> str:
    """The machine in one line: CPU, memory, GPU, torch threads and, when known, the load average."""
    line = (f"{m.get('cpu', '?')}, {m.get('memory', '?')} RAM; GPU: {m.get('gpu', 'none')}; "
            f"torch threads {m.get('torch_threads', '?')}")
    if "load" in m and load_start:   # other work on the machine distorts CPU numbers: show it
        line += f"; load average (1, 5, 15 min) {load_start} at the start, {m['load']} at the end"
    return line


def _versions_line(v: dict[str, str]) -> str:
    own = f"edtalk-live {v.get('edtalk-live', '?')}" + (f" (git {v['git']})" if "git" in v else "")
    parts = [own, f"Python {v.get('python', '?')}", f"torch {v.get('torch', '?')}", f"NumPy {v.get('numpy', '?')}"]
    parts += [f"{k} {v[k]}" for k in ("onnxruntime", "tensorrt") if k in v]
    return ", ".join(parts)


def _report(res: Results, args: argparse.Namespace, command: str, machine: dict[str, str], software: dict[str, str],
            load_start: str = "") -> str:
    from edtalk_live.benchmarks.pipeline import format_pipeline

    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Machine: {_machine_line(machine, load_start or '?')}", f"Versions: {_versions_line(software)}", "",
             f"Command: `{command}` ({date})", "", "Models:"]
    lines += [f"- {m.describe()}" for m in res.models.values()]
    lines += ["", "Per-frame path (decoder + uint8 + copy back), frames per second:", "", format_table(res.cells), ""]
    for name, desc in res.labels.items():
        d = ", ".join(f"{c} {e:.1e}" for c, e in res.diffs.get(name, {}).items())
        lines.append(f"- `{name}`: {desc}; one raw frame vs torch fp32 on the CPU, max abs difference: {d}")
    if not args.no_reference:
        lines.append("- reference: the published per-frame path (re-encode the source, QR of the bases, EEM, grouped "
                     "modulated convolutions) on the same weights, batch 1")
    lines.append("")
    if any(c.ok and c.device == "cpu" for c in res.cells):
        lines.append(f"CPU cores: process CPU time over wall time while timing a CPU cell (torch threads: "
                     f"{torch.get_num_threads()}); well below that, other work competed for the CPU.")
    for cname, err in res.checks.items():
        status = ("passed" if err < REFERENCE_TOL else "FAILED") if cname in CHECKED_CONFIGS else "not asserted"
        lines.append(f"Reference check ({cname}): max |reference − ours| = {err:.2e} on one raw frame "
                     f"(CPU fp32, tolerance {REFERENCE_TOL:.0e}): {status}")
    if res.pipeline:
        lines += ["", "Whole pipeline:", "", format_pipeline(res.pipeline), "",
                  "- offline render: `edtalk-live render`'s own code on speech-like audio and the built-in portrait, "
                  "with the backend and batch of the model's fastest per-frame cell; audio seconds rendered per "
                  "second, from loading the weights to the finished mp4 (H.264 + AAC), after one short untimed render",
                  "- live sessions: `edtalk-live serve` started with the same backend and WebRTC sessions (speech-like "
                  "audio in real time, each client a process of its own on this machine) ramped through "
                  "--live-sessions until a level did not keep up; the most sessions that got 25 fps with at most 1 % "
                  "of frames late, the mean batch there and the server's CPU (benchmarks/capacity.py)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
