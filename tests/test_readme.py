"""The README's Python example runs as written (with the fixture weights as the weights folder)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_api_example_runs(tmp_path, edtalk_weights, clips):
    block = next(b for b in _python_blocks() if "edtalk_live.load_model" in b)
    shutil.copy(clips["wav_2s"], tmp_path / "speech.wav")
    env = {**os.environ, "EDTALK_LIVE_WEIGHTS": str(edtalk_weights)}
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.Size([50, 3, 64, 64]) True" in done.stdout, done.stdout
