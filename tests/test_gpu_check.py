"""``benchmarks/gpu_check.py``: the dry run (the GPU check's code path on the CPU), and its robustness."""

from __future__ import annotations

import re
import time

import pytest

from edtalk_live.benchmarks import gpu_check

NUMBER = r"[\d,]+(?:\.\d+)?"


def _section(text: str, title: str) -> str:
    """The body of the ``## title`` section (up to the next ``## ``)."""
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no section {title!r} in:\n{text}"
    return m.group(1)


def _table_rows(section: str) -> list[list[str]]:
    rows = []
    for line in section.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cols and cols[0] not in ("backend", "sessions", "target", "phase"):
            rows.append(cols)
    return rows


def test_dry_run_reports_every_section_with_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDTALK_LIVE_CACHE", str(tmp_path / "cache"))     # a fresh ONNX export, like CI
    out = tmp_path / "report" / "gpu_check.md"
    t0 = time.monotonic()
    code = gpu_check.main(["--dry-run", "--out", str(out)])
    took = time.monotonic() - t0
    printed = capsys.readouterr().out
    text = out.read_text()
    assert code == 0, text
    assert text.strip() == printed.strip()
    assert took < 120, f"the dry run took {took:.0f} s (budget: 2 minutes)"

    machine = _section(text, "1. Machine")
    assert re.search(r"- torch \S+; Python 3\.\d+", machine)
    assert re.search(r"- CPU: .*\d+ logical cores", machine)
    assert "command: `python -m edtalk_live.benchmarks.gpu_check --dry-run --out" in machine
    assert "TensorRT" in machine and "not measured" in machine
    for phase in gpu_check.PHASES:
        assert re.search(rf"^\| {phase} \(.*\) \| ok \| \d+ \| \d+ \|$", machine, re.M), machine

    psnr = _section(text, "2. fp16 vs fp32 frames")
    m = re.search(rf"\*\*({NUMBER}) dB\*\* \(target ≥ 40 dB: \*\*(PASS|FAIL)\*\*\)", psnr)
    assert m, psnr
    assert float(m.group(1)) > 20                      # fp16 vs fp32 on the CPU, 64²: tens of dB, not noise

    fps = _section(text, "3. Frames per second")
    rows = _table_rows(fps)
    backends = {r[0] for r in rows}
    assert {"torch-cpu-fp16", "torch"} <= backends, rows
    for backend in backends:
        batches = [int(r[1]) for r in rows if r[0] == backend]
        assert batches == [1, 2, 4, 8, 16, 32, 64], (backend, batches)
    for r in rows:
        if r[1] != "1" and r[2].startswith("skipped: out of time"):     # a heavily loaded machine: allowed
            continue
        assert all(re.fullmatch(NUMBER, c) for c in r[2:7]), r          # ms / batch ... frames/s p90
        assert float(r[4].replace(",", "")) > 0
    assert re.search(rf"Best at batch ≥ 32: \*\*{NUMBER} frames/s\*\* .*target ≥ 5,000: \*\*(PASS|FAIL)\*\*", fps)

    one = _section(text, "4. One frame at batch 1")
    assert re.search(rf"\*\*{NUMBER} ms\*\* median, {NUMBER} ms p95 over \d+ calls \(target ≤ 3 ms: \*\*(PASS|FAIL)",
                     one), one

    live = _section(text, "5. Live server")
    rows = _table_rows(live)
    assert [r[0] for r in rows] == ["1", "2"], live
    for r in rows:
        assert all(re.fullmatch(NUMBER, c) for c in r[1:5]), r           # latency p50, p95, render budget, added
        assert re.fullmatch(rf"{NUMBER} / {NUMBER}", r[5]), r           # fps received
        assert re.fullmatch(rf"{NUMBER} %", r[6]), r                    # frames late
        assert re.fullmatch(r"\d+ / \d+ / \d+", r[7]), r
        assert re.fullmatch(NUMBER, r[8]) and re.fullmatch(NUMBER, r[9]), r      # server CPU
        assert r[10] in ("yes", "no"), r
    assert "extrapolated capacity: about" in live

    targets = _section(text, "Targets")
    assert len(_table_rows(targets)) == 4
    assert not re.search(r"\| not measured \|", targets), targets


