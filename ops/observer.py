"""The pipeline's observer: turns each batch into Prometheus metrics, evaluation, drift figures and history."""

from __future__ import annotations

import logging
import time
from collections import deque

import numpy as np

from ebrflow.model.base import Batch
from ebrflow.ops.drift import NoDrift, cosine_shift
from ebrflow.ops.history import BatchRecord, HistoryWriter
from ebrflow.ops.metrics import PipelineMetrics, observe_many
from ebrflow.ops.prequential import Evaluation, PrequentialEvaluator
from ebrflow.ops.status import StatusLine
from ebrflow.stream.policy import BatchResult

log = logging.getLogger(__name__)


class MetricsObserver:
    """Implements ``stream.policy.Observer``: metrics on every hook, test-then-train scores, drift, history."""

    def __init__(
        self,
        metrics: PipelineMetrics,
        evaluator: PrequentialEvaluator,
        drift: object | None = None,
        history: HistoryWriter | None = None,
        recent_batches: int = 20,
        status: StatusLine | None = None,
    ) -> None:
        self.metrics = metrics
        self.evaluator = evaluator
        self.drift = drift or NoDrift()
        self.history = history
        self.status = status
        self._batches = 0
        self._last: Evaluation | None = None
        self._errors: dict[str, bool] = {}
        self._recent: deque[Evaluation] = deque(maxlen=recent_batches)

    def on_consumed(self, n: int) -> None:
        """Count records read."""
        self.metrics.events_consumed.inc(n)

    def on_invalid(self, reason: str, detail: str) -> None:
        """Count a dead-lettered record by reason."""
        self.metrics.events_invalid.labels(reason).inc()
        self.metrics.dlq_events.inc()
        log.debug("dead-lettered record: %s (%s)", reason, detail)

    def before_train(self, batch: Batch) -> tuple[int, int]:
        """Score the batch against what is served before the model learns from it."""
        t0 = time.perf_counter()
        ev = self._last = self.evaluator.evaluate(batch)
        self._recent.append(ev)
        for seg, score in (("all", ev.all), ("cold", ev.cold), ("warm", ev.warm)):
            self.metrics.preq_evaluated.labels(seg).inc(score.n)
            self.metrics.preq_hits.labels(seg).inc(score.hits)
            self.metrics.preq_ndcg.labels(seg).inc(score.ndcg)
            if score.recall is not None:
                self.metrics.preq_recall.labels(seg).set(score.recall)
        self.metrics.stage_duration.labels("evaluate").observe(time.perf_counter() - t0)
        self.metrics.variant_hits.labels("served").inc(ev.all.hits)
        self.metrics.variant_evaluated.labels("served").inc(ev.all.n)
        return ev.all.hits, ev.all.n

    def after_batch(self, result: BatchResult) -> None:
        """Record throughput, loss, publish and freshness figures, drift and a history line."""
        m, rep, pub = self.metrics, result.report, result.published
        self._batches += 1
        self._errors.clear()
        m.batches.inc()
        m.events_trained.inc(result.own)
        m.batch_size.observe(len(result.batch))
        m.batch_duration.observe(sum(result.stage_seconds.values()))
        for stage, secs in result.stage_seconds.items():
            if stage != "evaluate":
                m.stage_duration.labels(stage).observe(secs)
        m.train_steps.inc(rep.steps)
        m.nonfinite_steps.inc(rep.skipped_steps)
        if np.isfinite(rep.loss):
            m.train_loss.set(rep.loss)
        for task, value in rep.task_losses.items():
            m.task_loss.labels(task).set(value)
        for task, value in rep.task_weights.items():
            m.task_weight.labels(task).set(value)
        m.model_version.set(pub.version)
        if not pub.held:  # a held batch wrote nothing to Milvus
            m.last_publish.set(result.published_at)
            for collection, secs in pub.upsert_seconds.items():
                m.upsert_duration.labels(collection).observe(secs)
            m.upserted.labels("items").inc(len(pub.item_ids))
            m.upserted.labels("users").inc(len(pub.user_ids))
        m.indexed.labels("items").set(len(self.evaluator.items))
        m.indexed.labels("users").set(len(self.evaluator.users))
        for collection, mirror in (("items", self.evaluator.items), ("users", self.evaluator.users)):
            oldest = mirror.oldest_write()
            if oldest is not None:
                m.staleness.labels(collection).set(max(result.published_at - oldest, 0.0))
        lag_s = result.published_at - result.record_ts_ms[result.record_ts_ms > 0] / 1000.0
        if not pub.held:
            observe_many(m.freshness, np.maximum(lag_s, 0.0))
        item_shift = cosine_shift(pub.item_previous, pub.item_vectors, pub.item_existed)
        observe_many(m.embedding_shift.labels("items"), item_shift)
        observe_many(
            m.embedding_shift.labels("users"), cosine_shift(pub.user_previous, pub.user_vectors, pub.user_existed)
        )
        ev = self._last
        figures, drifted = self.drift.observe(pub, ev.all.recall if ev else None, item_shift=item_shift)
        for signal in drifted:
            m.drift_detected.labels(signal).inc()
            log.warning("drift detected in %s at batch %d (model version %d)", signal, self._batches, pub.version)
        if "neighbour_jaccard" in figures:
            m.neighbour_jaccard.set(figures["neighbour_jaccard"])
        if "centroid_shift" in figures:
            m.centroid_shift.set(figures["centroid_shift"])
        if self.history is not None:
            self.history.write(self._record(result, ev, item_shift, lag_s, figures, drifted))

    def _record(
        self,
        result,
        ev: Evaluation | None,
        item_shift: np.ndarray,
        lag_s: np.ndarray,
        figures: dict[str, float],
        drifted: list[str],
    ) -> BatchRecord:
        rep = result.report
        return BatchRecord(
            batch=self._batches,
            wall_time=result.published_at,
            stream_time_ms=int(result.batch.ts_ms.max()),
            events=len(result.batch),
            invalid=result.invalid,
            seconds=sum(result.stage_seconds.values()),
            loss=rep.loss if np.isfinite(rep.loss) else None,
            recall=ev.all.recall if ev else None,
            recall_cold=ev.cold.recall if ev else None,
            recall_warm=ev.warm.recall if ev else None,
            ndcg=(ev.all.ndcg / ev.all.n) if ev and ev.all.n else None,
            evaluated=ev.all.n if ev else 0,
            evaluated_cold=ev.cold.n if ev else 0,
            model_version=result.published.version,
            items_indexed=len(self.evaluator.items),
            freshness_p50_s=float(np.median(lag_s)) if len(lag_s) else None,
            item_shift_mean=float(item_shift.mean()) if len(item_shift) else None,
            neighbour_jaccard=figures.get("neighbour_jaccard"),
            centroid_shift=figures.get("centroid_shift"),
            drift_signals=drifted,
            task_losses=rep.task_losses,
            task_weights=rep.task_weights,
        )

    def recent_recall(self) -> float | None:
        """Recall@K over the last ``recent_batches`` batches (None before any event was scored)."""
        n = sum(ev.all.n for ev in self._recent)
        return sum(ev.all.hits for ev in self._recent) / n if n else None

    def on_lag(self, lag: dict[int, int]) -> None:
        """Set per-partition lag."""
        for partition, value in lag.items():
            self.metrics.consumer_lag.labels(str(partition)).set(value)

    def on_partitions(self, assigned: int, total: int, paused: bool) -> None:
        """Partitions held out of the topic's, and whether consumption is paused."""
        self.metrics.partitions_assigned.set(assigned)
        self.metrics.partitions_total.set(total)
        self.metrics.consumption_paused.set(int(paused))

    def on_refused(self) -> None:
        """Another trainer holds part of the topic: this one stops."""
        self.metrics.trainer_refused.inc()

    def on_guard(self, action: str, holding: bool) -> None:
        """Count a guard action and show whether Milvus writes are held."""
        self.metrics.guard_actions.labels(action).inc()
        self.metrics.guard_holding.set(1 if holding else 0)

    def on_variant(self, name: str, hits: int, evaluated: int, seconds: dict[str, float]) -> None:
        """Count a shadow variant's prequential score and stage seconds under ``variant=name``."""
        self.metrics.variant_hits.labels(name).inc(hits)
        self.metrics.variant_evaluated.labels(name).inc(evaluated)
        for stage, secs in seconds.items():
            self.metrics.variant_seconds.labels(name, stage).inc(secs)

    def on_tick(self, now: float) -> None:
        """Log the periodic status line when it is due."""
        if self.status is not None:
            self.status.maybe_log(now)

    def on_expired(self, users: np.ndarray, items: np.ndarray, deleted: dict[str, int]) -> None:
        """Count the Milvus rows deleted for expired ids; forget the expired users' event counts."""
        for collection, n in deleted.items():
            self.metrics.expired.labels(collection).inc(n)
        prior = self.evaluator.core.prior
        for u in users.tolist():
            prior.pop(u, None)

    def on_generation(self, served: int | None, writing: int) -> None:
        """Record the served and the written Milvus generation (0: none served yet)."""
        self.metrics.generation.labels("served").set(served or 0)
        self.metrics.generation.labels("writing").set(writing)

    def on_error(self, op: str, exc: BaseException) -> None:
        """Count a retried failure; log once per failure streak."""
        if op == "publish":
            self.metrics.publish_errors.inc()
        else:
            self.metrics.broker_errors.labels(op).inc()
        if not self._errors.get(op):
            self._errors[op] = True
            log.warning("%s failing: %s (retrying)", op, exc)
