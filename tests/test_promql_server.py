"""Every dashboard query returns series from a real Prometheus scraping a live PipelineMetrics exporter.

A prometheus_client HTTP server on a free loopback port serves a PipelineMetrics registry whose every
family (every label value of the bounded label sets) keeps changing in a background thread; the real
``prometheus`` binary scrapes it every second and loads ops/prometheus/alerts.yml. This proves the
dashboard's PromQL is valid and wired to the exported series, and that the alert rules evaluate cleanly
on live data. The end-to-end trainer test repeats the query check against the real trainer.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from ebrflow.ops.metrics import STAGES, PipelineMetrics
from tests.promql import ALERT_RULES, DASHBOARD, PrometheusQueryError, PrometheusServer, dashboard_queries

# Representative values for every bounded label in ops/metrics.py; an unknown label gets "test".
LABEL_VALUES = {
    "reason": ["bad_json", "missing_field"],
    "stage": list(STAGES),
    "collection": ["items", "users"],
    "segment": ["all", "cold", "warm"],
    "task": ["retrieval", "infonce"],
    "signal": ["item_shift", "recall"],
    "partition": ["0", "1", "2", "3"],
    "op": ["poll", "commit"],
}
RECALL = 0.4  # hits / evaluated fed to the prequential counters
NDCG = 0.25  # ndcg_sum / evaluated
TICK_S = 0.05


def needs_prometheus() -> None:
    if shutil.which("prometheus") is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed; CI must `apt-get install prometheus`")
        pytest.skip("prometheus binary not installed (apt-get install prometheus); CI runs this test")


def children(metric: Counter | Gauge | Histogram) -> list:
    """The metric itself if unlabelled, else one child per combination of representative label values."""
    names = metric._labelnames  # prometheus_client keeps label names only here
    if not names:
        return [metric]
    combos = itertools.product(*(LABEL_VALUES.get(name, ["test"]) for name in names))
    return [metric.labels(*combo) for combo in combos]


def all_metrics(metrics: PipelineMetrics) -> list[Counter | Gauge | Histogram]:
    found = [value for value in vars(metrics).values() if isinstance(value, (Counter, Gauge, Histogram))]
    ebrflow_families = [family for family in metrics.registry.collect() if family.name.startswith("ebrflow_")]
    assert len(found) == len(ebrflow_families), "every registered ebrflow family is an attribute"
    return found


def tick(metrics: PipelineMetrics, step: int) -> None:
    """Move every series: counters up, histograms observed, gauges set; prequential counters at known ratios."""
    special = {metrics.preq_evaluated, metrics.preq_hits, metrics.preq_ndcg, metrics.last_publish, metrics.up}
    for metric in all_metrics(metrics):
        if metric in special:
            continue
        for child in children(metric):
            if isinstance(metric, Counter):
                child.inc()
            elif isinstance(metric, Histogram):
                child.observe(0.01 * (1 + step % 50))
            else:
                child.set(1 + step % 7)
    for segment in LABEL_VALUES["segment"]:
        metrics.preq_evaluated.labels(segment).inc(100)
        metrics.preq_hits.labels(segment).inc(100 * RECALL)
        metrics.preq_ndcg.labels(segment).inc(100 * NDCG)
    metrics.last_publish.set(time.time())
    metrics.up.set(1)


@pytest.fixture(scope="module")
def exporter() -> Iterator[str]:
    """A live PipelineMetrics exporter on 127.0.0.1 (free port), updated every TICK_S; yields host:port."""
    needs_prometheus()
    metrics = PipelineMetrics()
    tick(metrics, 0)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    stop = threading.Event()

    def run() -> None:
        for step in itertools.count(1):
            if stop.wait(TICK_S):
                return
            tick(metrics, step)

    ticker = threading.Thread(target=run, daemon=True)
    ticker.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        stop.set()
        ticker.join(timeout=5)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def prom(exporter: str) -> Iterator[PrometheusServer]:
    with PrometheusServer(exporter, rule_files=[ALERT_RULES]) as server:
        server.wait_for_scrapes(3, timeout=30)
        yield server


def value(item: dict) -> float:
    return float(item["value"][1])


def test_every_dashboard_query_returns_finite_series(prom: PrometheusServer) -> None:
    queries = dashboard_queries(DASHBOARD)
    assert queries
    empty, not_finite = [], []
    for title, expr in queries:
        result = prom.query(expr)
        if not result:
            empty.append(f"{title}: {expr}")
        elif not all(math.isfinite(value(item)) for item in result):
            not_finite.append(f"{title}: {expr} → {result}")
    assert not empty, "queries with no series:\n" + "\n".join(empty)
    assert not not_finite, "queries with NaN/inf values:\n" + "\n".join(not_finite)


def test_dashboard_variables_list_the_scraped_job_and_instance(prom: PrometheusServer, exporter: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
        selector = match.group(1).replace("$job", variable.get("allValue", ".*"))
        found[match.group(2)] = prom.label_values(match.group(2), selector)
    assert found == {"job": [prom.job], "instance": [exporter]}


def test_quality_panels_compute_the_fed_ratios(prom: PrometheusServer) -> None:
    by_title = {title: expr for title, expr in dashboard_queries(DASHBOARD)}
    recall = {item["metric"]["segment"]: value(item) for item in prom.query(by_title["Recall@K"])}
    ndcg = {item["metric"]["segment"]: value(item) for item in prom.query(by_title["NDCG@K"])}
    assert recall.keys() == ndcg.keys() == set(LABEL_VALUES["segment"])
    assert all(abs(v - RECALL) < 0.05 for v in recall.values()), recall
    assert all(abs(v - NDCG) < 0.05 for v in ndcg.values()), ndcg
    (lag,) = prom.query("sum(ebrflow_consumer_lag)")
    assert value(lag) > 0


def test_scrape_target_is_healthy(prom: PrometheusServer) -> None:
    (up,) = prom.query('up{job="ebrflow"}')
    assert value(up) == 1
    assert prom.scrapes() >= 3


def test_alert_rules_evaluate_cleanly_on_live_series(prom: PrometheusServer) -> None:
    deadline = time.monotonic() + 180  # rules evaluate every second; a loaded machine may take much longer
    while True:
        rules = {rule["name"]: rule for rule in prom.rules()}
        evaluated = all(not rule["lastEvaluation"].startswith("0001-") for rule in rules.values())
        # NonFiniteSteps has no `for`: it fires as soon as an evaluation sees its counter move.
        if evaluated and rules["NonFiniteSteps"]["state"] == "firing":
            break
        assert time.monotonic() < deadline, f"rules not evaluated in time: {rules}"
        time.sleep(0.2)
    assert len(rules) == 8
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    # Every counter ticks at the same rate, so 100% of consumed records are "dead-lettered" (pending: for 5m),
    # drift counters move (firing), the trainer is up and publishing.
    assert rules["DLQRateHigh"]["state"] == "pending"
    assert rules["DriftDetected"]["state"] == "firing"
    assert {rules[name]["state"] for name in ("TrainerDown", "NoPublish", "RecallDropped")} == {"inactive"}


def test_server_queries_and_stops_cleanly(exporter: str) -> None:
    server = PrometheusServer(exporter, job="other")
    with server:
        assert server.config()["scrape_configs"][0]["static_configs"] == [{"targets": [exporter]}]
        url, pid, workdir = server.url, server._proc.pid, server._workdir
        (one,) = server.query("vector(1)")
        assert one["metric"] == {} and value(one) == 1
        (now,) = server.query("time()")  # a scalar comes back as one unlabelled item
        assert abs(value(now) - time.time()) < 60
        with pytest.raises(PrometheusQueryError, match="parse"):
            server.query("rate(ebrflow_batches_total[")
    assert server.port is None and server._proc is None
    assert not Path(workdir).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/-/ready", timeout=1)
