"""The whole pipeline on this machine: one row per measurement, each with the backend and batch that gave it.

    rows = [render_throughput(weights_dir, "offline render, official 256²", best_cell, seconds=4.0)]
    print(format_pipeline(rows))

The per-frame table of :mod:`benchmarks.fps` times the decoder alone. The rows here time what a user
runs end to end:

- **offline render** (:func:`render_throughput`): ``edtalk-live render``'s own code
  (:func:`edtalk_live.avatar.render.render_file`) on a clip of speech-like audio: the weights folder
  loaded, the built-in portrait aligned and encoded, the lip sync, every frame rendered and the mp4
  (H.264 + AAC) written. The value is seconds of audio rendered per second of wall-clock time, from
  loading the weights to the finished file (after one short untimed render), with the backend and
  batch size of the fastest per-frame cell of that model (:func:`best_render_cell`).

Other measurements of the whole pipeline (the live server) add rows of the same shape.
"""

from __future__ import annotations

import logging
import tempfile
import wave
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edtalk_live.edtalk.errors import EDTalkError
from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE

__all__ = ["RENDER_BACKENDS", "PipelineRow", "best_render_cell", "format_pipeline", "render_throughput"]

logger = logging.getLogger(__name__)

#: per-frame variant of :mod:`benchmarks.fps` -> the ``--backend`` of ``edtalk-live render`` that runs it
#: (``torch-cuda-fp32`` is the eager baseline only: render's torch backend on CUDA is ``torch-cuda-fp16``)
RENDER_BACKENDS = {"torch": "torch", "torch-cuda-fp16": "torch", "onnxruntime": "onnxruntime",
                   "tensorrt": "tensorrt"}
RENDER_UNIT = "audio s / s"
#: frames of the untimed warm-up render (at least one batch)
WARMUP_FRAMES = 5


@dataclass
class PipelineRow:
    """One measurement of the whole pipeline.

    Attributes:
        what: what was measured, stable across runs and machines (the key of ``--compare``), e.g.
            ``"offline render, official 256²"``.
        backend: the per-frame variant that gave the value (a name of ``--backends``).
        batch: frames per renderer call.
        value: the measured value (None when the measurement failed).
        unit: e.g. ``"audio s / s"``.
        note: how it was measured, in a few words (clip length, wall time).
        error: one line when the measurement failed.
    """

    what: str
    backend: str
    batch: int
    value: float | None
    unit: str
    note: str = ""
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def best_render_cell(cells: Iterable, config: str):
    """The fastest successful per-frame cell of ``config`` (a :class:`benchmarks.fps.Cell`) that ``render`` can run.

    None when no measured backend is one ``edtalk-live render`` offers (see :data:`RENDER_BACKENDS`).
    """
    usable = [c for c in cells if c.ok and c.config == config and c.backend in RENDER_BACKENDS]
    return max(usable, key=lambda c: c.fps, default=None)


def _write_wav(path: Path, samples: np.ndarray) -> None:
    """Float samples in [-1,1], mono 16 kHz -> 16-bit PCM wav."""
    pcm = np.clip(np.round(np.asarray(samples, np.float64) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def render_throughput(weights_dir: str | Path, what: str, cell, seconds: float, seed: int = 0) -> PipelineRow:
    """Render ``seconds`` of speech-like audio with the built-in portrait, as ``edtalk-live render`` does.

    ``cell`` (a :class:`benchmarks.fps.Cell`, see :func:`best_render_cell`) gives the backend, the
    device and the batch size. A short render of one batch (at least 5 frames) runs first, untimed,
    so that what a process pays once (face detector, codecs, first calls) does not count. The value
    is audio seconds rendered per wall-clock second of the timed render, from loading the weights to
    the finished mp4. A failure (e.g. no ``Audio2Lip.pt`` in the folder) gives a row with ``error``
    set instead of raising.
    """
    from edtalk_live.avatar.render import render_file
    from edtalk_live.benchmarks.latency import speech_like

    row = PipelineRow(what, cell.backend, cell.batch, None, RENDER_UNIT)
    backend = RENDER_BACKENDS[cell.backend]
    with tempfile.TemporaryDirectory(prefix="edtalk-bench-render-") as tmp:
        warm, audio, out = Path(tmp) / "warm.wav", Path(tmp) / "speech.wav", Path(tmp) / "out.mp4"
        _write_wav(warm, speech_like(max(cell.batch, WARMUP_FRAMES) / FPS, seed + 1))
        _write_wav(audio, speech_like(seconds, seed))
        logger.info("%s: rendering %.1f s of audio with %s, batch %d", what, seconds, cell.backend, cell.batch)
        try:
            for clip in (warm, audio):
                summary = render_file(weights_dir, None, clip, out, batch_size=cell.batch, device=cell.device,
                                      progress=False, backend=backend)
        except (EDTalkError, RuntimeError, MemoryError) as e:
            row.error = " ".join(str(e).split())[:160]
            logger.error("%s failed: %s", what, row.error)
            return row
    row.value = summary.seconds / summary.elapsed
    row.note = (f"{summary.seconds:.2f} s of audio ({summary.frames} frames) in {summary.elapsed:.2f} s, "
                f"weights loaded to mp4 written")
    logger.info("%s: %.3f %s (%s)", what, row.value, RENDER_UNIT, row.note)
    return row


def format_pipeline(rows: Sequence[PipelineRow]) -> str:
    """A Markdown table of the rows."""
    from edtalk_live.benchmarks.fps import format_number

    lines = ["| what | backend | batch | value | unit | how |", "|---|---|---:|---:|---|---|"]
    for r in rows:
        value = f"failed: {r.error}" if r.value is None else format_number(r.value)
        lines.append(f"| {r.what} | {r.backend} | {r.batch} | {value} | {r.unit} | {r.note} |")
    return "\n".join(lines)
