"""Every GPU measurement of the project in one command, written as one Markdown report.

    python -m edtalk_live.benchmarks.gpu_check                    # on a CUDA machine: about 4 minutes, at most 8
    python -m edtalk_live.benchmarks.gpu_check --dry-run          # the same code path on the CPU at 64² (CI)
    benchmarks/gpu_check.sh                                       # from a bare copy of the tree: import path + timeout

The report (``--out``, default ``gpu_check.md``, and the same on stdout) has five sections:

1. machine: GPU, driver, CUDA, cuDNN, torch, ONNX Runtime, CPUs, the command line;
2. fp16 vs fp32: PSNR of the torch CUDA fp16 decoder against strict fp32 (TF32 off) on the same inputs;
3. frames per second of the per-frame path (``Renderer.render``: decoder, uint8 on the device, copy back) for
   every batch size: torch CUDA fp16 + channels-last + CUDA graphs, torch CUDA fp32 eager (the baseline, cuDNN's
   default TF32), and ONNX Runtime's CUDA provider when ``onnxruntime-gpu`` is installed (else skipped, with the
   reason); the timing machinery is :mod:`benchmarks.fps`'s (``build_model``, ``make_inputs``, ``time_calls``);
4. one frame at batch 1 (median and p95) for the fastest backend;
5. the live server (:mod:`benchmarks.latency`: a real server in a child process, N real aiortc clients with the
   frame-index probe) at 1, 8 and 32 sessions: latency audio in -> frame out, CPU of the server process per
   session-second, frames late or repeated, and what the run says about the 150-session target.

Each target is printed next to its number with PASS or FAIL. TensorRT is not measured here (the GPU machines have
no TensorRT builder): ``edtalk-live build`` and ``python -m benchmarks.fps --backends tensorrt`` measure it where
TensorRT is installed.

Robustness: every phase (2, 3 with 4, 5) runs in its own process group with a time limit, inside one overall budget
(``--time-limit``, 450 s by default). A phase writes what it measured after every step, so a phase that fails or
runs out of time still reports its finished cells, and the next phase runs. The report file is rewritten after
every phase. Nothing downloads anything: the weights are seeded random ones (speed does not depend on the values)
and ONNX graphs are exported locally into the usual cache. Progress goes to stderr.

``--dry-run`` runs the same code on the CPU at the 64² ``test`` config with tiny repetition counts (torch fp16 on
the CPU stands in for CUDA fp16, ONNX Runtime's CPU provider for its CUDA provider, 1 and 2 sessions) in about a
minute; without it and without CUDA the command exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import importlib
import importlib.util
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edtalk_live.edtalk.timing import FPS

__all__ = ["DRY_RUN", "GPU", "Profile", "build_parser", "main", "psnr"]

logger = logging.getLogger(__name__)

MODULE = "edtalk_live.benchmarks.gpu_check"
PHASES = ("psnr", "fps", "live")
PHASE_TITLES = {"psnr": "fp16 vs fp32 frames", "fps": "frames per second, one frame", "live": "live server"}

TARGET_PSNR_DB = 40.0
TARGET_FPS = 5000.0
TARGET_FPS_BATCH = 32            # the FPS target holds at batch >= this
TARGET_FRAME_MS = 3.0            # one frame at batch 1
TARGET_SESSIONS = 150            # concurrent 25 fps sessions on one GPU ...
TARGET_CORES = 16                # ... with this many CPU cores
SESSION_FPS = FPS
#: a live level "held 25 fps" when every session received at least this many frames a second (and the renderer
#: kept up: at most 1 % of the frames late, see ``benchmarks.latency.KEPT_UP_FRACTION``)
HELD_FPS = 24.0
#: aiortc clients per client process in the live phase (one Python process is one core)
CLIENTS_PER_WORKER = 4
#: seconds of a phase's limit kept back for writing its results
PHASE_MARGIN_S = 8.0
#: test hook: ``PHASE=raise`` or ``PHASE=hang`` (comma-separated) makes that phase fail, or hang with a child
#: process of its own (the runner must record it, stop the whole group and go on)
FAULT_ENV = "EDTALK_GPU_CHECK_FAULT"
#: the fp32 eager baseline of each device (the denominator of "x fp32 eager")
BASELINE = {"cuda": "torch-cuda-fp32", "cpu": "torch"}


# ================================================================================================ profiles


@dataclass(frozen=True)
class Profile:
    """What a run measures and how long it may take: :data:`GPU`, or :data:`DRY_RUN` on the CPU."""

    name: str
    device: str                       # "cuda" or "cpu"
    config: str                       # a key of benchmarks.fps.CONFIGS
    batches: tuple[int, ...]
    sessions: tuple[int, ...]
    seconds: float                    # audio per session in the live phase
    warmup_seconds: float             # audio of the unreported warm-up level (captures the CUDA graphs)
    warmup: int                       # untimed calls per FPS cell
    iters: int                        # timed calls per FPS cell, at least ...
    min_time: float                   # ... and for at least this long ...
    max_time: float                   # ... but no longer than this (after one call)
    psnr_frames: int                  # frames compared fp16 vs fp32
    server_max_batch: int             # frames per renderer call in the live server
    budget_s: float                   # the whole run
    limits: dict[str, float] = field(default_factory=dict)     # per phase, at most
    reserve: dict[str, float] = field(default_factory=dict)    # per phase, kept free for it by earlier phases
    ort_min_s: float = 60.0           # time left in the FPS phase needed to start ONNX Runtime (export + sessions)


GPU = Profile("gpu", "cuda", "official", (1, 2, 4, 8, 16, 32, 64), (1, 8, 32), seconds=8.0, warmup_seconds=2.0,
              warmup=3, iters=20, min_time=1.0, max_time=3.0, psnr_frames=16, server_max_batch=64, budget_s=450.0,
              limits={"psnr": 90.0, "fps": 210.0, "live": 200.0}, reserve={"psnr": 30.0, "fps": 60.0, "live": 90.0})
DRY_RUN = Profile("dry-run", "cpu", "test", (1, 2, 4, 8, 16, 32, 64), (1, 2), seconds=3.0, warmup_seconds=1.0,
                  warmup=1, iters=1, min_time=0.0, max_time=0.1, psnr_frames=4, server_max_batch=16, budget_s=115.0,
                  limits={"psnr": 20.0, "fps": 60.0, "live": 55.0}, reserve={"psnr": 10.0, "fps": 25.0, "live": 35.0},
                  ort_min_s=15.0)


# ================================================================================================ measurements


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    """Peak signal-to-noise ratio of ``a`` against ``b`` in dB (``inf`` when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


class _Recorder:
    """A phase's results, rewritten atomically after every step (what a killed phase measured is kept)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: dict[str, Any] = {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available in this process")
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count)
    return info


@contextlib.contextmanager
def _strict_fp32():
    """Real fp32 on CUDA: no TF32 in cuDNN convolutions or matmuls (torch allows it in convolutions by default)."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _phase_psnr(spec: dict[str, Any], rec: _Recorder) -> None:
    """fp16 decoder (as served: fp16, channels-last, CUDA graphs) vs strict fp32 on the same weights and inputs."""
    import copy

    import torch

    from edtalk_live.benchmarks import fps
    from edtalk_live.engines.torch_backend import TorchRenderer

    device = spec["device"]
    rec.data["device"] = _device_info(device)
    cfg = fps.CONFIGS[spec["config"]].model_config("edtalk")
    model = fps.build_model(cfg, spec["seed"])
    n = spec["psnr_frames"]
    inputs = fps.make_inputs(cfg, n, spec["seed"] + 1)
    lip, pose = inputs.lip[:n], inputs.pose[:n]

    def frames(renderer) -> tuple[np.ndarray, np.ndarray]:
        """Raw decoder output [n,3,S,S] and the uint8 frames as served [n,S,S,3]."""
        with _strict_fp32():      # the decoder inputs (encoder, expression blocks) are computed the same way
            avatar = renderer.prepare_expression(renderer.prepare_source(inputs.image), inputs.exp)
            raw = renderer.render(avatar, lip, pose, raw=True)
            served = renderer.render(avatar, lip, pose)
        return raw, served

    logger.info("psnr: %s config (%d², %d frames) on %s: fp32 reference", spec["config"], cfg.size, n, device)
    r32 = TorchRenderer(copy.deepcopy(model), device=device, dtype=torch.float32, cuda_graphs=False,
                        channels_last=False)
    raw32, u8_32 = frames(r32)
    label32 = r32.describe() + (", TF32 off" if device == "cuda" else "")
    r32.close()
    # the served fp16 path: on CUDA the backend's defaults (fp16, channels-last, CUDA graphs); on the CPU
    # (dry run) the same decoder in fp16 stands in for it
    r16 = TorchRenderer(copy.deepcopy(model), device=device, dtype=torch.float16)
    logger.info("psnr: fp16 (%s)", r16.describe())
    raw16, u8_16 = frames(r16)
    label16 = r16.describe()
    r16.close()
    clamp = (lambda x: np.clip(x, -1, 1))      # noqa: E731 - what is displayed: the decoder's [-1,1] range
    per_frame = [psnr(clamp(raw16[i]), clamp(raw32[i]), 2.0) for i in range(n)]
    rec.data.update(
        frames=n, size=cfg.size, config=spec["config"], fp16=label16, fp32=label32,
        psnr_db=psnr(clamp(raw16), clamp(raw32), 2.0), psnr_min_frame_db=min(per_frame),
        psnr_uint8_db=psnr(u8_16, u8_32, 255.0), seed=spec["seed"],
        max_abs_diff=float(np.abs(raw16.astype(np.float64) - raw32).max()),
        uint8_max_diff=int(np.abs(u8_16.astype(np.int16) - u8_32.astype(np.int16)).max()),
        raw_range=[float(raw32.min()), float(raw32.max())])
    logger.info("psnr: %.1f dB (raw, peak 2), %.1f dB (uint8 frames)", rec.data["psnr_db"], rec.data["psnr_uint8_db"])
    if device == "cuda":       # what cuDNN's default TF32 does to the fp32 baseline, for comparison
        r = TorchRenderer(copy.deepcopy(model), device=device, dtype=torch.float32, cuda_graphs=False,
                          channels_last=False)
        avatar = r.prepare_expression(r.prepare_source(inputs.image), inputs.exp)
        raw_tf32 = r.render(avatar, lip, pose, raw=True)
        r.close()
        rec.data["psnr_tf32_db"] = psnr(clamp(raw_tf32), clamp(raw32), 2.0)


def _fps_variants(device: str) -> list[tuple[str, Any, str]]:
    """``(name, benchmarks.fps.Variant or None, why it is skipped or "")`` in the order they are measured."""
    import torch

    from edtalk_live.benchmarks import fps
    from edtalk_live.engines import available_backends

    avail = fps.variants(device)
    out: list[tuple[str, Any, str]] = []
    if device == "cuda":
        out += [("torch-cuda-fp16", avail["torch-cuda-fp16"], ""), ("torch-cuda-fp32", avail["torch-cuda-fp32"], "")]
    else:       # dry run: the CPU stand-ins
        out += [("torch-cpu-fp16", fps.Variant("torch-cpu-fp16", "cpu", fps._make_torch("cpu", dtype=torch.float16)),
                 ""), ("torch", avail["torch"], "")]
    ort = avail.get("onnxruntime")
    if ort is None:
        out.append(("onnxruntime", None, available_backends().get("onnxruntime") or "onnxruntime is not usable"))
    elif device == "cuda" and ort.device != "cuda":
        import onnxruntime

        out.append(("onnxruntime", None, f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
                                         f"(providers: {', '.join(onnxruntime.get_available_providers())}); "
                                         "install onnxruntime-gpu to measure it"))
    else:
        out.append(("onnxruntime", ort, ""))
    return out


def _ort_providers_in_use(renderer: Any) -> list[str]:
    """The providers ONNX Runtime actually gave the decoder session (it falls back to the CPU when CUDA fails)."""
    session = renderer._session("decoder")          # noqa: SLF001 - the benchmark checks what really runs
    return list(session.get_providers())


def _phase_fps(spec: dict[str, Any], rec: _Recorder) -> None:
    import torch

    from edtalk_live.benchmarks import fps

    device, deadline = spec["device"], spec["deadline"]
    rec.data.update(device=_device_info(device), config=spec["config"], backends={}, cells=[])
    cfg = fps.CONFIGS[spec["config"]].model_config("edtalk")
    rec.data["size"] = cfg.size
    model = fps.build_model(cfg, spec["seed"])
    batches = sorted(set(spec["batches"]))
    inputs = fps.make_inputs(cfg, max(batches), spec["seed"] + 1)
    options = argparse.Namespace(threads=None)
    raw_frames: dict[str, np.ndarray] = {}
    for name, variant, why_not in _fps_variants(device):
        entry = rec.data["backends"][name] = {"label": "", "skipped": why_not, "error": "", "prepare_s": None,
                                              "max_abs_diff_to_fp32": None}
        rec.save()
        if why_not:
            logger.info("fps: %s skipped: %s", name, why_not)
            continue
        need = spec["ort_min_s"] if name == "onnxruntime" else 5.0
        if deadline - time.time() < need:
            entry["skipped"] = f"out of time ({max(0.0, deadline - time.time()):.0f} s of the phase left)"
            continue
        logger.info("fps: %s: preparing (ONNX export on first use)", name)
        t0 = time.perf_counter()
        try:
            renderer = variant.make(model, options)
        except Exception as e:  # noqa: BLE001 - one backend failing must not stop the others
            entry["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            logger.error("fps: %s could not start: %s", name, entry["error"])
            continue
        try:
            entry["label"] = renderer.describe()
            if name == "onnxruntime" and device == "cuda":
                used = _ort_providers_in_use(renderer)
                if not used or used[0] != "CUDAExecutionProvider":
                    entry["skipped"] = (f"ONNX Runtime could not start its CUDA provider (the decoder session got "
                                        f"{', '.join(used) or 'no provider'}); see the log above")
                    logger.error("fps: %s", entry["skipped"])
                    continue
            if name == BASELINE.get(device) and device == "cuda" and torch.backends.cudnn.allow_tf32:
                entry["label"] += ", cuDNN TF32 convolutions (the torch default)"
            avatar = renderer.prepare_expression(renderer.prepare_source(inputs.image), inputs.exp)
            raw_frames[name] = renderer.render(avatar, inputs.lip[:1], inputs.pose[:1], raw=True)
            entry["prepare_s"] = time.perf_counter() - t0
            _time_cells(name, variant.device, renderer, avatar, inputs, batches, spec, rec)
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            logger.error("fps: %s failed: %s", name, entry["error"])
        finally:
            renderer.close()
            rec.save()
    base = raw_frames.get(BASELINE[device])
    for name, raw in raw_frames.items():
        if base is not None:
            rec.data["backends"][name]["max_abs_diff_to_fp32"] = float(np.abs(raw.astype(np.float64) - base).max())


def _time_cells(name: str, device: str, renderer: Any, avatar: Any, inputs: Any, batches: Sequence[int],
                spec: dict[str, Any], rec: _Recorder) -> None:
    import torch

    from edtalk_live.benchmarks import fps

    last = 0.0                                   # seconds the previous cell took, to skip one that cannot fit
    for b in batches:
        cell = fps.Cell(name, spec["config"], b, device)
        what = f"fps: {name} batch {b}"
        left = spec["deadline"] - time.time()
        if left < max(2.0, 2.5 * last):
            cell.error = f"skipped: out of time ({max(0.0, left):.0f} s of the phase left)"
            logger.warning("%s %s", what, cell.error)
        else:
            t0 = time.perf_counter()
            lip, pose = inputs.lip[:b], inputs.pose[:b]
            try:
                cell.times, cell.cores = fps.time_calls(lambda lip=lip, pose=pose: renderer.render(avatar, lip, pose),
                                                        device, spec["warmup"], spec["iters"], spec["min_time"],
                                                        spec["max_time"], what)
                logger.info("%s: %.2f ms/batch, %s frames/s (%d iters)", what, cell.median_s * 1e3,
                            f"{cell.fps:,.0f}", len(cell.times))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at a big batch: record it, go on
                cell.error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                logger.error("%s failed: %s", what, cell.error)
                if device == "cuda":
                    torch.cuda.empty_cache()
            last = time.perf_counter() - t0
        d = cell.to_dict()
        if cell.ok:
            d["p95_ms"] = float(np.percentile(cell.times, 95)) * 1e3
        rec.data["cells"].append(d)
        rec.save()


# ------------------------------------------------------------------------------------------------ live


def usable_cpus() -> tuple[int, float | None]:
    """CPUs this process may run on (its affinity), and the cgroup's CPU quota in cores (None: no quota)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if limit != "max":
            quota = int(limit) / int(period)
    return n, quota


def _client_worker_init() -> None:
    """Import the client stack once per worker, before any clock starts (never raises: a Pool whose initializer
    fails respawns its workers forever; the level then reports the import error)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s client: %(message)s",
                        datefmt="%H:%M:%S")
    with contextlib.suppress(Exception):
        import edtalk_live.realtime.client  # noqa: F401
        import edtalk_live.realtime.session  # noqa: F401


def _client_chunk(url: str, n: int, audio: np.ndarray, options: dict[str, Any], connect_timeout: float):
    """In a client process: ``n`` clients at once (``benchmarks.latency.run_level``), each session analysed."""
    from edtalk_live.benchmarks import latency

    return asyncio.run(latency.run_level(url, n, audio, options, connect_timeout))


def _ready(_: int) -> int:
    time.sleep(0.2)             # long enough that every worker takes one
    return os.getpid()


class _CpuSampler:
    """Samples the server's CPU time and live sessions (its ``/metrics``: ``process_cpu_seconds_total``,
    ``edtalk_sessions``) every ``period`` seconds."""

    def __init__(self, url: str, period: float = 0.5):
        self.url, self.period = url, period
        self.samples: list[tuple[float, float, int]] = []      # (monotonic, cpu seconds, live sessions)

    async def run(self) -> None:
        from edtalk_live.benchmarks import capacity

        while True:
            with contextlib.suppress(Exception):
                snap = await capacity.snapshot(self.url)
                self.samples.append((snap.at, snap.get("process_cpu_seconds_total"), int(snap.get("edtalk_sessions"))))
            await asyncio.sleep(self.period)

    def summary(self) -> dict[str, float | None]:
        """Cores used over the whole span, and CPU milliseconds per session-second while sessions were live."""
        s = self.samples
        if len(s) < 2:
            return {"server_cores": None, "cpu_ms_per_session_s": None, "session_s": 0.0}
        cores = (s[-1][1] - s[0][1]) / max(s[-1][0] - s[0][0], 1e-9)
        cpu = session_s = 0.0
        for (t0, c0, n0), (t1, c1, n1) in zip(s, s[1:], strict=False):
            live = min(n0, n1)
            if live > 0:
                cpu += c1 - c0
                session_s += live * (t1 - t0)
        return {"server_cores": cores, "cpu_ms_per_session_s": 1000 * cpu / session_s if session_s > 0 else None,
                "session_s": session_s}


def _chunks(n: int, workers: int) -> list[int]:
    k = min(n, workers)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


class _Clients:
    """Client processes (spawned, so no CUDA or event loop is inherited); each runs a share of a level's clients."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: Any = None
        self.ready: Any = None

    def start(self) -> None:
        import multiprocessing

        self.pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_client_worker_init)
        self.ready = self.pool.map_async(_ready, range(self.workers))     # they import while the server starts

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    async def wait_ready(self, timeout: float = 120.0) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.ready.get, timeout)

    async def level(self, url: str, n: int, audio: np.ndarray, options: dict[str, Any], connect_timeout: float,
                    limit: float):
        """``benchmarks.latency.run_level`` for ``n`` clients spread over the processes: one merged LevelResult.

        Raises TimeoutError after ``limit`` seconds, and then restarts the processes (their clients may hang).
        """
        from edtalk_live.benchmarks import latency

        jobs = self.pool.starmap_async(_client_chunk, [(url, k, audio, options, connect_timeout)
                                                       for k in _chunks(n, self.workers)])
        try:
            parts = await asyncio.get_running_loop().run_in_executor(None, jobs.get, max(limit, 0.1))
        except Exception as e:
            import multiprocessing

            if not isinstance(e, multiprocessing.TimeoutError):
                raise
            self.close()
            self.start()
            raise TimeoutError(f"the clients did not finish within {limit:.0f} s") from None
        measures = [m for p in parts for m in p.measures]
        return latency.LevelResult(n, measures, wall_s=max(p.wall_s for p in parts), load=latency._load())


def _phase_live(spec: dict[str, Any], rec: _Recorder) -> None:
    asyncio.run(_live(spec, rec))


async def _live(spec: dict[str, Any], rec: _Recorder) -> None:
    from edtalk_live.benchmarks import latency

    device, deadline = spec["device"], spec["deadline"]
    sessions = sorted(set(spec["sessions"]))
    most = max(sessions)
    work = Path(spec["workdir"]) / "live"
    rec.data.update(config=spec["config"], device=device, seconds=spec["seconds"], rows=[])
    # the live stack must import here first: a clear error now rather than client processes failing one by one
    import aiohttp  # noqa: F401
    import aiortc  # noqa: F401
    import av  # noqa: F401

    import edtalk_live.realtime.client  # noqa: F401
    import edtalk_live.realtime.serve  # noqa: F401

    cpus, quota = usable_cpus()
    cpus = min(cpus, math.floor(quota)) if quota else cpus
    workers = max(1, min(math.ceil(most / CLIENTS_PER_WORKER), cpus - 2))
    rec.data["client_processes"] = workers
    logger.info("live: starting %d client process(es)", workers)
    clients = _Clients(workers)
    clients.start()
    try:
        logger.info("live: writing random %s weights", spec["config"])
        weights, avatar = latency.write_random_weights(work / "weights", spec["config"], "edtalk", spec["seed"])
        args = argparse.Namespace(backend="torch", device=device, sessions=[most], max_batch=spec["server_max_batch"],
                                  render_budget=None)   # the server measures it
        note = f"`{spec['config']}` config, seeded random weights (seed {spec['seed']}), random-noise avatar"
        server = latency._child_server(weights, avatar, args, note, work)
        logger.info("live: starting the server (%s, %s)", device, spec["config"])
        info = await asyncio.wait_for(server.__aenter__(), max(10.0, deadline - time.time() - 10))
        try:
            rec.data["server"] = info.to_dict() | {"pid": info.pid, "max_batch": spec["server_max_batch"]}
            rec.save()
            await clients.wait_ready()
            await _live_levels(spec, rec, clients, info, sessions, deadline)
        finally:
            await server.__aexit__(None, None, None)
            with contextlib.suppress(Exception):
                rec.data["server_log_tail"] = (work / "server.log").read_text(errors="replace")[-1500:]
    finally:
        clients.close()


async def _live_levels(spec: dict[str, Any], rec: _Recorder, clients: _Clients, info: Any, sessions: Sequence[int],
                       deadline: float) -> None:
    from edtalk_live.benchmarks import latency

    options = {"probe": True}
    connect_timeout = 30.0

    async def level(n: int, seconds: float) -> tuple[Any, dict, str]:
        """(LevelResult or None, the server's CPU over the level, error)."""
        audio = latency.speech_like(seconds, spec["seed"])
        limit = min(seconds + connect_timeout + 30, deadline - time.time())
        sampler = _CpuSampler(info.url)
        sampling = asyncio.create_task(sampler.run())
        try:
            result = await clients.level(info.url, n, audio, options, connect_timeout, limit)
        except Exception as e:  # noqa: BLE001 - a timeout or a crashed client process: report it, go on
            return None, sampler.summary(), f"{type(e).__name__}: {e}"[:300]
        finally:
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
        return result, sampler.summary(), ""

    # an unreported warm-up level at the largest concurrency: the server captures its CUDA graphs (one per batch
    # size) and warms cuDNN here, not in the first measured level
    if deadline - time.time() > spec["warmup_seconds"] + 5 + len(sessions) * (spec["seconds"] + 8):
        logger.info("live: warm-up, %d sessions for %.0f s (not reported)", max(sessions), spec["warmup_seconds"])
        _, _, err = await level(max(sessions), spec["warmup_seconds"])
        rec.data["warmup"] = {"sessions": max(sessions), "seconds": spec["warmup_seconds"], "error": err}
    await latency._wait_idle(info.url)
    idle = _CpuSampler(info.url, period=0.25)
    task = asyncio.create_task(idle.run())
    await asyncio.sleep(min(2.0, spec["seconds"]))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    rec.data["idle_cores"] = idle.summary()["server_cores"]
    rec.save()

    for n in sessions:
        left = deadline - time.time()
        if left < spec["seconds"] + 15:
            rec.data["rows"].append({"sessions": n, "error": f"skipped: out of time ({max(0.0, left):.0f} s left)"})
            rec.save()
            continue
        await latency._wait_idle(info.url)
        logger.info("live: %d session(s), %.0f s of audio each", n, spec["seconds"])
        result, cpu, err = await level(n, spec["seconds"])
        if result is None:
            row: dict[str, Any] = {"sessions": n, "error": err}
            logger.error("live: %d sessions failed: %s", n, err)
        else:
            row = latency.summarise(result, info.render_budget_ms)
            if not row["sessions_ok"]:
                row["error"] = "; ".join(dict.fromkeys(row["errors"]))[:300] or "no session worked"
            logger.info("live: %d sessions: video p50 %s / p95 %s ms, fps %s, kept up %s, server %s cores", n,
                        latency._f(row["video_latency_ms_p50"]), latency._f(row["video_latency_ms_p95"]),
                        latency._f(row["fps_mean"], 1), row["kept_up"], latency._f(cpu["server_cores"], 2))
        row.update(cpu)
        rec.data["rows"].append(row)
        rec.save()


PHASE_FUNCS: dict[str, Callable[[dict[str, Any], _Recorder], None]] = {
    "psnr": _phase_psnr, "fps": _phase_fps, "live": _phase_live}


def _one_line(text: str, limit: int = 600) -> str:
    """An error for one line of the report: its first line, and its last three (e.g. a server log's tail)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 4:
        lines = [lines[0], "…", *lines[-3:]]
    out = " / ".join(lines)
    return out if len(out) <= limit else out[:limit - 1] + "…"


def _inject_fault(name: str, rec: _Recorder) -> None:
    faults = dict(f.split("=", 1) for f in os.environ.get(FAULT_ENV, "").split(",") if "=" in f)
    if faults.get(name) == "raise":
        raise RuntimeError(f"fault injected into phase {name} ({FAULT_ENV})")
    if faults.get(name) == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        rec.data["fault_child_pid"] = child.pid
        rec.save()
        logger.info("%s: hanging, with a child process (pid %d) (%s)", name, child.pid, FAULT_ENV)
        time.sleep(3600)


def _phase_main(name: str, spec_path: str) -> int:
    """Entry point of a phase's own process: run it, record its results (and its error) in ``spec['out']``."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("aioice", "aiortc", "aiohttp", "edtalk_live.realtime", "edtalk_live.engines",
                  "edtalk_live.export", "edtalk_live.benchmarks.latency", "edtalk_live.benchmarks.fps"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    rec = _Recorder(spec["out"])
    rec.data["started"] = time.time()
    try:
        _inject_fault(name, rec)
        PHASE_FUNCS[name](spec, rec)
    except BaseException as e:
        rec.data["error"] = _one_line(f"{type(e).__name__}: {e}")
        rec.save()
        logger.exception("%s: failed", name)
        return 1
    rec.data["complete"] = True
    rec.save()
    return 0


# ================================================================================================ running phases


@dataclass
class PhaseRun:
    """How a phase went: ``status`` is ok, failed, timed out, skipped or not run; ``data`` what it recorded."""

    name: str
    status: str = "not run"
    seconds: float = 0.0
    limit_s: float = 0.0
    error: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


class _Interrupted(Exception):
    """SIGTERM (e.g. from ``timeout``): stop the running phase, write the report so far."""


def _forward(stream, prefix: str, tail: collections.deque) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip()
        tail.append(line)
        with contextlib.suppress(Exception):
            print(f"[{prefix}] {line}", file=sys.stderr, flush=True)


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End the phase's process group (the phase, its server, its client processes): TERM, then KILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return                                       # nothing left in the group
    end = time.monotonic() + grace
    while time.monotonic() < end:
        proc.poll()                                  # reap the phase itself, or it counts as a member
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def run_phase(name: str, spec: dict[str, Any], limit: float, workdir: Path, env: dict[str, str]) -> PhaseRun:
    """Run phase ``name`` in a new process group for at most ``limit`` seconds; what it recorded, even if it failed."""
    run = PhaseRun(name, limit_s=limit)
    out = workdir / f"{name}.json"
    spec = {**spec, "deadline": time.time() + limit - PHASE_MARGIN_S, "out": str(out), "workdir": str(workdir)}
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", MODULE, "--phase", name, "--phase-spec", str(spec_path)]
    tail: collections.deque = collections.deque(maxlen=30)
    t0 = time.monotonic()
    logger.info("phase %s: started (limit %.0f s)", name, limit)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    reader = threading.Thread(target=_forward, args=(proc.stdout, name, tail), daemon=True)
    reader.start()
    rc: int | None = None
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        run.status, run.error = "timed out", f"timed out after {limit:.0f} s (the phase's limit); stopped"
    except (_Interrupted, KeyboardInterrupt):
        run.status, run.error, run.interrupted = "failed", "interrupted (SIGTERM or Ctrl-C); stopped", True
    finally:
        run.seconds = time.monotonic() - t0
        _kill_group(proc, grace=0.5 if rc is not None else 5.0)
        reader.join(timeout=5)
        if out.is_file():
            with contextlib.suppress(ValueError, OSError):
                run.data = json.loads(out.read_text())
        if rc is not None:
            if rc == 0 and run.data.get("complete"):
                run.status = "ok"
            else:
                run.status = "failed"
                last = [ln for ln in tail if ln.strip()][-3:]
                run.error = run.data.get("error") or _one_line(f"exit status {rc}:\n" + "\n".join(last))
        logger.info("phase %s: %s in %.0f s%s", name, run.status, run.seconds, f" ({run.error})" if run.error else "")
    return run


def _phase_env() -> dict[str, str]:
    """The environment of a phase: ours, with the folder that holds this ``edtalk_live`` first on PYTHONPATH."""
    import edtalk_live

    env = dict(os.environ)
    root = str(Path(list(edtalk_live.__path__)[0]).parent)       # not resolved: keeps a symlinked package
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in paths if p != root]])
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ================================================================================================ machine


