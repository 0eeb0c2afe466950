"""The server's Prometheus metrics: one registry per server, totals that never go down."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from edtalk_live.realtime.metrics import (
    LATENCY_BUCKETS_S,
    SchedulerMetrics,
    ServerMetrics,
    SessionCounts,
    batch_size_buckets,
    latency_bucket,
)


def scrape(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def counts(sent: int, latency_s: float) -> SessionCounts:
    buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
    buckets[latency_bucket(latency_s)] = sent
    return SessionCounts(frames_sent=sent, frames_repeated=1, latency_buckets=tuple(buckets),
                         latency_sum=sent * latency_s)


def test_a_session_that_ends_keeps_its_counts():
    live: dict[str, SessionCounts] = {"a": counts(10, 0.2), "b": counts(5, 3.0)}
    scheduler = SchedulerMetrics(4, queue_depth=lambda: 2, in_flight=lambda: 0)
    metrics = ServerMetrics(8, lambda: live.values(), scheduler=scheduler)
    metrics.sessions.set_function(lambda: len(live))
    before = scrape(metrics)
    assert before[("edtalk_frames_sent_total", ())] == 15 and before[("edtalk_frames_repeated_total", ())] == 2
    assert before[("edtalk_latency_seconds_bucket", (("le", "0.2"),))] == 10
    assert before[("edtalk_latency_seconds_bucket", (("le", "+Inf"),))] == 15
    assert before[("edtalk_latency_seconds_sum", ())] == 17.0
    assert before[("edtalk_sessions", ())] == 2 and before[("edtalk_scheduler_queue_depth", ())] == 2
    metrics.session_totals.retire(live.pop("a"))
    after = scrape(metrics)
    assert after[("edtalk_sessions", ())] == 1
    def session_counters(scraped):        # the process collector's CPU time grows by itself
        return {k: v for k, v in scraped.items()
                if k[0].endswith(("_total", "_bucket", "_count", "_sum")) and not k[0].startswith("process_")}

    assert session_counters(before) == {k: after[k] for k in session_counters(before)}
    assert ("process_cpu_seconds_total", ()) in after


def test_each_server_has_its_own_registry():
    a, b = ServerMetrics(1, list), ServerMetrics(2, list)
    a.sessions_started.inc()
    started = ("edtalk_sessions_started_total", ())
    assert scrape(a)[started] == 1 and scrape(b)[started] == 0
    assert scrape(b)[("edtalk_sessions_max", ())] == 2
    assert REGISTRY.get_sample_value("edtalk_sessions_started_total") is None
    rejected = {k[1][0][1] for k in scrape(a) if k[0] == "edtalk_sessions_rejected_total"}
    assert rejected == {"full", "bad_request", "too_large", "rate_limited", "unauthorized"}


def test_buckets():
    assert batch_size_buckets(1) == (1,) and batch_size_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_size_buckets(12) == (1, 2, 4, 8, 12)
    assert latency_bucket(0.05) == 0 and latency_bucket(0.051) == 1 and latency_bucket(9.0) == len(LATENCY_BUCKETS_S)