def test_a_hanging_phase_is_stopped_recorded_and_the_next_one_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(gpu_check.FAULT_ENV, "psnr=hang")
    out = tmp_path / "report.md"
    t0 = time.monotonic()
    code = gpu_check.main(["--dry-run", "--phases", "psnr,fps", "--batches", "1,2", "--time-limit", "32",
                           "--out", str(out)])
    took = time.monotonic() - t0
    text = out.read_text()
    assert code == 1, text
    assert took < 60, took
    assert re.search(r"^\| psnr \(.*\) \| timed out: timed out after \d+ s", text, re.M), text
    assert "**Phase timed out**" in _section(text, "2. fp16 vs fp32 frames")
    assert re.search(r"^\| fps \(.*\) \| ok \|", text, re.M), text
    assert [r[1] for r in _table_rows(_section(text, "3. Frames per second")) if r[0] == "torch"] == ["1", "2"]
    assert "not asked for" in text                    # the live phase
    # the phase's own child process went with it (the whole process group is stopped)
    m = re.search(r"hanging, with a child process \(pid (\d+)\)", capsys.readouterr().err)
    assert m
    assert not _alive(int(m.group(1)))


def test_a_failing_phase_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_check.FAULT_ENV, "psnr=raise")
    out = tmp_path / "report.md"
    code = gpu_check.main(["--dry-run", "--phases", "psnr,fps", "--batches", "1", "--out", str(out)])
    text = out.read_text()
    assert code == 1
    assert re.search(r"^\| psnr \(.*\) \| failed: RuntimeError: fault injected into phase psnr", text, re.M), text
    assert re.search(r"^\| fps \(.*\) \| ok \|", text, re.M), text