def _run_text(cmd: Sequence[str], timeout: float = 20.0) -> str:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(profile: Profile) -> dict[str, Any]:
    """What the report says about the machine (no CUDA context is needed for any of it)."""
    import torch

    from edtalk_live.benchmarks.fps import machine_description

    m = machine_description()
    info: dict[str, Any] = {"cpu": m["cpu"], "memory": m.get("memory", "?"), "python": m["python"],
                            "torch": torch.__version__, "torch_cuda": torch.version.cuda or "none (CPU build)",
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "cpu_count": os.cpu_count(), "load": m.get("load", "")}
    info["usable_cpus"], info["cpu_quota"] = usable_cpus()
    smi = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi:
        first = [x.strip() for x in smi.splitlines()[0].split(",")]
        info.update(gpu=first[0], driver=first[1] if len(first) > 1 else "?",
                    gpu_memory=first[2] if len(first) > 2 else "?", gpus=len(smi.splitlines()))
    else:
        with contextlib.suppress(OSError):
            line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
            info["driver"] = next((w for w in line.split() if w[:1].isdigit() and "." in w), line)
        if m.get("gpu"):
            info["gpu"] = m["gpu"]
    try:
        import onnxruntime as ort

        info["onnxruntime"] = f"{ort.__version__} (providers: {', '.join(ort.get_available_providers())})"
    except ImportError:
        info["onnxruntime"] = "not installed"
    spec = importlib.util.find_spec("tensorrt")
    info["tensorrt"] = "installed" if spec else "not installed"
    live = []
    for mod, label in (("aiortc", "aiortc"), ("av", "PyAV"), ("aiohttp", "aiohttp")):
        try:
            live.append(f"{label} {getattr(importlib.import_module(mod), '__version__', '?')}")
        except Exception:  # noqa: BLE001 - missing or broken: the live phase will say why
            live.append(f"{label} not installed")
    info["live_stack"] = ", ".join(live)
    return info


