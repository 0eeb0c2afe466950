"""The picture of a benchmark run: frames per second against batch size, per backend, one panel per model.

    plot_fps(cells, models, "fps.png", title="the machine")      # edtalk-live bench --plot fps.png

Each backend is a line of median FPS with p10-p90 bars; the published per-frame path (batch 1) is a
dotted line and the 25 fps of one live session a dashed red one. Both axes are logarithmic. Needs
matplotlib (``pip install 'edtalk-live[plot]'``); only its object-oriented API is used (no pyplot,
no global state), so any backend works headless.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from edtalk_live.edtalk.errors import EDTalkError
from edtalk_live.edtalk.timing import FPS

__all__ = ["INSTALL_HINT", "plot_fps"]

INSTALL_HINT = "pip install 'edtalk-live[plot]'"


def plot_fps(cells: Sequence, models: Mapping, out: str | os.PathLike[str], title: str = "") -> Path:
    """Draw ``cells`` (:class:`benchmarks.fps.Cell`) into the PNG ``out``; returns its path.

    ``models`` maps a config name to its :class:`benchmarks.fps.ModelInfo` (panel titles). Failed
    cells are left out.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator
    except ImportError:
        raise EDTalkError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    from edtalk_live.benchmarks.fps import REFERENCE_NAME, format_number

    ok = [c for c in cells if c.ok]
    configs = list(dict.fromkeys(c.config for c in ok))
    if not configs:
        raise EDTalkError("nothing to plot: no cell was measured")
    backends = list(dict.fromkeys(c.backend for c in ok if c.backend != REFERENCE_NAME))
    colour = {b: f"C{i}" for i, b in enumerate(backends)}

    fig = Figure(figsize=(5.0 * len(configs), 4.4), layout="constrained")
    axes = fig.subplots(1, len(configs), squeeze=False)[0]
    for ax, cname in zip(axes, configs, strict=True):
        mine = [c for c in ok if c.config == cname]
        batches = sorted({c.batch for c in mine})
        for b in backends:
            pts = sorted((c for c in mine if c.backend == b), key=lambda c: c.batch)
            if not pts:
                continue
            fps = [c.fps for c in pts]
            spread = [[f - c.fps_p10 for f, c in zip(fps, pts, strict=True)],
                      [c.fps_p90 - f for f, c in zip(fps, pts, strict=True)]]
            ax.errorbar([c.batch for c in pts], fps, yerr=spread, marker="o", ms=4, capsize=3, color=colour[b],
                        label=b)
        ref = next((c for c in mine if c.backend == REFERENCE_NAME), None)
        if ref is not None:
            ax.axhline(ref.fps, color="0.35", ls=":", lw=1.5,
                       label=f"published per-frame path, batch 1 ({format_number(ref.fps)})")
            ax.plot([1], [ref.fps], marker="s", ms=5, color="0.35")
        ax.axhline(FPS, color="tab:red", ls="--", lw=1, label=f"{FPS} fps: one live session")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(batches))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(b) for b in batches])
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        info = models.get(cname)
        ax.set_title(cname if info is None else f"{cname}: {info.family}, {info.size}²", fontsize=10)
        ax.set_xlabel("batch size (frames per call)")
        ax.set_ylabel("frames / s (median, bars p10–p90)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle("\n".join(textwrap.fill(line, 60 * len(configs)) for line in title.splitlines()), fontsize=8)
    out = Path(out)
    fig.savefig(out, dpi=90)
    return out
