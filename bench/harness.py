"""Real-pipeline plumbing shared by the throughput and freshness suites: events, topics, a timed trainer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ebrflow.app import Trainer, build_trainer
from ebrflow.config import Settings, load_settings
from ebrflow.ops.metrics import STAGES, PipelineMetrics
from ebrflow.stream.generator import EventArrays, SyntheticStream
from ebrflow.stream.kafka_io import ensure_topics, make_producer
from ebrflow.stream.replay import events_from_arrays, produce

CONSUMER_STAGES = ("poll", "decode")  # on the consumer thread, overlapping the training thread's stages


def quiet_logs() -> None:
    """Kafka and gRPC log every reconnect; benchmarks only want warnings from ebrflow itself."""
    for name in ("kafka", "grpc", "pymilvus", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.ERROR)


def synthetic(n_events: int, users: int = 10_000, items: int = 5_000, seed: int = 7) -> EventArrays:
    """``n_events`` synthetic events in one array (10k users / 5k items by default, as in FACTS.md)."""
    return next(SyntheticStream(users=users, items=items, seed=seed).chunks(n_events, chunk=n_events))


def preproduce(bootstrap: str, topic: str, events: EventArrays, partitions: int = 4) -> float:
    """Create ``topic`` and produce every event as JSON (keyed by user); returns the produce rate (events/s)."""
    ensure_topics(bootstrap, {topic: partitions})
    producer = make_producer(bootstrap)
    t0 = time.perf_counter()
    n = produce(producer, topic, events_from_arrays([events]))
    rate = n / (time.perf_counter() - t0)
    producer.close()
    return rate


def trainer_settings(bootstrap: str, topic: str, group: str, workdir: Path, **sections: dict[str, Any]) -> Settings:
    """ebrflow's default settings on ``bootstrap``, Milvus Lite under ``workdir``.

    Deviations: a 6 s session timeout (Tansu's join takes ~half of it), metrics on an ephemeral port, CPU.
    ``sections`` override whole config sections' keys, e.g. ``batch={"max_events": 256}``.
    """
    base: dict[str, dict[str, Any]] = {
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "group_id": group, "session_timeout_ms": 6000},
        "milvus": {"uri": str(workdir / "milvus.db")},
        "metrics": {"port": 0},
        "run": {"data_dir": str(workdir / "data")},
        "model": {"device": "cpu"},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return load_settings(**base)


@dataclass
class TimedRun:
    """What one trainer run did: events, seconds from the first record to the last batch Milvus acknowledged, and
    per-stage seconds; the group join before, and the shutdown after (re-publish of every embedding, final
    checkpoint and commit, forced flush) are reported apart."""

    events: int
    steady_s: float
    total_s: float
    join_s: float
    final_flush_s: float
    stage_s: dict[str, float]
    shutdown_s: float = 0.0
    batches: int = 0

    @property
    def events_per_s(self) -> float:
        """Events per second from the first consumed record to the last batch Milvus acknowledged."""
        return self.events / self.steady_s if self.steady_s > 0 else float("nan")


def stage_seconds(metrics: PipelineMetrics) -> dict[str, float]:
    """Total seconds per pipeline stage from the trainer's own histogram."""
    get = metrics.registry.get_sample_value
    return {s: float(get("ebrflow_stage_duration_seconds_sum", {"stage": s}) or 0.0) for s in STAGES}


def start_timed_trainer(settings: Settings, model: Any = None) -> tuple[Trainer, dict[str, float]]:
    """``build_trainer`` on the real parts, with the times of the first consumed record and of the last batch
    acknowledged by Milvus recorded in ``marks`` ("first_record", "last_batch")."""
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers, model=model)
    marks: dict[str, float] = {}
    on_consumed, after_batch = trainer.observer.on_consumed, trainer.observer.after_batch

    def first_mark(n: int) -> None:
        marks.setdefault("first_record", time.monotonic())
        on_consumed(n)

    def batch_mark(result: Any) -> None:
        after_batch(result)
        marks["last_batch"] = time.monotonic()

    trainer.observer.on_consumed = first_mark  # type: ignore[method-assign]
    trainer.observer.after_batch = batch_mark  # type: ignore[method-assign]
    return trainer, marks


def run_trainer(settings: Settings, n_events: int, model: Any = None) -> TimedRun:
    """Consume exactly ``n_events`` pre-produced events through the whole pipeline; time it."""
    trainer, marks = start_timed_trainer(settings, model)
    try:
        t0 = time.monotonic()
        summary = trainer.pipeline.run(max_events=n_events, idle_exit_s=60)
        t1 = time.monotonic()
        trainer.store.flush_if_due(force=True)
        t2 = time.monotonic()
        first, last = marks.get("first_record", t0), marks.get("last_batch", t1)
        stages = stage_seconds(trainer.metrics)
        steady, join = last - first, first - t0
        return TimedRun(summary.trained, steady, t1 - t0, join, t2 - t1, stages, t1 - last, summary.batches)
    finally:
        trainer.close()


def quantiles(values: list[float] | np.ndarray, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> dict[str, float]:
    """``p50``/``p95``/``p99`` (or the given quantiles) of ``values``; NaN when empty."""
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{round(q * 100)}": float(np.quantile(arr, q)) if len(arr) else float("nan") for q in qs}