# ================================================================================================ report


def _num(x: float | None, digits: int | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "∞"
    if digits is not None:
        return f"{x:,.{digits}f}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _esc(text: object) -> str:
    """Text for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("**PASS**" if ok else "**FAIL**")


def _phase_problem(run: PhaseRun | None) -> list[str]:
    if run is None or run.status == "not run":
        return ["Not run."]
    if run.status == "running":
        return ["Running…"]
    if run.status == "skipped":
        return [f"Skipped: {run.error}"]
    if run.status != "ok":
        return [f"**Phase {run.status}**: {run.error}." + (" What it measured before that is below." if run.data
                                                           else ""), ""]
    return []


def _cells(run: PhaseRun | None) -> list[Any]:
    from edtalk_live.benchmarks.fps import Cell

    cells = []
    for d in (run.data.get("cells", []) if run else []):
        c = Cell(d["backend"], d["config"], d["batch"], d["device"], list(d.get("times") or []), d.get("error", ""),
                 d.get("cores", 0.0))
        cells.append(c)
    return cells


def _fps_table(cells: Sequence[Any], device: str) -> str:
    base = {c.batch: c for c in cells if c.ok and c.backend == BASELINE[device]}
    head = ["backend", "batch", "ms / batch", "ms / frame", "frames/s (median)", "frames/s p10", "frames/s p90",
            "× fp32 eager", "iters"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for c in cells:
        if not c.ok:
            lines.append(f"| {c.backend} | {c.batch} | {_esc(c.error)} |" + " |" * (len(head) - 3))
            continue
        b = base.get(c.batch)
        ratio = f"{c.fps / b.fps:.2f}×" if b else "—"
        ms = c.median_s * 1e3
        lines.append(f"| {c.backend} | {c.batch} | {_num(ms)} | {_num(ms / c.batch)} | {_num(c.fps)} | "
                     f"{_num(c.fps_p10)} | {_num(c.fps_p90)} | {ratio} | {len(c.times)} |")
    return "\n".join(lines)


def _best(cells: Sequence[Any], pred: Callable[[Any], bool]) -> Any | None:
    ok = [c for c in cells if c.ok and pred(c)]
    return max(ok, key=lambda c: c.fps) if ok else None


def _live_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["sessions", "video latency p50 (ms)", "video latency p95 (ms)", "render budget (ms)", "added p95 (ms)",
            "fps received (mean / min)", "frames late", "dropped / repeated / skipped", "server CPU (cores)",
            "server CPU per session-second (ms)", "held 25 fps, ≤ 1 % late"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + "---|"]
    for r in rows:
        if "video_latency_ms_p50" not in r:
            lines.append(f"| {r['sessions']} | failed: {_esc(r.get('error', '?'))} |" + " |" * (len(head) - 2))
            continue
        n = str(r["sessions"]) if r["sessions_ok"] == r["sessions"] else f"{r['sessions']} ({r['sessions_ok']} ok)"
        fps = "—" if r["fps_mean"] is None else f"{r['fps_mean']:.1f} / {r['fps_min']:.1f}"
        lines.append("| " + " | ".join([
            n, _num(r["video_latency_ms_p50"], 0), _num(r["video_latency_ms_p95"], 0),
            _num(r.get("render_budget_ms"), 0), _num(r["added_ms_p95"], 0), fps,
            f"{100 * r['late_fraction']:.1f} %",
            f"{r['frames_dropped']} / {r['frames_repeated']} / {r['frames_skipped']}",
            _num(r.get("server_cores"), 2), _num(r.get("cpu_ms_per_session_s"), 0),
            "yes" if _held(r) else "no"]) + " |")
    return "\n".join(lines)


def _held(row: dict[str, Any]) -> bool:
    return bool(row.get("kept_up")) and row.get("sessions_ok") == row.get("sessions") \
        and (row.get("fps_min") or 0) >= HELD_FPS


def report(profile: Profile, runs: dict[str, PhaseRun], machine: dict[str, Any], command: str, started: str,
           wall_s: float, finished: bool) -> str:
    """The Markdown report from the phases' records (complete or not)."""
    dry = profile.name == "dry-run"
    lines = ["# GPU check" + (" (dry run on the CPU: code path only, not GPU numbers)" if dry else ""), ""]
    if not finished:
        lines += ["**Incomplete: the run is still going or was stopped; sections below may be missing.**", ""]
    summary: list[tuple[str, str, str]] = []          # (target, measured, verdict)

    # ---- 1. machine
    psnr_run, fps_run, live_run = runs.get("psnr"), runs.get("fps"), runs.get("live")
    dev = next((r.data.get("device") for r in (psnr_run, fps_run) if r and isinstance(r.data.get("device"), dict)
                and r.data["device"].get("gpu")), {}) or {}
    gpu = machine.get("gpu") or dev.get("gpu") or "none"
    if dev.get("capability"):
        gpu += f" (compute capability {dev['capability']}, {dev.get('gpu_memory_gib', '?')} GiB)"
    elif machine.get("gpu_memory"):
        gpu += f" ({machine['gpu_memory']})"
    lines += ["## 1. Machine", "",
              f"- GPU: {gpu}" + (f"; {machine['gpus']} GPUs, the first one used" if machine.get("gpus", 1) > 1 else ""),
              f"- driver: {machine.get('driver', 'unknown (no nvidia-smi)')}; CUDA (torch build): "
              f"{machine['torch_cuda']}; cuDNN: {machine.get('cudnn') or '—'}",
              f"- torch {machine['torch']}; Python {machine['python']}; ONNX Runtime {machine['onnxruntime']}; "
              f"TensorRT {machine['tensorrt']}, not measured by this check (no TensorRT builder on the GPU machine; "
              "`edtalk-live build` and `python -m benchmarks.fps --backends tensorrt` measure it where it is "
              "installed)",
              f"- live server stack: {machine.get('live_stack', '?')}",
              f"- CPU: {machine['cpu']}, {machine['memory']} RAM"
              + (f" ({machine['usable_cpus']} usable by this process)" if machine.get("usable_cpus") not in
                 (None, machine.get("cpu_count")) else "")
              + (f"; cgroup CPU quota {machine['cpu_quota']:g} cores" if machine.get("cpu_quota") else "") + "; "
              f"load average {machine.get('load') or '?'} at the start",
              f"- command: `{command}`",
              f"- started {started}; took {wall_s:.0f} s; profile `{profile.name}` (model config `{profile.config}`, "
              f"seeded random weights: speed does not depend on the weight values)", ""]
    lines += ["| phase | status | seconds | limit (s) |", "|---|---|---:|---:|"]
    for name in PHASES:
        r = runs.get(name)
        if r is not None:
            lines.append(f"| {name} ({PHASE_TITLES[name]}) | {r.status}{': ' + _esc(r.error) if r.error else ''} | "
                         f"{r.seconds:.0f} | {r.limit_s:.0f} |")
    lines.append("")

    # ---- 2. fp16 vs fp32
    lines += ["## 2. fp16 vs fp32 frames", ""]
    lines += _phase_problem(psnr_run)
    d = psnr_run.data if psnr_run else {}
    if "psnr_db" in d:
        ok = d["psnr_db"] >= TARGET_PSNR_DB
        lines += [f"PSNR of the fp16 decoder output against fp32 on the same inputs: **{_num(d['psnr_db'], 1)} dB** "
                  f"(target ≥ {TARGET_PSNR_DB:.0f} dB: {_verdict(ok)})", "",
                  f"- {d['frames']} frames at {d['size']}², same weights and inputs; raw output clamped to the "
                  f"displayed range [-1, 1] (peak 2); worst frame {_num(d['psnr_min_frame_db'], 1)} dB; max |diff| "
                  f"{d['max_abs_diff']:.2e} (raw output range {d['raw_range'][0]:.2f} … {d['raw_range'][1]:.2f})",
                  "- uint8 frames as served" + (" (fp16 through the CUDA graph, converted on the device)"
                                                 if profile.device == "cuda" else "") + " against fp32's: "
                  f"{_num(d['psnr_uint8_db'], 1)} dB, largest difference {d['uint8_max_diff']} levels",
                  f"- fp16: {d['fp16']}; fp32: {d['fp32']}",
                  "- weights: seeded random (`benchmarks.fps.build_model`, flow convolutions scaled down like the "
                  "parity fixtures); the published weights are not on the machine"]
        if "psnr_tf32_db" in d:
            lines.append(f"- for comparison, fp32 with cuDNN's default TF32 convolutions against strict fp32: "
                         f"{_num(d['psnr_tf32_db'], 1)} dB")
        if dry:
            lines.append("- dry run: fp16 on the CPU stands in for CUDA fp16")
        summary.append((f"fp16 frames ≥ {TARGET_PSNR_DB:.0f} dB PSNR vs fp32", f"{_num(d['psnr_db'], 1)} dB",
                        _verdict(ok)))
    else:
        summary.append((f"fp16 frames ≥ {TARGET_PSNR_DB:.0f} dB PSNR vs fp32", "not measured", "—"))
    lines.append("")

    # ---- 3. frames per second
    lines += [f"## 3. Frames per second ({profile.config}, per-frame path)", ""]
    lines += _phase_problem(fps_run)
    cells = _cells(fps_run)
    fd = fps_run.data if fps_run else {}
    size = fd.get("size", "?")
    if cells:
        lines += [f"`Renderer.render(avatar, lip, pose)` at {size}²: the decoder, the conversion to uint8 on the "
                  "device and the copy back to the host, timed with CUDA synchronisation on a GPU; medians over the "
                  "timed "
                  "calls (p10/p90 give the spread); one identity and one expression prepared once.", "",
                  _fps_table(cells, profile.device), ""]
    for name, b in fd.get("backends", {}).items():
        if b.get("skipped"):
            lines.append(f"- `{name}`: skipped: {b['skipped']}")
        elif b.get("error"):
            lines.append(f"- `{name}`: failed: {b['error']}")
        else:
            diff = b.get("max_abs_diff_to_fp32")
            lines.append(f"- `{name}`: {b['label']}; prepared in {_num(b.get('prepare_s'))} s"
                         + ("" if diff is None else f"; one raw frame vs fp32 eager, max |diff| {diff:.1e}"))
    lines.append("- `tensorrt`: not measured (no TensorRT builder on the GPU machine)")
    if dry:
        lines.append("- dry run: torch fp16 on the CPU stands in for CUDA fp16 + CUDA graphs, ONNX Runtime's CPU "
                     "provider for its CUDA provider")
    big = _best(cells, lambda c: c.batch >= TARGET_FPS_BATCH)
    if big is not None:
        ok = big.fps >= TARGET_FPS
        lines += ["", f"Best at batch ≥ {TARGET_FPS_BATCH}: **{_num(big.fps)} frames/s** ({big.backend}, batch "
                  f"{big.batch}; target ≥ {TARGET_FPS:,.0f}: {_verdict(ok)})"]
        summary.append((f"≥ {TARGET_FPS:,.0f} frames/s at batch ≥ {TARGET_FPS_BATCH}",
                        f"{_num(big.fps)} ({big.backend}, batch {big.batch})", _verdict(ok)))
    else:
        summary.append((f"≥ {TARGET_FPS:,.0f} frames/s at batch ≥ {TARGET_FPS_BATCH}", "not measured", "—"))
    lines.append("")

    # ---- 4. one frame
    lines += ["## 4. One frame at batch 1", ""]
    one = _best(cells, lambda c: c.batch == 1)
    if one is not None:
        med, p95 = one.median_s * 1e3, float(np.percentile(one.times, 95)) * 1e3
        ok = med <= TARGET_FRAME_MS
        others = ", ".join(f"{c.backend} {_num(c.median_s * 1e3)} ms" for c in cells
                           if c.ok and c.batch == 1 and c is not one)
        lines += [f"Fastest backend at batch 1: `{one.backend}`: **{_num(med)} ms** median, {_num(p95)} ms p95 over "
                  f"{len(one.times)} calls (target ≤ {TARGET_FRAME_MS:g} ms: {_verdict(ok)})"
                  + (f"; others: {others}" if others else ""),
                  "", "One frame is `render` at batch 1: the latent, the decoder, uint8 on the device and the copy "
                  "back to the host (the server adds its own scheduling on top)."]
        summary.append((f"≤ {TARGET_FRAME_MS:g} ms for one frame at batch 1",
                        f"{_num(med)} ms median, {_num(p95)} ms p95 ({one.backend})", _verdict(ok)))
    else:
        lines += _phase_problem(fps_run) or ["No batch-1 measurement."]
        summary.append((f"≤ {TARGET_FRAME_MS:g} ms for one frame at batch 1", "not measured", "—"))
    lines.append("")

    # ---- 5. live server
    lines += ["## 5. Live server", ""]
    lines += _phase_problem(live_run)
    ld = live_run.data if live_run else {}
    rows = ld.get("rows", [])
    srv = ld.get("server", {})
    if srv:
        lines += [f"Server: `edtalk-live serve` in a child process; backend {srv.get('backend')}; model "
                  f"{srv.get('model')}; render budget measured by the server (per level in the table); max batch "
                  f"{srv.get('max_batch')}. Clients: real aiortc clients (Opus out, VP8 and Opus in, probe mode), "
                  f"{ld.get('client_processes')} client process(es) on the same machine, {_num(ld.get('seconds'))} s "
                  "of speech-like audio per session; an unreported warm-up level first"
                  + (f" ({ld['warmup']['sessions']} sessions, {ld['warmup']['seconds']:g} s"
                     + (f"; failed: {ld['warmup']['error']}" if ld['warmup'].get('error') else "") + ")"
                     if ld.get("warmup") else " (skipped: not enough time)") + ".", ""]
    if rows:
        lines += [_live_table(rows), "",
                  "- video latency: audio in -> frame out, measured by the client: a frame's arrival minus the moment "
                  "the last audio sample it shows was sent (includes the lip-sync look-ahead and the render budget "
                  "the server waits by design, Opus, VP8 and both jitter buffers); added p95: the p95 minus the "
                  "audio window the mouth needs (`benchmarks/latency.py`).",
                  "- frames late: dropped, or repeated + skipped (the larger), over the frames due; held: every "
                  f"session received ≥ {HELD_FPS:g} frames/s and at most 1 % of the frames were late.",
                  "- server CPU: the server process's CPU time (all threads, from /proc) over the level; per "
                  "session-second: over the seconds each session was live (sampled from `/health` every 0.5 s)"
                  + (f"; idle server: {_num(ld.get('idle_cores'), 2)} cores." if ld.get("idle_cores") is not None
                     else ".")]
    lines += [""] + _capacity(profile, rows, cells, summary)
    lines.append("")

    # ---- summary
    lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in summary]
    if dry:
        lines += ["", "Dry run: CPU numbers at the 64² test config; the verdicts only show that the code path works."]
    return "\n".join(lines) + "\n"


