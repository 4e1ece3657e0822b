"""The whole path on real parts: Tansu broker → trainer → Milvus Lite → /metrics, plus the query CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer
from typer.testing import CliRunner

from ebrflow.app import build_trainer
from ebrflow.cli import app
from ebrflow.config import Settings
from ebrflow.stream.generator import SyntheticStream
from ebrflow.stream.kafka_io import make_producer
from ebrflow.stream.replay import events_from_arrays
from ebrflow.stream.schema import EventCodec

BAD = [
    b"{oops",
    b'{"user_id":"x","item_id":1,"ts":1}',
    b'{"item_id":1,"ts":1}',
    b'{"user_id":1,"item_id":2,"ts":3,"weight":1e999}',
    b'{"user_id":-5,"item_id":2,"ts":3}',
]


def produce_mixed(settings: Settings, n_valid: int, bad_every: int = 100) -> tuple[list, list[bytes]]:
    """Send ``n_valid`` synthetic events with a malformed record after every ``bad_every``-th."""
    producer = make_producer(settings.kafka.bootstrap_servers)
    codec = EventCodec()
    stream = SyntheticStream(users=400, items=200, communities=5, seed=3)
    valid, bad = [], []
    for i, ev in enumerate(events_from_arrays(stream.chunks(n_valid))):
        producer.send(settings.kafka.topic, key=str(ev.user_id).encode(), value=codec.encode(ev))
        valid.append(ev)
        if i % bad_every == 0:
            payload = BAD[len(bad) % len(BAD)]
            producer.send(settings.kafka.topic, key=b"bad", value=payload)
            bad.append(payload)
    producer.flush()
    producer.close()
    return valid, bad


def read_dlq(settings: Settings, expected: int) -> list:
    consumer = KafkaConsumer(
        settings.kafka.topic + ".dlq",
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    records = [r for _, r in zip(range(expected + 10), consumer)]
    consumer.close()
    return records


def check_milvus_matches_model(trainer, valid: list) -> None:  # noqa: ANN001
    """Every item seen is in Milvus with the model's current embedding and the version it was published at."""
    items = np.unique([e.item_id for e in valid])
    rows = trainer.store.get(trainer.store.items, items.tolist())
    assert set(rows) == set(items.tolist())
    model_vecs = trainer.model.item_embeddings(items)
    milvus_vecs = np.array([rows[i]["embedding"] for i in items.tolist()], dtype=np.float32)
    np.testing.assert_allclose(milvus_vecs, model_vecs, atol=1e-5)
    versions = np.array([rows[i]["version"] for i in items.tolist()])
    assert versions.max() == trainer.model.version and versions.min() > 0


def test_every_event_is_trained_published_and_counted(settings: Settings) -> None:
    valid, bad = produce_mixed(settings, 3000)
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        summary = trainer.run(max_events=len(valid) + len(bad), idle_exit_s=60)
        body = urllib.request.urlopen(f"http://127.0.0.1:{trainer.metrics_port}/metrics").read().decode()
        check_milvus_matches_model(trainer, valid)
    finally:
        trainer.close()

    # every record consumed, every valid one trained, every bad one dead-lettered, counters agree
    assert summary.consumed == len(valid) + len(bad)
    assert summary.trained == len(valid)
    m = trainer.metrics
    assert m.events_consumed._value.get() == len(valid) + len(bad)
    assert m.events_trained._value.get() == len(valid)
    assert m.dlq_events._value.get() == len(bad)

    # the scraped /metrics shows the documented series
    for series in (
        "ebrflow_events_consumed_total",
        "ebrflow_events_trained_total",
        "ebrflow_events_invalid_total",
        "ebrflow_batches_total",
        "ebrflow_batch_duration_seconds_bucket",
        "ebrflow_train_loss",
        "ebrflow_upsert_duration_seconds",
        "ebrflow_consumer_lag",
        "ebrflow_prequential_recall",
        "ebrflow_prequential_hits_total",
        "ebrflow_freshness_seconds_bucket",
        "ebrflow_model_version",
    ):
        assert series in body, series
    assert f"ebrflow_events_trained_total {float(len(valid))}" in body

    # the DLQ holds each bad record's bytes with a reason and its source offset
    dlq = read_dlq(settings, len(bad))
    assert sorted(r.value for r in dlq) == sorted(bad)
    for r in dlq:
        headers = dict(r.headers)
        assert headers["ebrflow.reason"] in {b"malformed_json", b"invalid_field", b"missing_field"}
        assert headers["ebrflow.detail"] and int(headers["ebrflow.source.offset"]) >= 0

    # the query CLI returns K items the user has not interacted with
    user = max({e.user_id for e in valid}, key=lambda u: sum(e.user_id == u for e in valid))
    seen = {e.item_id for e in valid if e.user_id == user}
    env = {"EBRFLOW_MILVUS__URI": settings.milvus.uri, "EBRFLOW_MODEL__DIM": str(settings.model.dim)}
    result = CliRunner().invoke(app, ["query", "--user", str(user), "-k", "10"], env=env)
    assert result.exit_code == 0, result.output
    got = [int(line.split("\t")[1]) for line in result.output.strip().splitlines()]
    assert len(got) == 10 and not set(got) & seen


def kcat_env(tmp_path: Path) -> dict[str, str]:
    """Environment that runs Debian's kcat on the newer librdkafka shipped in the confluent-kafka wheel.

    Debian 12's librdkafka 2.0.2 fails Tansu's ApiVersions handshake ("Read underflow"); 2.16 works.
    The client under test is still kcat, a third-party binary speaking the Kafka protocol over a socket.
    """
    import confluent_kafka

    libs = sorted(Path(confluent_kafka.__file__).parent.parent.glob("confluent_kafka.libs/librdkafka-*.so.1"))
    env = dict(os.environ)
    if libs:
        (tmp_path / "librdkafka.so.1").symlink_to(libs[0])
        env["LD_LIBRARY_PATH"] = f"{tmp_path}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def test_events_from_kcat_are_consumed(settings: Settings, tmp_path: Path) -> None:
    if shutil.which("kcat") is None:
        if os.environ.get("CI"):
            pytest.fail("kcat must be installed in CI (.ci/run installs it)")
        pytest.skip("kcat not installed (apt-get install kcat)")
    lines = [f'{{"user_id":{u},"item_id":{u % 7},"ts":{1_700_000_000_000 + u}}}' for u in range(200)]
    (tmp_path / "ev.jsonl").write_text("\n".join(lines) + "\nnot json\n")
    subprocess.run(
        [
            "kcat",
            "-P",
            "-b",
            settings.kafka.bootstrap_servers,
            "-t",
            settings.kafka.topic,
            "-k",
            "kcat",
            "-l",
            str(tmp_path / "ev.jsonl"),
        ],
        check=True,
        timeout=60,
        env=kcat_env(tmp_path),
    )
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        summary = trainer.run(max_events=201, idle_exit_s=60)
        assert trainer.store.count(trainer.store.items) == 7
    finally:
        trainer.close()
    assert summary.trained == 200 and summary.invalid == 1


def test_cli_help_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "ebrflow.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("demo", "run", "replay", "query"):
        assert cmd in out.stdout
