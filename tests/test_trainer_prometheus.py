"""A real Prometheus scrapes a running trainer on loopback; every dashboard panel's PromQL returns series."""

from __future__ import annotations

import os
import shutil
import threading
import time
from itertools import takewhile

import pytest

from ebrflow.app import build_trainer
from ebrflow.config import Settings
from ebrflow.stream.generator import SyntheticStream
from ebrflow.stream.kafka_io import make_producer
from ebrflow.stream.lag import LagReport
from ebrflow.stream.replay import Pacer, events_from_arrays, produce
from tests.promql import ALERT_RULES, PrometheusServer, dashboard_queries


def test_dashboard_queries_return_series_from_a_live_trainer(settings: Settings) -> None:
    if shutil.which("prometheus") is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus must be installed in CI")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    variants = {"tt": {"kind": "two_tower"}}  # a shadow variant, so the A/B row has series too
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"variants": variants})})
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    next(p for p in trainer.pipeline.policies if isinstance(p, LagReport)).interval_s = 1.0
    producer = make_producer(settings.kafka.bootstrap_servers)
    stream = SyntheticStream(users=300, items=150, communities=5, seed=2)
    now_ms = lambda: int(time.time() * 1000)  # noqa: E731
    stop = threading.Event()
    events = takewhile(lambda _: not stop.is_set(), events_from_arrays(stream.chunks(200_000), restamp=now_ms))
    sender = threading.Thread(
        target=produce, args=(producer, settings.kafka.topic, events, Pacer(rate=800)), daemon=True
    )
    sender.start()
    runner = threading.Thread(target=trainer.run, daemon=True)
    runner.start()
    try:
        with PrometheusServer(f"127.0.0.1:{trainer.metrics_port}", rule_files=[ALERT_RULES]) as prom:
            prom.wait_for_scrapes(count=15, timeout=90)
            empty = [(title, expr) for title, expr in dashboard_queries() if not prom.query(expr)]
            assert not empty, f"panels without series: {empty}"
            (up,) = prom.query('up{job="ebrflow"}')
            assert float(up["value"][1]) == 1.0
            (trained,) = prom.query("ebrflow_events_trained_total")
            assert float(trained["value"][1]) > 0
    finally:
        stop.set()
        sender.join(timeout=30)
        trainer.pipeline.stop()
        runner.join(timeout=60)
        trainer.close()
        producer.close(timeout=1)