def _capacity(profile: Profile, rows: Sequence[dict[str, Any]], cells: Sequence[Any],
              summary: list[tuple[str, str, str]]) -> list[str]:
    """What the run says about ≥ 150 concurrent 25 fps sessions on one GPU with 16 cores (tested, then extrapolated)."""
    target = f"≥ {TARGET_SESSIONS} concurrent {SESSION_FPS} fps sessions (one GPU, {TARGET_CORES} cores)"
    measured = [r for r in rows if "video_latency_ms_p50" in r]
    held = [r["sessions"] for r in measured if _held(r)]
    failed = [r["sessions"] for r in measured if not _held(r)]
    out = ["**Capacity** (target: " + target + ")", ""]
    if measured:
        out.append(f"- tested: {', '.join(str(r['sessions']) for r in measured)} sessions; held 25 fps with ≤ 1 % late "
                   f"frames at {', '.join(map(str, held)) or 'none'}"
                   + (f"; not at {', '.join(map(str, failed))}" if failed else ""))
    else:
        out.append("- tested: no level measured")
    served = "torch-cuda-fp16" if profile.device == "cuda" else "torch"          # the backend the server runs
    gpu_best = _best(cells, lambda c: c.backend == served and c.batch <= profile.server_max_batch)
    gpu_sessions = gpu_best.fps / SESSION_FPS if gpu_best else None
    # CPU per session-second from the largest level that held (a saturated process under-counts: work left undone),
    # else from the smallest level (its fixed overhead makes the figure pessimistic)
    per = [r for r in measured if r.get("cpu_ms_per_session_s")]
    per_held = [r for r in per if _held(r)]
    cpu_row = max(per_held, key=lambda r: r["sessions"]) if per_held else \
        (min(per, key=lambda r: r["sessions"]) if per else None)
    cpu_sessions = TARGET_CORES * 1000 / cpu_row["cpu_ms_per_session_s"] if cpu_row else None
    busy = [r for r in measured if not _held(r) and (r.get("server_cores") or 0) >= 0.9]
    if busy:
        r = min(busy, key=lambda r: r["sessions"])
        out.append(f"- at {r['sessions']} sessions the server process used {r['server_cores']:.2f} cores: one Python "
                   "process (one core for its event loop, codecs and Python work) is what limits it, not the GPU; "
                   "the design spreads sessions over one worker process per core")
    if gpu_sessions is not None:
        out.append(f"- extrapolated, renderer: {_num(gpu_best.fps)} frames/s ({served}, batch {gpu_best.batch}) / "
                   f"{SESSION_FPS} = about {gpu_sessions:,.0f} sessions")
    if cpu_sessions is not None:
        one_proc = 1000 / cpu_row["cpu_ms_per_session_s"]
        which = "" if _held(cpu_row) else ", which did not hold"
        out.append(f"- extrapolated, CPU: {_num(cpu_row['cpu_ms_per_session_s'], 0)} ms of server CPU per "
                   f"session-second (at {cpu_row['sessions']} sessions{which}) -> about {cpu_sessions:,.0f} "
                   f"sessions on {TARGET_CORES} cores if the sessions were spread over one server process per core; "
                   f"one server process (one core for Python) carries about {one_proc:,.0f}")
    if gpu_sessions is not None and cpu_sessions is not None:
        est = min(gpu_sessions, cpu_sessions)
        ok = est >= TARGET_SESSIONS
        out.append(f"- extrapolated capacity: about {est:,.0f} sessions (the smaller of the two): "
                   f"{_verdict(ok)} (extrapolated, not tested)")
        verdict = "**PASS** (tested)" if max(held, default=0) >= TARGET_SESSIONS else f"{_verdict(ok)} (extrapolated)"
        summary.append((target, f"{_tested(measured, held)}; extrapolated ≈ {est:,.0f}", verdict))
    else:
        summary.append((target, f"{_tested(measured, held)}; not enough data to extrapolate", "—"))
    return out


