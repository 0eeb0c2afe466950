"""The atheris harness of tests/fuzz_parsers.py, run for a while from real seeds (issue 15: fuzzing).

Seeds: a real offer as aiortc makes it, control messages and offer options of every kind, a small PNG and
a JPEG. libFuzzer mutates them, guided by coverage; any exception other than ``InputError`` or an input
that takes over 2 s fails the run (and leaves the input as ``crash-*``/``timeout-*`` in the work folder).
The number of runs grows with ``EDTALK_FUZZ_RUNS`` (CI: the default; a longer campaign by hand).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from edtalk_live.benchmarks import fuzz

HARNESS = Path(__file__).with_name("fuzz_parsers.py")
RUNS = int(os.environ.get("EDTALK_FUZZ_RUNS", "40000"))


def _seeds(folder: Path) -> None:
    sdp = asyncio.run(fuzz.offer_sdp())
    controls = [{"type": "emotion", "name": "happy", "intensity": 1.5}, {"type": "intensity", "value": 0.5},
                {"type": "pose", "mode": "still"}, {"type": "pause"}, {"type": "resume"}, {"type": "interrupt"},
                {"type": "stats"}, {"type": "bye"}]
    options = {"avatar": "anna", "emotion": "sad", "intensity": 1.0, "pose": "idle", "low_latency": True,
               "probe": False, "paste_back": False, "rtmp": "live"}
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 40)).save(png, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6                                        # rotated: the reader turns it upright
    Image.new("RGB", (16, 8), (20, 130, 40)).save(jpeg, "JPEG", exif=exif)
    seeds = [b"\x00" + json.dumps({"type": "offer", "sdp": sdp}).encode(), b"\x01" + sdp.encode(),
             *(b"\x02" + json.dumps(c).encode() for c in controls), b"\x03" + json.dumps(options).encode(),
             b"\x04" + png.getvalue(), b"\x04" + jpeg.getvalue(),
             b"\x05a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
             b"a=mid:0\r\na=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0\r\n"
             b"a=candidate:2 1 udp 1686052607 198.51.100.7 3478 typ srflx raddr 10.0.0.1 rport 9\r\n"
             b"a=end-of-candidates\r\n"]
    for i, seed in enumerate(seeds):
        (folder / f"seed-{i:02d}").write_bytes(seed)


def test_parsers_survive_coverage_guided_fuzzing(tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed (pip install 'edtalk-live[dev]' on Linux)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _seeds(corpus)
    run = subprocess.run([sys.executable, str(HARNESS), f"-runs={RUNS}", "-max_len=8192", "-seed=15",
                          "-rss_limit_mb=4096", str(corpus)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    log = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    assert f"Done {RUNS} runs" in run.stderr, log
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*")), log
