"""Churn (benchmarks/churn.py): its figures on known cycles, and 200 connect/hang-up cycles against `serve`.

The real run rotates the five ways a call ends (client close, control ``bye``, an abrupt drop, an answer never
applied, ICE that never completes) and fails when, after the warm-up, the server's resident memory grows by more
than 20 KiB a call or any of sessions, peer connections, asyncio tasks, threads and file descriptors is not back
at its baseline after a call.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edtalk_live.benchmarks.churn import (
    ENDINGS,
    RESOURCES,
    RSS_LIMIT_KIB,
    Cycle,
    format_table,
    rss_slope,
    rss_slope_lsq,
    strip_candidates,
    summarise,
)

BASELINE = dict.fromkeys(RESOURCES, 0.0) | {"threads": 7.0, "file descriptors": 12.0}


def _cycles(n: int, rss_step_kib: float, excess_at: dict[int, dict[str, float]] | None = None) -> list[Cycle]:
    out = []
    for i in range(n):
        excess = (excess_at or {}).get(i, {})
        out.append(Cycle(i, ENDINGS[i % len(ENDINGS)], call_s=0.5, settle_s=0.1 + 0.01 * i, back=not excess,
                         excess=excess, rss_kib=400_000 + rss_step_kib * i + (300 if i % 7 == 0 else 0)))
    return out


def test_the_memory_slope_is_a_robust_line():
    for slope in (rss_slope, rss_slope_lsq):
        assert slope([100.0, 120.0, 140.0, 160.0]) == pytest.approx(20.0)
        assert slope([5.0]) == 0.0
        # a sawtooth (garbage collected now and then) around a flat line has no slope to speak of
        assert abs(slope([1000.0 + (500 if i % 10 == 9 else 0) for i in range(1000)])) < 0.2
    leak = [1000.0 + 25 * i + 300 * (i % 3) for i in range(3000)]          # 25 KiB a call, noisy, subsampled
    assert rss_slope(leak) == pytest.approx(25.0, abs=0.5)
    # a cache that grows once by 4 MiB a third of the way through 180 calls is not 20 KiB a call
    step = [1000.0 + (4096 if i > 60 else 0) for i in range(180)]
    assert rss_slope(step) < 1.0 < RSS_LIMIT_KIB < rss_slope_lsq(step)


def test_memory_growth_and_resources_not_given_back_fail_the_run():
    ok = summarise(_cycles(100, 5.0), BASELINE, warmup=10)
    assert ok["passed"] and ok["rss_slope_kib_per_cycle"] == pytest.approx(5.0, abs=0.5)
    assert ok["endings"]["drop"]["cycles"] == 18 and ok["endings"]["drop"]["back"]
    assert all(r["back"] and r["max_excess"] == 0 for r in ok["resources"].values())

    leaky = summarise(_cycles(100, RSS_LIMIT_KIB + 5), BASELINE, warmup=10)
    assert not leaky["passed"] and leaky["rss_slope_kib_per_cycle"] > RSS_LIMIT_KIB

    held = summarise(_cycles(100, 0.0, {42: {"threads": 2.0}, 57: {"threads": 4.0, "sessions": 1.0}}), BASELINE, 10)
    assert not held["passed"]
    assert held["resources"]["threads"] == {"baseline": 7.0, "back": False, "max_excess": 4.0}
    assert not held["resources"]["sessions"]["back"] and held["resources"]["file descriptors"]["back"]
    assert not held["endings"][ENDINGS[42 % len(ENDINGS)]]["back"]
    # what happened during the warm-up does not count
    assert summarise(_cycles(100, 0.0, {3: {"threads": 2.0}}), BASELINE, 10)["passed"]

    table = format_table(held)
    assert "| threads back to baseline (7) after every cycle | max excess 4 | 0 | no |" in table
    assert "| file descriptors back to baseline (12) after every cycle | max excess 0 | 0 | yes |" in table
    assert all(f"| {e} | " in table for e in ENDINGS)


def test_what_a_call_holds_is_in_the_metrics_and_adds_up_over_workers():
    import threading

    from prometheus_client.parser import text_string_to_metric_families

    from edtalk_live.realtime.metrics import MergedMetrics, ServerMetrics

    def scrape(body: bytes) -> dict[str, float]:
        return {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}

    metrics = ServerMetrics(4, list)
    metrics.peer_connections.set_function(lambda: 2)
    metrics.asyncio_tasks.set_function(lambda: 9)
    started = threading.Event()
    worker = threading.Thread(target=started.wait)
    before = scrape(metrics.exposition()[0])["edtalk_threads"]
    worker.start()
    try:
        mine = scrape(metrics.exposition()[0])
    finally:
        started.set()
        worker.join()
    assert mine["edtalk_threads"] == before + 1 >= threading.active_count()
    assert set(RESOURCES.values()) <= set(mine)
    merged = MergedMetrics(8, 2)
    for w, (pcs, tasks) in enumerate(((1, 5), (2, 7))):
        merged.update(w, f"# TYPE edtalk_peer_connections gauge\nedtalk_peer_connections {pcs}\n"
                         f"# TYPE edtalk_asyncio_tasks gauge\nedtalk_asyncio_tasks {tasks}\n")
    total = scrape(merged.exposition()[0])
    assert total["edtalk_peer_connections"] == 3 and total["edtalk_asyncio_tasks"] == 12


def test_the_no_ice_ending_strips_every_candidate():
    sdp = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=candidate:1 1 udp 1 127.0.0.1 5000 typ host\r\n"
           "a=end-of-candidates\r\na=ice-ufrag:x\r\n")
    assert strip_candidates(sdp) == "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=ice-ufrag:x\r\n"


@pytest.mark.slow
def test_200_calls_give_everything_back(tmp_path):
    """200 cycles (40 of each ending) against `serve` with 0.5 s connect and inactivity timeouts; about 3 minutes
    on a 2-core CPU."""
    out = tmp_path / "churn.json"
    proc = subprocess.run([sys.executable, "-m", "edtalk_live.benchmarks.churn", "--cycles", "200", "--timeout",
                           "0.5", "--hold", "0.1", "--json", str(out)], capture_output=True, text=True, timeout=420)
    assert out.exists(), proc.stderr[-3000:]
    data = json.loads(out.read_text())
    summary = data["summary"]
    rss = " ".join(f"{c['rss_kib'] / 1024:.1f}" for c in data["cycles"][::10])
    report = f"{proc.stdout}{proc.stderr[-2000:]}\nRSS every 10th cycle (MiB): {rss}"
    assert summary["cycles"] == 200 and summary["warmup"] == 20
    assert summary["errors"] == 0, report
    assert summary["rss_slope_kib_per_cycle"] <= RSS_LIMIT_KIB, report
    for name, r in summary["resources"].items():
        assert r["back"], f"{name} not back at {r['baseline']:g} after a cycle (up to +{r['max_excess']:g})\n{report}"
    for ending, e in summary["endings"].items():
        assert e["cycles"] == 36 and e["back"], (ending, e)
    assert proc.returncode == 0, report