def _tested(measured: Sequence[dict[str, Any]], held: Sequence[int]) -> str:
    if not measured:
        return "no level tested"
    return (f"tested up to {max(r['sessions'] for r in measured)} sessions, held at "
            f"{', '.join(map(str, held)) or 'none'}")


# ================================================================================================ CLI


def _phases(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in PHASES]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"phases are {', '.join(PHASES)}; got {text!r}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edtalk_live.benchmarks.gpu_check",
        description="Every GPU measurement in one run (at most 8 minutes on one GPU): fp16 vs fp32 PSNR, frames per "
                    "second per backend and batch at 256², one frame's time, and the live server's latency, CPU and "
                    "late frames at 1, 8 and 32 sessions. Writes one Markdown report (also on stdout); progress on "
                    "stderr. Exit status: 0 every phase finished, 1 a phase failed or ran out of time (the report "
                    "says which), 2 usage error or no CUDA.")
    p.add_argument("--out", metavar="FILE.md", default="gpu_check.md", help="the report (default: gpu_check.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the same code on the CPU at the 64² test config with tiny repetition counts "
                        "(sessions 1,2; about a minute; for CI)")
    from edtalk_live.benchmarks.latency import positive_ints

    p.add_argument("--sessions", type=positive_ints, default=None,
                   help="concurrent sessions of the live phase (default: 1,8,32; dry run 1,2)")
    p.add_argument("--batches", type=positive_ints, default=None,
                   help="batch sizes of the FPS phase (default: 1,2,4,8,16,32,64)")
    p.add_argument("--seconds", type=float, default=None,
                   help="seconds of audio per session in the live phase (default: 8; dry run 3)")
    p.add_argument("--phases", type=_phases, default=PHASES,
                   help=f"phases to run, comma-separated (default: {','.join(PHASES)})")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="the whole run's budget in seconds; phases get shorter limits to fit (default: 450; dry run "
                        "115)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, inputs and audio (default: 0)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write everything measured (every timed call, every level) as JSON")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)       # internal: run one phase in this process
    p.add_argument("--phase-spec", help=argparse.SUPPRESS)
    return p


