"""Two benchmark runs side by side: the ratio B / A of every cell both measured.

    edtalk-live bench --compare a.json b.json        # two machines, or before and after a change

A and B are files written by ``edtalk-live bench --json``. Per-frame cells are matched by
(backend, config, batch) and compared by median FPS; pipeline rows by what they measured (their
backend and batch may differ between the runs: each run uses its fastest). Cells measured in only one
run, or failed in either, are listed below the tables; so are models whose weights differ (a
``weights`` config measured on different files compares different models).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["compare_files", "compare_runs", "load_run"]


def load_run(path: str | os.PathLike[str]) -> dict:
    """A run written by ``--json``; a :class:`ValueError` naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ValueError(f"{path} is not a benchmark run (no 'cells'; write one with --json)")
    return data


def _cells(run: Mapping) -> dict[tuple[str, str, int], dict]:
    return {(c["backend"], c["config"], int(c["batch"])): c for c in run["cells"]}


def _fps(cell: Mapping | None) -> float | None:
    if cell is None or cell.get("error") or not cell.get("fps"):
        return None
    return float(cell["fps"])


def _row_value(row: Mapping | None) -> float | None:
    if row is None or row.get("error") or row.get("value") is None:
        return None
    return float(row["value"])


def _describe(name: str, path: str, run: Mapping) -> str:
    from edtalk_live.benchmarks.fps import _machine_line, _versions_line

    parts = [f"{name}: `{path}`"]
    m, v = run.get("machine"), run.get("versions")
    if m:
        parts.append(_machine_line(m))
    if v:
        parts.append(_versions_line(v))
    if run.get("command"):
        parts.append(f"`{run['command']}`")
    if run.get("date"):
        parts.append(run["date"])
    return "; ".join(parts)


def compare_runs(a: Mapping, b: Mapping, a_name: str = "A", b_name: str = "B") -> str:
    """The comparison of runs ``a`` and ``b`` (as :func:`load_run` returns them), as Markdown."""
    from edtalk_live.benchmarks.fps import format_number, format_ratio

    ca, cb = _cells(a), _cells(b)
    lines = ["Per-frame path, median frames per second:", "",
             f"| backend | config | batch | FPS {a_name} | FPS {b_name} | {b_name} / {a_name} |",
             "|---|---|---:|---:|---:|---:|"]
    only_a = [k for k in ca if k not in cb]
    only_b = [k for k in cb if k not in ca]
    failed = []
    for key in [k for k in ca if k in cb]:
        fa, fb = _fps(ca[key]), _fps(cb[key])
        if fa is None or fb is None:
            failed.append(key)
            continue
        backend, config, batch = key
        lines.append(f"| {backend} | {config} | {batch} | {format_number(fa)} | {format_number(fb)} | "
                     f"{format_ratio(fb / fa)} |")

    ra = {r["what"]: r for r in a.get("pipeline", [])}
    rb = {r["what"]: r for r in b.get("pipeline", [])}
    both = [w for w in ra if w in rb]
    if both:
        lines += ["", "Whole pipeline:", "", f"| what | {a_name} | {b_name} | unit | {b_name} / {a_name} |",
                  "|---|---:|---:|---|---:|"]
        for what in both:
            va, vb = _row_value(ra[what]), _row_value(rb[what])

            def cell(value: float | None, row: Mapping) -> str:
                got = "failed" if value is None else format_number(value)
                return f"{got} ({row['backend']}, batch {row['batch']})"
            ratio = format_ratio(vb / va) if va and vb is not None else "—"
            lines.append(f"| {what} | {cell(va, ra[what])} | {cell(vb, rb[what])} | {ra[what]['unit']} | {ratio} |")

    def keys(ks, rows) -> str:
        return "; ".join([*(f"{backend} {config} batch {batch}" for backend, config, batch in ks), *rows])
    unmatched = []
    if only_a or any(w not in rb for w in ra):
        unmatched.append(f"- only in {a_name}: {keys(only_a, [w for w in ra if w not in rb])}")
    if only_b or any(w not in ra for w in rb):
        unmatched.append(f"- only in {b_name}: {keys(only_b, [w for w in rb if w not in ra])}")
    if failed:
        unmatched.append(f"- failed in {a_name} or {b_name}: {keys(failed, [])}")
    if unmatched:
        lines += ["", "Not compared:", *unmatched]
    ma, mb = a.get("models", {}), b.get("models", {})
    for config in [c for c in ma if c in mb]:
        ha, hb = ma[config].get("weights_hash"), mb[config].get("weights_hash")
        if ha != hb:
            lines += ["", f"Note: `{config}` is not the same model in both runs: weights hash {ha} in {a_name}, "
                      f"{hb} in {b_name}."]
    return "\n".join(lines)


def compare_files(a_path: str | os.PathLike[str], b_path: str | os.PathLike[str]) -> str:
    """:func:`compare_runs` of two ``--json`` files, headed by what each run was (machine, versions, command)."""
    a, b = load_run(a_path), load_run(b_path)
    head = [_describe("A", str(a_path), a), "", _describe("B", str(b_path), b), "", ""]
    return "\n".join(head) + compare_runs(a, b)
