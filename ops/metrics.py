"""Every Prometheus series ebrflow exports, in one place (catalogue: docs/metrics.md).

Labels are bounded: ``reason`` (a fixed set of validation reasons), ``stage``, ``collection``
(items/users), ``segment`` (all/cold/warm), ``task`` (model task names), ``signal`` (drift
signals) and ``partition`` (bounded by the topic's partition count). Never an id.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from ebrflow.stream.schema import REASONS

disable_created_metrics()

STAGES = ("poll", "decode", "evaluate", "train", "embed", "queue", "publish", "checkpoint", "observe")
COLLECTIONS = ("items", "users")
SEGMENTS = ("all", "cold", "warm")
DRIFT_SIGNALS = ("item_shift", "neighbour_churn", "centroid", "recall")
BROKER_OPS = ("poll", "commit", "dlq", "lag")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)
DISTANCE_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.0)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Observe every finite value of ``values`` at once: the same bucket counts and sum as one ``observe`` per
    value, for one lock per bucket instead of one Python call per value (a batch brings thousands).

    >>> from prometheus_client import CollectorRegistry
    >>> h = Histogram("demo", "demo", buckets=(1, 2), registry=CollectorRegistry())
    >>> observe_many(h, np.array([0.5, 1.0, 1.5, 9.0]))
    >>> [b.get() for b in h._buckets], h._sum.get()
    ([2.0, 1.0, 1.0], 12.0)
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return
    bounds = histogram._upper_bounds  # prometheus-client's non-cumulative buckets: value <= bound, first match
    counts = np.bincount(np.searchsorted(np.asarray(bounds), values, side="left"), minlength=len(bounds))
    for bucket, count in zip(histogram._buckets, counts.tolist()):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(values.sum()))


class PipelineMetrics:
    """The trainer's metrics, registered on one ``CollectorRegistry`` (a fresh one per test).

    A fresh registry has none of prometheus-client's default collectors, so the standard ``process_*``
    (CPU, memory, open fds), ``python_gc_*`` and ``python_info`` series are registered on it here.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.events_consumed = Counter(
            "ebrflow_events_consumed", "Records read from the events topic (valid or not).", registry=r
        )
        self.events_trained = Counter("ebrflow_events_trained", "Valid events the model trained on.", registry=r)
        self.events_invalid = Counter(
            "ebrflow_events_invalid", "Records rejected by decoding/validation, by reason.", ["reason"], registry=r
        )
        self.dlq_events = Counter("ebrflow_dlq_events", "Records written to the dead-letter topic.", registry=r)
        self.batches = Counter(
            "ebrflow_batches", "Micro-batches processed end to end (trained, published, committed).", registry=r
        )
        self.batch_duration = Histogram(
            "ebrflow_batch_duration_seconds",
            "Wall time to process one micro-batch, all stages.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "ebrflow_stage_duration_seconds",
            "Wall time per pipeline stage (evaluate, train, publish, commit).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ebrflow_batch_events",
            "Valid events per micro-batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
        self.train_loss = Gauge("ebrflow_train_loss", "Mean total training loss of the last micro-batch.", registry=r)
        self.task_loss = Gauge("ebrflow_task_loss", "Last micro-batch's loss per model task.", ["task"], registry=r)
        self.task_weight = Gauge(
            "ebrflow_task_weight", "Last micro-batch's weight per model task (fixed or MGDA).", ["task"], registry=r
        )
        self.train_steps = Counter("ebrflow_train_steps", "Optimiser steps applied.", registry=r)
        self.nonfinite_steps = Counter(
            "ebrflow_nonfinite_steps", "Steps skipped because the loss or a gradient was NaN/inf.", registry=r
        )
        self.model_version = Gauge(
            "ebrflow_model_version", "Model version (optimiser steps) of the last published embeddings.", registry=r
        )
        self.upsert_duration = Histogram(
            "ebrflow_upsert_duration_seconds",
            "Wall time of one Milvus upsert call.",
            ["collection"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upserted = Counter(
            "ebrflow_upserted_embeddings", "Embeddings upserted into Milvus.", ["collection"], registry=r
        )
        self.indexed = Gauge(
            "ebrflow_indexed_entities", "Distinct entities with a published embedding.", ["collection"], registry=r
        )
        self.publish_errors = Counter(
            "ebrflow_publish_errors", "Failed Milvus writes (retried with backoff).", registry=r
        )
        self.last_publish = Gauge(
            "ebrflow_last_publish_timestamp_seconds", "Unix time of the last successful publish.", registry=r
        )
        self.consumer_lag = Gauge(
            "ebrflow_consumer_lag",
            "Records behind the end of each partition (per the broker's end offsets).",
            ["partition"],
            registry=r,
        )
        self.staleness = Gauge(
            "ebrflow_embedding_staleness_seconds",
            "Age of the least recently published embedding per collection (bounded by run.max_staleness_s).",
            ["collection"],
            registry=r,
        )
        self.freshness = Histogram(
            "ebrflow_freshness_seconds",
            "Event time to its item's refreshed embedding being visible in Milvus.",
            buckets=FRESHNESS_BUCKETS,
            registry=r,
        )
        self.preq_evaluated = Counter(
            "ebrflow_prequential_evaluated",
            "Events scored test-then-train (sampled when batches exceed the sample cap).",
            ["segment"],
            registry=r,
        )
        self.preq_hits = Counter(
            "ebrflow_prequential_hits",
            "Scored events whose item was in the user's served top-K.",
            ["segment"],
            registry=r,
        )
        self.preq_ndcg = Counter(
            "ebrflow_prequential_ndcg_sum",
            "Sum of NDCG@K over scored events (divide by evaluated).",
            ["segment"],
            registry=r,
        )
        self.preq_recall = Gauge(
            "ebrflow_prequential_recall",
            "Recall@K of the last micro-batch, test-then-train, sampled when large.",
            ["segment"],
            registry=r,
        )
        self.embedding_shift = Histogram(
            "ebrflow_embedding_shift_cosine",
            "Cosine distance between an entity's previous and refreshed published embedding.",
            ["collection"],
            buckets=DISTANCE_BUCKETS,
            registry=r,
        )
        self.neighbour_jaccard = Gauge(
            "ebrflow_neighbour_jaccard",
            "Mean Jaccard@K of probe items' neighbour sets between consecutive published versions.",
            registry=r,
        )
        self.centroid_shift = Gauge(
            "ebrflow_centroid_shift_cosine",
            "Cosine distance of the published item centroid from the reference window's centroid.",
            registry=r,
        )
        self.drift_detected = Counter(
            "ebrflow_drift_detected", "Drift detector alarms, by monitored signal.", ["signal"], registry=r
        )
        self.broker_errors = Counter(
            "ebrflow_broker_errors", "Broker errors the consumer retried (poll, commit, produce).", ["op"], registry=r
        )
        self.up = Gauge("ebrflow_trainer_up", "1 while the trainer loop runs.", registry=r)
        self.build_info = Gauge(
            "ebrflow_build_info",
            "Always 1; labels say what runs: ebrflow version, model kind, embedding dim, K of Recall@K.",
            ["version", "model_kind", "dim", "k"],
            registry=r,
        )
        self.partitions_assigned = Gauge(
            "ebrflow_partitions_assigned", "Partitions of the topic this trainer holds.", registry=r
        )
        self.partitions_total = Gauge("ebrflow_partitions_total", "Partitions of the topic.", registry=r)
        self.consumption_paused = Gauge(
            "ebrflow_consumption_paused",
            "1 while consumption is paused (backpressure or waiting for the topic).",
            registry=r,
        )
        self.guard_holding = Gauge(
            "ebrflow_guard_holding",
            "1 while the recall guard holds Milvus writes (clients keep the last good embeddings).",
            registry=r,
        )
        self.guard_actions = Counter(
            "ebrflow_guard_actions",
            "Recall guard actions: hold, rollback, resume.",
            ["action"],
            registry=r,
        )
        self.variant_hits = Counter(
            "ebrflow_variant_prequential_hits",
            'Prequential hits per model variant ("served" and each shadow variant of model.variants).',
            ["variant"],
            registry=r,
        )
        self.variant_evaluated = Counter(
            "ebrflow_variant_prequential_evaluated",
            "Events scored prequentially per model variant.",
            ["variant"],
            registry=r,
        )
        self.variant_seconds = Counter(
            "ebrflow_variant_seconds",
            "Seconds each shadow variant spent per stage (evaluate, train, publish).",
            ["variant", "stage"],
            registry=r,
        )
        self.generation = Gauge(
            "ebrflow_generation",
            "Milvus model generation clients read (role=served, 0: none yet) and the one this trainer writes.",
            ["role"],
            registry=r,
        )
        self.expired = Counter(
            "ebrflow_expired",
            "Ids unseen for run.expire_after_s of event time, forgotten and their Milvus rows deleted, by collection.",
            ["collection"],
            registry=r,
        )
        self.trainer_refused = Counter(
            "ebrflow_trainer_refused", "Starts refused because another trainer holds part of the topic.", registry=r
        )
        self._init_label_values()

    def _init_label_values(self) -> None:
        """Create every bounded label value up front, so series exist (at 0) before their first event."""
        for reason in REASONS:
            self.events_invalid.labels(reason)
        for stage in STAGES:
            self.stage_duration.labels(stage)
        for collection in COLLECTIONS:
            self.expired.labels(collection)
            self.upsert_duration.labels(collection)
            self.upserted.labels(collection)
            self.indexed.labels(collection)
            self.embedding_shift.labels(collection)
        for segment in SEGMENTS:
            self.preq_evaluated.labels(segment)
            self.preq_hits.labels(segment)
            self.preq_ndcg.labels(segment)
        for signal in DRIFT_SIGNALS:
            self.drift_detected.labels(signal)
        for op in BROKER_OPS:
            self.broker_errors.labels(op)

    def serve(
        self, host: str = "127.0.0.1", port: int = 9464, readiness: Callable[[], dict[str, bool]] | None = None
    ) -> int:
        """Serve ``/metrics``, ``/healthz`` (200 while the process serves) and ``/readyz`` (200 when every check
        of ``readiness`` holds, else 503; the body names each check) on ``host:port``; port 0 picks one.

        Loopback unless configured. Returns the bound port.
        """
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "/")
            if path == "/healthz":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            if path == "/readyz":
                checks = readiness() if readiness is not None else {}
                ok = bool(checks) and all(checks.values())
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
                return [json.dumps({"ready": ok, "checks": checks}).encode()]
            return metrics_app(environ, start_response)

        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="ebrflow-metrics", daemon=True).start()
        return server.server_port

    def set_build_info(self, version: str, model_kind: str, dim: int, k: int) -> None:
        """``ebrflow_build_info`` = 1 with what this trainer runs as labels."""
        self.build_info.labels(version, model_kind, str(dim), str(k)).set(1)


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        """Drop the line."""