def _command_line(argv: Sequence[str] | None) -> str:
    return shlex.join(["python", "-m", MODULE, *(sys.argv[1:] if argv is None else argv)])


def _limits(profile: Profile, phases: Sequence[str], deadline: float, name: str) -> float:
    """Seconds phase ``name`` may take: its own limit, less what the phases after it need, within the budget."""
    later = list(phases)[list(phases).index(name) + 1:]
    left = deadline - time.time() - sum(profile.reserve[p] for p in later)
    return min(profile.limits[name], left)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; write the report. Returns 0 (all phases finished), 1 (some did not) or 2 (usage, no CUDA)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.phase:
        if not args.phase_spec:
            parser.error("--phase needs --phase-spec")
        return _phase_main(args.phase, args.phase_spec)
    if args.seconds is not None and not 1.0 <= args.seconds <= 120:
        parser.error(f"--seconds must be between 1 and 120, got {args.seconds:g}")
    if args.time_limit is not None and args.time_limit < 30:
        parser.error(f"--time-limit must be at least 30 s, got {args.time_limit:g}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: error: CUDA is not available (torch {torch.__version__} sees no GPU); run on a CUDA "
              "machine, or with --dry-run to check the code path on the CPU", file=sys.stderr)
        return 2
    profile = DRY_RUN if args.dry_run else GPU
    profile = replace(profile, batches=tuple(args.batches or profile.batches),
                      sessions=tuple(args.sessions or profile.sessions),
                      seconds=args.seconds or profile.seconds, budget_s=args.time_limit or profile.budget_s)
    command = _command_line(argv)
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.monotonic()
    deadline = time.time() + profile.budget_s
    out = Path(args.out)
    machine = machine_info(profile)
    runs: dict[str, PhaseRun] = {name: PhaseRun(name, status="skipped", error="not asked for (--phases)")
                                 for name in PHASES if name not in args.phases}

    def write(finished: bool) -> str:
        text = report(profile, runs, machine, command, started, time.monotonic() - t0, finished)
        with contextlib.suppress(OSError):
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        return text

    def on_term(signum, _frame):
        raise _Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() \
        else None
    env = _phase_env()
    spec = asdict(profile) | {"seed": args.seed}
    interrupted = False
    try:
        with tempfile.TemporaryDirectory(prefix="edtalk-gpu-check-") as tmp:
            for name in args.phases:
                limit = _limits(profile, args.phases, deadline, name)
                if limit < 5:
                    runs[name] = PhaseRun(name, status="skipped",
                                          error=f"the run's time limit ({profile.budget_s:.0f} s) was used up")
                    continue
                runs[name] = PhaseRun(name, status="running", limit_s=limit)
                write(False)
                runs[name] = run_phase(name, spec, limit, Path(tmp), env)
                write(False)
                if runs[name].interrupted:
                    raise _Interrupted(f"during phase {name}")
    except (_Interrupted, KeyboardInterrupt) as e:
        interrupted = True
        logger.error("interrupted (%s): writing the report so far", e or "Ctrl-C")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for r in runs.values():
        if r.status == "running":
            r.status, r.error = "failed", "interrupted"
    text = write(not interrupted)
    print(text)
    if args.json:
        data = {"command": command, "started": started, "profile": asdict(profile), "machine": machine,
                "phases": {name: asdict(run) for name, run in runs.items()}}
        with contextlib.suppress(OSError):
            Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    logger.info("report written to %s (%.0f s)", out, time.monotonic() - t0)
    failed = [n for n in args.phases if runs[n].status != "ok"]
    return 1 if interrupted or failed else 0


if __name__ == "__main__":
    sys.exit(main())