def test_without_cuda_and_without_dry_run_it_stops_with_one_line(monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available" in err and "--dry-run" in err
    assert not (tmp_path / "r.md").exists()


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--dry-run", "--sessions", "--batches", "--seconds", "--phases", "--time-limit"):
        assert option in text
    assert "--phase-spec" not in text


def test_psnr():
    import numpy as np

    a = np.zeros((2, 3, 4, 4))
    assert gpu_check.psnr(a, a, 2.0) == float("inf")
    assert gpu_check.psnr(a + 0.02, a, 2.0) == pytest.approx(20 * np.log10(2 / 0.02))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _gpu_runs() -> dict[str, gpu_check.PhaseRun]:
    """What the phases of a GPU run record (shapes as written by the phases; made-up numbers)."""
    from edtalk_live.benchmarks.fps import Cell

    dev = {"torch": "2.5.1", "torch_cuda": "12.4", "cudnn": 90100, "gpu": "NVIDIA H200", "capability": "9.0",
           "gpu_memory_gib": 139.8, "multiprocessors": 132}
    psnr = {"device": dev, "frames": 16, "size": 256, "config": "official", "fp16": "torch (cuda, float16, "
            "channels-last, CUDA graphs)", "fp32": "torch (cuda, float32), TF32 off", "psnr_db": 43.2,
            "psnr_min_frame_db": 41.0, "psnr_uint8_db": 44.0, "max_abs_diff": 0.05, "uint8_max_diff": 6,
            "raw_range": [-1.2, 1.3], "psnr_tf32_db": 47.5, "complete": True}
    cells = []
    for backend, per_frame_ms in (("torch-cuda-fp16", 0.15), ("torch-cuda-fp32", 0.9)):
        for b in (1, 2, 4, 8, 16, 32, 64):
            t = (1.2 if b == 1 else 0) + per_frame_ms * b * (0.95 if b == 64 else 1)
            cells.append(Cell(backend, "official", b, "cuda", [t / 1e3 * f for f in (0.98, 1.0, 1.1)])
                         .to_dict())
    cells.append(Cell("torch-cuda-fp32", "official", 128, "cuda", error="skipped: out of time (1 s left)").to_dict())
    fps = {"device": dev, "config": "official", "size": 256, "cells": cells, "complete": True, "backends": {
        "torch-cuda-fp16": {"label": "torch (cuda, float16, channels-last, CUDA graphs)", "skipped": "", "error": "",
                            "prepare_s": 2.0, "max_abs_diff_to_fp32": 0.04},
        "torch-cuda-fp32": {"label": "torch (cuda, float32)", "skipped": "", "error": "", "prepare_s": 1.0,
                            "max_abs_diff_to_fp32": 0.0},
        "onnxruntime": {"label": "", "skipped": "onnxruntime 1.20 has no CUDAExecutionProvider", "error": "",
                        "prepare_s": None, "max_abs_diff_to_fp32": None}}}

    def row(n: int, late: float, fps_min: float, cores: float, per: float) -> dict:
        return {"sessions": n, "sessions_ok": n, "errors": [], "video_latency_ms_p50": 380.0,
                "video_latency_ms_p95": 395.0, "added_ms_p95": 260.0, "fps_mean": 25.0, "fps_min": fps_min,
                "late_fraction": late, "frames_dropped": int(late * 200 * n), "frames_repeated": 0,
                "frames_skipped": 0, "kept_up": late <= 0.01, "server_cores": cores, "cpu_ms_per_session_s": per}

    live = {"config": "official", "device": "cuda", "seconds": 8.0, "client_processes": 8, "complete": False,
            "server": {"backend": "torch (cuda, float16, channels-last, CUDA graphs)", "model": "edtalk, 256²",
                       "render_budget_ms": 100.0, "max_batch": 64, "pid": 1},
            "warmup": {"sessions": 32, "seconds": 2.0, "error": ""}, "idle_cores": 0.02,
            "rows": [row(1, 0.0, 25.0, 0.12, 120.0), row(8, 0.004, 24.9, 0.7, 90.0), row(32, 0.3, 19.0, 1.0, 31.0)]}
    return {"psnr": gpu_check.PhaseRun("psnr", "ok", 20, 90, data=psnr),
            "fps": gpu_check.PhaseRun("fps", "ok", 100, 210, data=fps),
            "live": gpu_check.PhaseRun("live", "timed out", 200, 200, "timed out after 200 s", data=live)}


def test_report_of_a_gpu_run():
    """The GPU-only parts of the report (no GPU here: from what the phases record)."""
    machine = {"cpu": "AMD EPYC, 16 logical cores", "memory": "128 GiB", "python": "3.11.9", "torch": "2.5.1",
               "torch_cuda": "12.4", "cudnn": 90100, "cpu_count": 16, "load": "0.1 0.1 0.1", "gpu": "NVIDIA H200",
               "driver": "550.54.15", "gpu_memory": "143771 MiB", "gpus": 1, "onnxruntime": "not installed",
               "tensorrt": "not installed", "live_stack": "aiortc 1.16.0, PyAV 18.1.0, aiohttp 3.14.0"}
    text = gpu_check.report(gpu_check.GPU, _gpu_runs(), machine, "python -m edtalk_live.benchmarks.gpu_check",
                            "2026-12-01 10:00 UTC", 330.0, True)
    assert "- GPU: NVIDIA H200 (compute capability 9.0, 139.8 GiB)" in text
    assert "driver: 550.54.15; CUDA (torch build): 12.4" in text
    assert "**43.2 dB** (target ≥ 40 dB: **PASS**)" in text
    assert "strict fp32: 47.5 dB" in text
    fps = _section(text, "3. Frames per second")
    assert "| torch-cuda-fp16 | 64 | 9.12 | 0.142 | 7,018 |" in fps
    assert "| torch-cuda-fp32 | 128 | skipped: out of time (1 s left) |" in fps
    assert "`onnxruntime`: skipped: onnxruntime 1.20 has no CUDAExecutionProvider" in fps
    assert re.search(r"Best at batch ≥ 32: \*\*7,018 frames/s\*\* \(torch-cuda-fp16, batch 64; target ≥ 5,000: "
                     r"\*\*PASS\*\*\)", fps)
    one = _section(text, "4. One frame at batch 1")
    assert "`torch-cuda-fp16`: **1.35 ms** median" in one and "**PASS**" in one
    live = _section(text, "5. Live server")
    assert "**Phase timed out**: timed out after 200 s." in live
    assert [r[0] for r in _table_rows(live)] == ["1", "8", "32"]
    assert [r[-1] for r in _table_rows(live)] == ["yes", "yes", "no"]
    assert "at 32 sessions the server process used 1.00 cores" in live
    assert "90 ms of server CPU per session-second (at 8 sessions)" in live       # the largest level that held
    assert "about 178 sessions on 16 cores" in live
    assert "about 281 sessions" in live                                          # 7,018 frames/s / 25
    targets = _table_rows(_section(text, "Targets"))
    assert [r[-1] for r in targets] == ["**PASS**", "**PASS**", "**PASS**", "**PASS** (extrapolated)"]
    assert "tested up to 32 sessions, held at 1, 8" in targets[3][1]
