"""Helpers for tests that run the trainer as a real subprocess and kill it: config, produce, audit-log coverage."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from confluent_kafka import Producer

from ebrflow.stream.generator import SyntheticStream
from ebrflow.stream.replay import events_from_arrays
from ebrflow.stream.schema import EventCodec


def write_config(path: Path, bootstrap: str, topic: str, group: str, data_dir: Path, **sections: dict) -> Path:
    """A trainer TOML for a subprocess run (default checkpoint schedule, audit log on, metrics on any port)."""
    base: dict[str, dict] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": group,
            "partitions": 4,
            "session_timeout_ms": 6000,
        },
        "batch": {"max_events": 1024, "max_wait_ms": 200},
        "model": {"dim": 16, "device": "cpu"},
        "milvus": {"uri": str(data_dir / "milvus.db"), "flush_interval_s": 10},
        "metrics": {"port": 0, "eval_sample": 32},
        "run": {"data_dir": str(data_dir), "audit_log": True, "log_level": "WARNING"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {value!r}".replace("True", "true").replace("False", "false").replace("'", '"'))
    path.write_text("\n".join(lines) + "\n")
    return path


def produce_fast(
    bootstrap: str, topic: str, n: int, seed: int = 11, partitions: list[int] | None = None
) -> dict[int, int]:
    """Produce ``n`` synthetic events with librdkafka (fast), round-robin over ``partitions`` when given (else
    keyed by user); returns acknowledged count per partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": False})
    codec = EventCodec()
    acked: Counter[int] = Counter()
    errors: list[str] = []

    def on_delivery(err, msg) -> None:  # noqa: ANN001 - librdkafka callback signature
        if err is None:
            acked[msg.partition()] += 1
        else:
            errors.append(str(err))

    stream = SyntheticStream(users=5000, items=2000, communities=10, seed=seed)
    for i, ev in enumerate(events_from_arrays(stream.chunks(n, chunk=5000))):
        where = {"partition": partitions[i % len(partitions)]} if partitions else {}
        producer.produce(topic, key=str(ev.user_id).encode(), value=codec.encode(ev), on_delivery=on_delivery, **where)
        if i % 10_000 == 0:
            producer.poll(0)
    producer.flush(60)
    assert not errors, errors[:3]
    return dict(acked)


def trainer_cmd(config: Path, idle_exit: float) -> list[str]:
    """Command line of a trainer subprocess."""
    return [sys.executable, "-m", "ebrflow.cli", "run", "-c", str(config), "--idle-exit", str(idle_exit)]


def start_trainer(config: Path, idle_exit: float, log: Path) -> subprocess.Popen[bytes]:
    """Start ``ebrflow run`` with its output appended to ``log``."""
    return subprocess.Popen(trainer_cmd(config, idle_exit), stdout=log.open("ab"), stderr=subprocess.STDOUT)


def coverage(audit_log: Path, topic: str) -> dict[int, np.ndarray]:
    """Times each offset was trained, per partition, from the trainer's processed-offsets log."""
    counts: dict[int, np.ndarray] = {}
    for line in audit_log.read_text().splitlines():
        parts = line.split()
        if len(parts) != 4 or parts[0] != topic:
            continue  # a torn last line from a SIGKILL
        partition, lo, hi = int(parts[1]), int(parts[2]), int(parts[3])
        arr = counts.setdefault(partition, np.zeros(0, np.int64))
        if hi + 1 > len(arr):
            arr = counts[partition] = np.concatenate([arr, np.zeros(hi + 1 - len(arr), np.int64)])
        arr[lo : hi + 1] += 1
    return counts
