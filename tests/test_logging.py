"""Logs: ``--log-format json`` makes every stderr line of the real ``ebrflow run`` a JSON object, and the running
loop logs a status line (events/s, lag, recall, last publish, events trained) every ``run.status_interval_s``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebrflow.config import Settings
from ebrflow.logs import JsonFormatter
from ebrflow.ops.metrics import PipelineMetrics
from ebrflow.ops.status import StatusLine
from tests.faults import send_events

ROOT = Path(__file__).resolve().parents[1]


def test_json_records_carry_extra_fields_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("ebrflow.t").makeRecord(
            "ebrflow.t", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info(), extra={"lag": 3}
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "ERROR" and line["logger"] == "ebrflow.t" and line["message"] == "failed x"
    assert line["lag"] == 3 and line["ts"].endswith("Z")
    assert line["exc"].startswith("Traceback") and "ValueError: boom" in line["exc"]


def test_status_line_reads_the_metrics(caplog: pytest.LogCaptureFixture) -> None:
    metrics = PipelineMetrics()
    status = StatusLine(metrics, interval_s=10, k=5, wall_clock=lambda: 1000.0)
    status.maybe_log(0.0)  # starts the first window
    metrics.events_consumed.inc(500)
    metrics.events_trained.inc(400)
    metrics.consumer_lag.labels("0").set(7)
    metrics.consumer_lag.labels("1").set(5)
    metrics.preq_recall.labels("all").set(0.25)
    metrics.last_publish.set(997.5)
    with caplog.at_level(logging.INFO, logger="ebrflow.ops.status"):
        status.maybe_log(9.0)  # not due yet
        status.maybe_log(10.0)
        status.maybe_log(15.0)
    (record,) = caplog.records
    message = "status: 50.0 events/s, lag 12, Recall@5 0.250, last publish 2.5 s ago, 400 events trained"
    assert record.getMessage() == message
    figures = (record.events_per_s, record.consumer_lag, record.recall, record.seconds_since_publish)
    assert figures == (50.0, 12, 0.25, 2.5)
    fresh = StatusLine(PipelineMetrics(), interval_s=1, k=5).fields(1.0)
    assert fresh["consumer_lag"] is None and fresh["recall"] is None and fresh["seconds_since_publish"] is None


def test_run_logs_json_lines_with_periodic_status(settings: Settings, tmp_path: Path) -> None:
    events = 3000
    send_events(settings, 0, events)
    k = settings.kafka
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("EBRFLOW_")}
    env.update(
        PYTHONPATH=str(ROOT),
        EBRFLOW_KAFKA__BOOTSTRAP_SERVERS=k.bootstrap_servers,
        EBRFLOW_KAFKA__TOPIC=k.topic,
        EBRFLOW_KAFKA__GROUP_ID=k.group_id,
        EBRFLOW_KAFKA__PARTITIONS=str(k.partitions),
        EBRFLOW_KAFKA__SESSION_TIMEOUT_MS="6000",
        EBRFLOW_BATCH__MAX_EVENTS="256",
        EBRFLOW_MILVUS__URI=settings.milvus.uri,
        EBRFLOW_METRICS__PORT="0",
        EBRFLOW_METRICS__EVAL_SAMPLE="64",
        EBRFLOW_MODEL__DIM="16",
        EBRFLOW_MODEL__DEVICE="cpu",
        EBRFLOW_RUN__DATA_DIR=str(tmp_path / "data"),
        EBRFLOW_RUN__STATUS_INTERVAL_S="1",
    )
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "ebrflow.cli", "run", "--log-format", "json", "--idle-exit", "7"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    ran_s = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == ""
    records = [json.loads(line) for line in out.stderr.splitlines()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= record.keys() for record in records)
    status = [r for r in records if r["logger"] == "ebrflow.ops.status"]
    assert len(status) >= 3, [r["message"] for r in records]
    for record in status:
        assert isinstance(record["events_per_s"], (int, float)) and record["events_per_s"] >= 0
        assert isinstance(record["events_trained"], int) and record["k"] == settings.metrics.recall_k
        assert record["message"].startswith("status: ")
    assert any(r["events_per_s"] > 0 for r in status), "no status line saw events flow"
    last = status[-1]
    assert last["events_trained"] == events
    assert last["consumer_lag"] == 0
    assert 0 <= last["recall"] <= 1
    assert 0 <= last["seconds_since_publish"] <= ran_s  # a publish of this run, however slow the machine
    assert any(r["message"].startswith(f"consumed {events:,}") for r in records)  # the closing line is a record too
