"""Smoke test of ``benchmarks/fps.py`` at a tiny config, and the honesty of its reference path."""

from __future__ import annotations

import json
import re

import pytest
import torch

from edtalk_live.benchmarks import fps

FAST = ["--configs", "tiny", "--iters", "1", "--min-time", "0", "--max-time", "1", "--warmup", "1"]


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
    assert re.search(r"^Machine: .*torch ", out, re.M)
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
