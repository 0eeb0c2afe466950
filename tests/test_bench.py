"""``edtalk-live bench`` (``benchmarks/fps.py``): smoke tests at a tiny config, the honesty of its reference path,
the command as a user runs it (console script, every option), the user's own weights, the offline render row,
``--json``, ``--plot`` and ``--compare``."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edtalk_live
from edtalk_live.benchmarks import fps

FAST = ["--configs", "tiny", "--iters", "1", "--min-time", "0", "--max-time", "1", "--warmup", "1", "--no-render",
        "--no-live"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_default_weights(tmp_path_factory, monkeypatch):
    """An empty weights folder: the benchmark must not pick up weights of the user running the tests."""
    monkeypatch.setenv("EDTALK_LIVE_WEIGHTS", str(tmp_path_factory.mktemp("no_weights")))


def _rows(out: str) -> dict[tuple[str, str, int], list[str]]:
    """Table rows of the printed Markdown, keyed by (backend, config, batch)."""
    rows = {}
    for line in out.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cols) >= 3 and cols[2].isdigit():
            rows[(cols[0], cols[1], int(cols[2]))] = cols
    return rows


def test_table_rows_and_reference_check(capsys, tmp_path):
    out_json = tmp_path / "fps.json"
    assert fps.main([*FAST, "--batches", "1,2", "--backends", "torch", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Machine: .*logical cores.*GPU: ", out, re.M)
    assert re.search(r"^Versions: edtalk-live .*, torch ", out, re.M)
    assert "Models:\n- `tiny`: seeded random weights (seed 0); family edtalk, 32², widths (16, 16, 8, 8)" in out
    assert "Whole pipeline" not in out                                  # --no-render
    assert "Command: `python -m edtalk_live.benchmarks.fps --configs tiny" in out

    rows = _rows(out)
    ref = "reference (published per-frame path)"
    assert set(rows) == {(ref, "tiny", 1), ("torch", "tiny", 1), ("torch", "tiny", 2)}
    for key, cols in rows.items():
        ms_batch, ms_frame, fps_med = (float(c.replace(",", "")) for c in cols[3:6])
        assert ms_batch > 0 and fps_med > 0, key
        assert ms_frame == pytest.approx(ms_batch / key[2], rel=0.02, abs=0.01), key
    assert rows[("torch", "tiny", 1)][8] == "1.00×"          # the baseline against itself
    assert rows[(ref, "tiny", 1)][9] == "1.00×"
    assert rows[("torch", "tiny", 2)][9].endswith("×")

    m = re.search(r"Reference check \(tiny\): max \|reference − ours\| = (\S+) .*: passed", out)
    assert m, out
    assert float(m.group(1)) < fps.REFERENCE_TOL

    data = json.loads(out_json.read_text())
    assert data["reference_check"]["tiny"] < fps.REFERENCE_TOL
    cells = {(c["backend"], c["batch"]): c for c in data["cells"]}
    assert set(cells) == {("reference", 1), ("torch", 1), ("torch", 2)}
    assert all(c["times"] and not c["error"] for c in cells.values())


def test_reference_check_catches_a_different_path(monkeypatch):
    """If the reference path computed something else (here: no expression blocks), the benchmark refuses to run."""
    monkeypatch.setattr(fps, "_ref_eem", lambda eem, x, z: x)
    with pytest.raises(AssertionError, match="differ"):
        fps.main([*FAST, "--batches", "1", "--backends", "torch", "--no-reference"])


@pytest.mark.parametrize("family", ["edtalk", "lip_pose"])
def test_reference_decoder_is_the_same_function_at_batch_3(family):
    """The grouped per-sample convolution (groups=B) and our batch-friendly decoder agree for B > 1."""
    cfg = fps.CONFIGS["tiny"].model_config(family)
    model = fps.build_model(cfg, seed=3)
    gen = model.generator
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(3, cfg.style_dim, generator=g)
    src = model.encode(torch.rand(1, 3, cfg.size, cfg.size, generator=g) * 2 - 1)
    feats = [f.expand(3, -1, -1, -1).contiguous() for f in src.feats]
    with torch.no_grad():
        if cfg.has_expression:
            z = gen.exp_latent(torch.randn(3, cfg.exp_dim, generator=g))
            ours = gen.dec(latent, gen.dec.modulate(feats, z))
            ref = fps.reference_decoder_forward(gen.dec, latent, feats, z)
        else:
            ours = gen.dec(latent, feats)
            ref = fps.reference_decoder_forward(gen.dec, latent, feats)
    assert (ours - ref).abs().max().item() < fps.REFERENCE_TOL


def test_unknown_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        fps.main([*FAST, "--backends", "no-such-backend"])
    assert e.value.code == 2
    assert "no-such-backend" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the command as users run it


def _console_script() -> str:
    """The installed ``edtalk-live`` next to this interpreter (the one a user of this environment runs)."""
    exe = shutil.which("edtalk-live", path=str(Path(sys.executable).parent)) or shutil.which("edtalk-live")
    if exe is None:
        pytest.skip("the edtalk-live console script is not installed (pip install -e .)")
    return exe


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)


def _options(parser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]


def test_bench_help_lists_every_option_as_the_module_does():
    done = _run([_console_script(), "bench", "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: edtalk-live bench ")
    for option in _options(fps.build_parser()):
        assert option in done.stdout, option
    module = _run([sys.executable, "-m", "edtalk_live.benchmarks.fps", "--help"])
    assert module.returncode == 0, module.stderr

    def body(text: str) -> str:            # everything after the usage lines (whose wrapping depends on the name)
        return text[text.index("\n\n"):]
    assert body(done.stdout) == body(module.stdout)


def test_bench_runs_through_the_console_script_with_every_option(tmp_path):
    """A real short run of ``edtalk-live bench``: every option reaches the benchmark unchanged; JSON and PNG."""
    out_json, out_png = tmp_path / "run.json", tmp_path / "run.png"
    argv = ["--configs", "tiny", "--family", "lip_pose", "--backends", "torch", "--batches", "1,2,8",
            "--max-batch", "2", "--device", "cpu", "--no-weights", "--no-reference", "--render-seconds", "0.4",
            "--iters", "2", "--min-time", "0", "--max-time", "1", "--warmup", "0", "--threads", "1", "--seed", "3",
            "--live-sessions", "1", "--json", str(out_json), "--plot", str(out_png)]
    expected = vars(fps.build_parser().parse_args(argv))
    assert set(expected) == {a.dest for a in fps.build_parser()._actions if a.dest != "help"}
    untouched = {k for k, v in expected.items() if v == fps.build_parser().get_default(k)}
    # every other option is given a non-default value
    assert untouched == {"weights", "compare", "no_render", "no_live"}

    done = _run([_console_script(), "bench", *argv], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out_json.read_text())
    assert data["options"] == json.loads(json.dumps(expected))
    assert data["command"] == shlex.join(["edtalk-live", "bench", *argv])
    assert f"Command: `{data['command']}`" in done.stdout
    # the console script ran the code under test, and the JSON says what ran where
    assert data["versions"]["edtalk_live_path"] == str(Path(list(edtalk_live.__path__)[0]).resolve())
    assert {"edtalk-live", "python", "torch", "numpy"} <= set(data["versions"])
    assert data["versions"]["torch"] == torch.__version__
    assert {"cpu", "memory", "torch_threads"} <= set(data["machine"])
    assert data["machine"]["torch_threads"] == "1"                  # --threads 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", data["date"])

    model = data["models"]["tiny"]
    assert (model["family"], model["size"], model["source"]) == ("lip_pose", 32, "seeded random weights (seed 3)")
    assert set(data["models"]) == {"tiny"}                          # --no-weights
    cells = {(c["backend"], c["batch"]) for c in data["cells"]}
    assert cells == {("torch", 1), ("torch", 2)}                    # no reference, batch 8 over --max-batch
    assert all(len(c["times"]) >= 2 and c["fps"] > 0 for c in data["cells"])
    row, live = data["pipeline"]
    assert (row["what"], row["backend"], row["unit"]) == ("offline render, tiny 32²", "torch", "audio s / s")
    assert row["batch"] in (1, 2) and row["value"] > 0 and not row["error"]
    assert "10 frames" in row["note"]                               # 0.4 s at 25 fps
    # the live path: `serve` with the same backend, one WebRTC session (--live-sessions 1) in its own process
    assert (live["what"], live["backend"], live["unit"]) == ("live sessions, tiny 32²", "torch",
                                                             "sessions at 25 fps (≤ 1 % late)")
    assert live["value"] in (0.0, 1.0) and not live["error"] and live["note"]
    assert "| live sessions, tiny 32² | torch |" in done.stdout

    png = out_png.read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000
    from PIL import Image

    with Image.open(out_png) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_other_commands_still_reject_unknown_arguments(capsys):
    from edtalk_live.clients.cli import main

    assert main(["weights", "list", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_usage_error_before_measuring(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if it were not installed
    with pytest.raises(SystemExit) as e:
        fps.main([*FAST, "--plot", str(tmp_path / "x.png")])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "pip install 'edtalk-live[plot]'" in captured.err
    assert "Per-frame" not in captured.out and not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------ the user's own weights


def test_weights_folder_is_measured_and_reported(tmp_path, capsys, edtalk_weights, fixtures_dir):
    from edtalk_live.edtalk.checkpoint import weights_hash

    fixture = torch.load(fixtures_dir / "edtalk_s64.pt", weights_only=True)
    expected_hash = (f"{weights_hash(fixture['checkpoint']['gen'])}-"
                     f"{weights_hash(fixture['audio2lip_checkpoint']['audio2lip'])}")
    out_json = tmp_path / "w.json"
    assert fps.main(["--weights", str(edtalk_weights), "--configs", "weights", "--batches", "1", "--backends",
                     "torch", "--no-reference", "--iters", "1", "--min-time", "0", "--max-time", "1",
                     "--render-seconds", "0.4", "--no-live", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert (f"- `weights`: {edtalk_weights / 'EDTalk.pt'} + Audio2Lip.pt; family edtalk, 64², "
            f"widths (64, 64, 64, 32, 16), style 512, weights hash {expected_hash}") in out
    data = json.loads(out_json.read_text())
    assert data["models"]["weights"]["weights_hash"] == expected_hash
    assert data["models"]["weights"]["widths"] == [64, 64, 64, 32, 16]
    assert {(c["backend"], c["config"], c["batch"]) for c in data["cells"]} == {("torch", "weights", 1)}
    [row] = data["pipeline"]
    assert (row["what"], row["backend"], row["batch"]) == ("offline render, weights 64²", "torch", 1)
    assert row["value"] > 0
    assert "| offline render, weights 64² | torch | 1 |" in out


@pytest.mark.parametrize("no_weights", [False, True])
def test_weights_folder_is_the_default_when_it_holds_weights(monkeypatch, capsys, tmp_path, edtalk_weights,
                                                             no_weights):
    monkeypatch.setenv("EDTALK_LIVE_WEIGHTS", str(edtalk_weights))
    out_json = tmp_path / "d.json"
    argv = [*FAST, "--batches", "1", "--backends", "torch", "--no-reference", "--json", str(out_json)]
    assert fps.main(argv + (["--no-weights"] if no_weights else [])) == 0
    models = json.loads(out_json.read_text())["models"]
    assert set(models) == ({"tiny"} if no_weights else {"tiny", "weights"})


def test_bad_weights_folder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fps.main([*FAST, "--weights", str(tmp_path / "nothing")])
    assert e.value.code == 2
    assert "weights folder not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ --compare


def _cell(backend, config, batch, fps_value=None, error=""):
    cell = {"backend": backend, "config": config, "batch": batch, "device": "cpu", "times": [], "error": error}
    if fps_value is not None:
        cell["fps"] = fps_value
    return cell


def _run_json(cells, pipeline, weights_hash="aaaa", cpu="CPU A"):
    return {"date": "2026-11-30T00:00:00+00:00", "command": "edtalk-live bench",
            "machine": {"cpu": cpu, "memory": "8 GiB", "torch_threads": "2"},
            "versions": {"edtalk-live": "0.1.0", "python": "3.11", "torch": "2.13", "numpy": "2"},
            "models": {"weights": {"weights_hash": weights_hash}}, "cells": cells, "pipeline": pipeline}


def _render_row(value, backend, batch, what="offline render, official 256²"):
    return {"what": what, "backend": backend, "batch": batch, "value": value, "unit": "audio s / s", "note": "",
            "error": ""}


def test_compare_prints_the_ratios_of_matched_cells_and_lists_the_rest(tmp_path, capsys):
    a = _run_json([_cell("torch", "official", 1, 2.0), _cell("onnxruntime", "test", 4, 800.0),
                   _cell("torch", "official", 16, 3.2), _cell("torch", "test", 1, 250.0)],
                  [_render_row(0.4, "onnxruntime", 1)])
    b = _run_json([_cell("torch", "official", 1, 3.0), _cell("onnxruntime", "test", 4, 200.0),
                   _cell("tensorrt", "official", 32, 5000.0), _cell("torch", "test", 1, error="out of memory")],
                  [_render_row(1.0, "tensorrt", 16), _render_row(120.0, "tensorrt", 32, what="live sessions")],
                  weights_hash="bbbb", cpu="CPU B")
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert fps.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^A: `.*a\.json`; CPU A, 8 GiB RAM", out, re.M)
    assert re.search(r"^B: `.*b\.json`; CPU B, 8 GiB RAM", out, re.M)
    rows = _rows(out)
    assert set(rows) == {("torch", "official", 1), ("onnxruntime", "test", 4)}
    assert rows[("torch", "official", 1)][3:] == ["2.00", "3.00", "1.50×"]
    assert rows[("onnxruntime", "test", 4)][3:] == ["800", "200", "0.25×"]
    assert ("| offline render, official 256² | 0.400 (onnxruntime, batch 1) | 1.00 (tensorrt, batch 16) | "
            "audio s / s | 2.50× |") in out
    assert "- only in A: torch official batch 16\n" in out
    assert "- only in B: tensorrt official batch 32; live sessions\n" in out
    assert "- failed in A or B: torch test batch 1" in out
    assert "`weights` is not the same model in both runs: weights hash aaaa in A, bbbb in B" in out


def test_compare_refuses_a_file_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps({"cells": []}))
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        fps.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert e.value.code == 2
    assert "b.json is not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_into_a_missing_folder_is_a_usage_error_before_measuring(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fps.main([*FAST, option, str(tmp_path / "missing" / "out")])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert f"{option} " in captured.err and "does not exist" in captured.err
    assert "Per-frame" not in captured.out
