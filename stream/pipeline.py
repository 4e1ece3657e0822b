"""The trainer's main loop: poll → decode (bad records to the DLQ) → micro-batch → train → publish (on the sink's
thread, overlapping the next batch) → checkpoint → commit."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TextIO, TypeVar

import numpy as np
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError

from ebrflow.indexer.generations import Generations
from ebrflow.indexer.publisher import Published, Publisher
from ebrflow.indexer.sink import MilvusSink, SinkStopped, UpsertJob
from ebrflow.model.base import Batch, RetrievalModel, TrainReport
from ebrflow.stream.batcher import MicroBatcher
from ebrflow.stream.checkpointer import Checkpointer, Offsets, Restored
from ebrflow.stream.guard import RecallGuard
from ebrflow.stream.kafka_io import DeadLetterWriter
from ebrflow.stream.pausing import PartitionGate
from ebrflow.stream.refresh import RollingRefresh
from ebrflow.stream.schema import EventCodec, InvalidEvent
from ebrflow.stream.shadow import Variant

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class BatchResult:
    """One processed micro-batch, handed to observers after it was published and committed."""

    batch: Batch
    record_ts_ms: np.ndarray
    report: TrainReport
    published: Published
    published_at: float
    stage_seconds: dict[str, float]
    invalid: int


class Observer(Protocol):
    """Hooks the pipeline calls; ``ops`` implements them (metrics, evaluation, drift, history)."""

    def on_consumed(self, n: int) -> None:
        """``n`` records were read from Kafka."""

    def on_invalid(self, reason: str, detail: str) -> None:
        """A record was rejected and dead-lettered."""

    def before_train(self, batch: Batch) -> tuple[int, int] | None:
        """Test-then-train: called with the batch before the model sees it; returns (hits, evaluated) if scored."""

    def after_batch(self, result: BatchResult) -> None:
        """The batch is trained, published and committed."""

    def on_lag(self, lag: dict[int, int]) -> None:
        """Records behind the end per partition."""

    def on_error(self, op: str, exc: BaseException) -> None:
        """A retried failure of ``op`` (poll, commit, publish, dlq)."""

    def on_partitions(self, assigned: int, total: int, paused: bool) -> None:
        """How many of the topic's partitions this trainer holds, and whether consumption is paused."""

    def on_refused(self) -> None:
        """This trainer found another in its group and stops."""

    def on_generation(self, served: int | None, writing: int) -> None:
        """The Milvus generation clients read (None: none yet) and the one this trainer writes."""

    def on_guard(self, action: str, holding: bool) -> None:
        """The recall guard acted ("hold", "rollback", "resume"); ``holding``: Milvus writes are held."""

    def on_variant(self, name: str, hits: int, evaluated: int, seconds: dict[str, float]) -> None:
        """A shadow variant scored (hits of evaluated events), trained on and published one batch."""

    def on_tick(self, now: float) -> None:
        """The loop is alive at monotonic time ``now`` (every iteration, and while waiting out a retry)."""


@dataclass
class RunSummary:
    """Totals of a run, for the CLI's closing line."""

    consumed: int = 0
    trained: int = 0
    invalid: int = 0
    batches: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        """Records consumed per wall-clock second."""
        return self.consumed / self.seconds if self.seconds else 0.0


class DivergedModel(RuntimeError):
    """The model produced non-finite embeddings; they are never published."""


class Stopped(Exception):
    """``stop()`` was called while an operation was being retried: exit without committing it."""


class SecondTrainer(RuntimeError):
    """Another trainer holds part of the topic: one model per consumer group and collections."""

    exit_code = 75  # EX_TEMPFAIL: retry once the other trainer is gone


@dataclass
class _Pending:
    """What a submitted batch still needs once Milvus acknowledges its rows."""

    batch: Batch
    record_ts: np.ndarray
    report: TrainReport
    offsets: Offsets
    ranges: dict[tuple[str, int], tuple[int, int]]
    stages: dict[str, float]
    invalid: int


class Pipeline:
    """Runs the consumer loop until stopped. What it guarantees (each is tested on the real broker and Milvus):

    - Training of batch n+1 overlaps the Milvus upsert of batch n (``MilvusSink``: bounded, in order). A
      batch's offsets count only once Milvus acknowledged it; a checkpoint waits for every batch in flight.
    - Kafka offsets are committed only together with a checkpoint (or after each acknowledged batch when
      checkpoints are off), so the committed position never runs ahead of a state that can be restored; on
      start every assigned partition is positioned from the restored checkpoint (a partition it does not
      name from its beginning), and Milvus rows of a newer, lost model generation are deleted before
      re-publishing.
    - Publish and dead-letter failures are retried with exponential backoff while every partition is paused
      (``PartitionGate``: pauses survive rebalances; records polled while paused are sought back, never
      dropped). ``stop()`` interrupts any retry; nothing unacknowledged is committed.
    - One trainer per group: a trainer that does not hold every partition of the topic within
      ``exclusive_grace_s`` of joining trains and writes nothing and stops with ``SecondTrainer``.
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        topic: str,
        codec: EventCodec,
        dlq: DeadLetterWriter,
        model: RetrievalModel,
        publisher: Publisher,
        batcher: MicroBatcher,
        observer: Observer,
        checkpointer: Checkpointer | None = None,
        audit_log: TextIO | None = None,
        max_staleness_s: float | None = 300.0,
        lag_interval_s: float = 5.0,
        max_backoff_s: float = 30.0,
        exclusive_grace_s: float | None = 60.0,
        publish_depth: int = 2,
        generations: Generations | None = None,
        new_generation: bool = False,
        generation_grace_s: float = 600.0,
        guard: RecallGuard | None = None,
        snapshot_every: int = 20,
        variants: list[Variant] | None = None,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.codec = codec
        self.dlq = dlq
        self.model = model
        self.publisher = publisher
        self.batcher = batcher
        self.observer = observer
        self.checkpointer = checkpointer
        self.audit_log = audit_log
        self.offsets: Offsets = {}
        self.refresh = RollingRefresh(max_staleness_s, time.monotonic()) if max_staleness_s else None
        self.lag_interval_s = lag_interval_s
        self.max_backoff_s = max_backoff_s
        self.exclusive_grace_s = exclusive_grace_s
        self.publish_depth = publish_depth
        self.generations = generations
        self.new_generation = new_generation
        self.generation_grace_s = generation_grace_s
        self._restored: Restored | None = None
        self._switch_targets: dict[TopicPartition, int] | None = None  # end offsets a new generation must reach
        self._drop_at: float | None = None  # when superseded generations are dropped
        self.guard = guard
        self.snapshot_every = snapshot_every
        self._snapshot: dict | None = None  # the model before a batch it scored healthily on (for rollbacks)
        self._since_snapshot = 0
        self._last_loss: float | None = None  # the previous batch's training loss (the guard's divergence signal)
        self.variants = variants or []
        self.gate = PartitionGate(consumer)
        self.stop_event = threading.Event()
        self.summary = RunSummary()
        self.sink: MilvusSink | None = None
        self._invalid_in_batch = 0
        self._io_seconds = {"poll": 0.0, "decode": 0.0, "checkpoint": 0.0}  # accumulated until the next batch
        self._last_lag = 0.0
        self._committed: Offsets = {}
        self._exclusive = exclusive_grace_s is None
        self._joined_at = time.monotonic()
        self._held = (0, 0)  # (partitions assigned, partitions of the topic), as the loop last saw them
        self._held_paused = False
        self._running = False

    def stop(self) -> None:
        """Ask the loop to finish its current batch and exit (interrupts retries: then nothing is committed)."""
        self.stop_event.set()

    def readiness(self) -> dict[str, bool]:
        """What ``/readyz`` checks: the loop runs, it holds every partition of the topic, Milvus accepts writes."""
        assigned, total = self._held
        return {
            "running": self._running and not self.stop_event.is_set(),
            "partitions": self._exclusive and total > 0 and assigned == total,
            "milvus": self.sink is not None and not self.sink.failing,
        }

    def run(self, max_events: int | None = None, idle_exit_s: float | None = None) -> RunSummary:
        """Consume until ``stop()``, ``max_events`` records, or ``idle_exit_s`` without records once the consumer
        holds its partitions (the group join and the wait for the whole topic are not idle time)."""
        start = time.monotonic()
        self.sink = MilvusSink(
            self.publisher.store,
            self.stop_event,
            depth=self.publish_depth,
            max_backoff_s=self.max_backoff_s,
            on_error=lambda exc: self.observer.on_error("publish", exc),
        )
        try:
            self._restore()
            if self._exclusive:
                self._sync_milvus()
            else:
                self.gate.pause("exclusive")  # no record and no Milvus write before holding the whole topic
            self.consumer.subscribe([self.topic], listener=self.gate)
            self._joined_at = last_record = time.monotonic()
            self._running = True
            while not self.stop_event.is_set():
                if max_events is not None and self.summary.consumed >= max_events and self._exclusive:
                    break  # (with 0: restore, sync Milvus once the topic is ours, and stop)
                n = self._poll_once(max_events)
                now = time.monotonic()
                holding = self._holding()
                self._check_exclusive(now)
                if n or not holding:  # joining the group, waiting for the topic, syncing Milvus: not idleness
                    last_record = now = time.monotonic()
                self._collect()
                self._maybe_switch(now)
                self._backpressure()
                if self.batcher.due() and self.sink.has_room():
                    self._process()
                self._report_lag(now)
                self.observer.on_tick(now)
                if (
                    idle_exit_s is not None
                    and now - last_record > idle_exit_s
                    and not self.batcher.pending()
                    and not self.sink.in_flight
                ):
                    break
            if self.batcher.pending():
                self._process()
            self._drain()
            if self.summary.batches:
                self.republish_all()
                for variant in self.variants:
                    self._retrying("publish", variant.republish_all)
                self._drain()
                self._save(force=True)
            self._maybe_switch(time.monotonic())
        except Stopped as exc:
            log.warning("stopped during a retry (%s): nothing after the last commit was committed", exc)
        finally:
            self._running = False
            self.sink.close()
            self.summary.seconds = time.monotonic() - start
        return self.summary

    def _restore(self) -> None:
        """Load the checkpoint and position partitions from it (Milvus is synced once the topic is ours)."""
        if self.checkpointer is None:
            return  # no state to restore: partitions resume at the group's committed offsets
        restored = self._restored = self.checkpointer.restore()
        self.gate.start_offsets = dict(restored.offsets) if restored else {}
        self.gate.from_beginning = restored is None or restored.source == "run"
        if restored is not None:
            self.offsets.update(restored.offsets)

    def _sync_milvus(self) -> None:
        """Pick the generation to write, then make it equal the restored model: delete rows of a lost, newer run;
        re-publish every embedding."""
        if self.generations is not None:
            self._retrying("publish", self._choose_generation)
        for variant in self.variants:
            self._retrying("publish", variant.open)
            self._retrying("publish", variant.republish_all)
            self._retrying("publish", variant.serve)
        if self.checkpointer is None:
            return
        version = self.model.version
        removed = self._retrying("publish", lambda: self.publisher.forget_newer(version))
        if removed:
            log.warning("deleted %d Milvus rows newer than the restored model (version %d)", removed, version)
        self.republish_all()

    def _choose_generation(self) -> None:
        """Write the restored run's generation, or a new one when the served model is not this one.

        A new generation (no usable run checkpoint while one is served, a backfill, ``new_generation``) is
        filled while clients keep reading the served one; it is switched in once this trainer has caught up with
        the end offsets seen now (``_maybe_switch``). The very first generation is served at once.
        """
        gens, restored = self.generations, self._restored
        served, existing, legacy = gens.served(), gens.existing(), gens.legacy()
        continuing = restored is not None and restored.source == "run" and restored.generation is not None
        if continuing and not self.new_generation:
            writing = restored.generation
        elif self.checkpointer is None and served is not None and not self.new_generation:
            writing = served  # no state of its own to protect clients from: keep writing what is served
        elif served is None and not existing and not legacy:
            writing = 1
        else:
            writing = max([*existing, served or 0]) + 1
        self.publisher.store.use_generation(writing)
        if self.checkpointer is not None:
            self.checkpointer.generation = writing
        if served is None and not legacy:
            gens.switch(writing)
            served = writing
        if served != writing:
            if served is not None:
                gens.load(served)  # clients keep reading it meanwhile
            known = sorted(self.consumer.partitions_for_topic(self.topic) or [])
            parts = [TopicPartition(self.topic, p) for p in known]
            ends = self.consumer.end_offsets(parts) if parts else {}
            self._switch_targets = {tp: int(end) for tp, end in ends.items()}
            log.info("writing generation %d; generation %s is served until this trainer catches up", writing, served)
        if any(g < writing and g != served for g in existing):
            self._drop_at = time.monotonic() + self.generation_grace_s
        self.observer.on_generation(served, writing)

    def _maybe_switch(self, now: float) -> None:
        """Serve the generation being written once it caught up; drop superseded generations after the grace."""
        gens = self.generations
        if gens is None:
            return
        if self._switch_targets is not None and all(
            self.offsets.get((tp.topic, tp.partition), 0) >= end for tp, end in self._switch_targets.items()
        ):
            self._drain()
            store = self.publisher.store
            self._retrying("publish", lambda: store.flush_if_due(force=True))
            self._retrying("publish", lambda: gens.switch(store.generation))
            self._switch_targets = None
            self._drop_at = now + self.generation_grace_s
            self.observer.on_generation(store.generation, store.generation)
        if self._drop_at is not None and now >= self._drop_at:
            self._retrying("publish", lambda: gens.drop_older(self.publisher.store.generation))
            self._drop_at = None

    def _holding(self) -> bool:
        """The consumer is in its group (not joining or rebalancing) and may train: the idle clock runs."""
        return self._exclusive and self.gate.joined

    def _check_exclusive(self, now: float) -> None:
        """Train only while holding every partition of the topic; refuse after the grace."""
        assigned = {tp for tp in self.consumer.assignment() if tp.topic == self.topic}
        total = self.consumer.partitions_for_topic(self.topic) or set()
        held = (len(assigned), len(total))
        if (held, self.gate.paused) != (self._held, self._held_paused):  # gauges only on change: runs every loop
            self._held, self._held_paused = held, self.gate.paused
            self.observer.on_partitions(*held, self.gate.paused)
        if self._exclusive:
            return
        if total and len(assigned) == len(total):
            self._exclusive = True
            self._sync_milvus()
            self.gate.resume("exclusive")
            return
        if self.exclusive_grace_s is not None and now - self._joined_at > self.exclusive_grace_s:
            self.observer.on_refused()
            raise SecondTrainer(
                f"this trainer holds {len(assigned)} of {len(total)} partitions of {self.topic} after "
                f"{self.exclusive_grace_s:.0f} s: another trainer runs in consumer group "
                f"{self.consumer.config.get('group_id')!r}; ebrflow trains one model per group (stop the other, "
                "or give this one its own kafka.group_id and Milvus collections)"
            )

    def _poll_once(self, max_events: int | None) -> int:
        limit = self.batcher.room()
        if max_events is not None:
            limit = min(limit, max_events - self.summary.consumed)
        t0 = time.perf_counter()
        try:
            polled = self.consumer.poll(timeout_ms=20 if self.sink.in_flight else 100, max_records=max(limit, 1))
        except KafkaError as exc:
            self.observer.on_error("poll", exc)
            time.sleep(0.5)
            return 0
        t1 = time.perf_counter()
        if self.gate.paused or limit <= 0:
            self.gate.hold_back(polled)  # leaked through a rebalance, or no room: read again later
            return 0
        n = 0
        for tp, records in polled.items():
            for rec in records:
                self._take(rec, tp)
                n += 1
        if n:
            self._io_seconds["poll"] += t1 - t0
            self._io_seconds["decode"] += time.perf_counter() - t1
            self.summary.consumed += n
            self.observer.on_consumed(n)
        return n

    def _take(self, rec: ConsumerRecord, tp: TopicPartition) -> None:
        self.gate.taken(tp.topic, tp.partition, rec.offset)
        self.batcher.add_offset((tp.topic, tp.partition), rec.offset)
        try:
            event = self.codec.decode(rec.value)
        except InvalidEvent as exc:
            self.dlq.send(rec.key, rec.value, exc.reason, exc.detail, tp.topic, tp.partition, rec.offset)
            self._invalid_in_batch += 1
            self.summary.invalid += 1
            self.observer.on_invalid(exc.reason, exc.detail)
            return
        self.batcher.add(event, record_ts_ms=rec.timestamp or 0)

    def _process(self) -> None:
        """Evaluate, train and hand the batch's rows to the sink; its offsets count once Milvus acknowledges."""
        ranges = self.batcher.ranges()
        batch, record_ts, offsets = self.batcher.take()
        invalid, self._invalid_in_batch = self._invalid_in_batch, 0
        stages, self._io_seconds = self._io_seconds, {"poll": 0.0, "decode": 0.0, "checkpoint": 0.0}
        report = TrainReport(loss=float("nan"), steps=0)
        empty = np.empty(0, np.int64)
        t0 = time.perf_counter()
        action = None
        if len(batch):
            score = self.observer.before_train(batch)
            action = self._guard(score)
            t1 = time.perf_counter()
            report = self.model.fit_batch(batch)
            self._last_loss = report.loss
            t2 = time.perf_counter()
            due = self._refresh_slice()
            items, users = np.union1d(batch.item_ids, due["item"]), np.union1d(batch.user_ids, due["user"])
            job = self._prepare(items, users, (batch.user_ids, batch.item_ids))
            stages.update(evaluate=t1 - t0, train=t2 - t1, embed=time.perf_counter() - t2)
        else:  # only dead letters: nothing to write, but their offsets advance in order with the rest
            job = self._prepare(empty, empty, (empty, empty))
        self._retrying("dlq", lambda: self.dlq.flush(timeout_s=5.0))  # letters are durable before any commit
        job.context = _Pending(batch, record_ts, report, offsets, ranges, stages, invalid)
        self._submit(job)
        if len(batch):
            for variant in self.variants:  # shadow A/B: same batch, own model and collections, after the served one
                hits, evaluated = variant.learn(batch)
                self._retrying("publish", lambda v=variant: v.publish_batch(batch))
                self.observer.on_variant(variant.name, hits, evaluated, variant.seconds)
        if action in ("resume", "rollback"):
            self.republish_all()  # Milvus equals the model again (after a hold, or at the restored weights)

    def _guard(self, score: tuple[int, int] | None) -> str | None:
        """Feed the batch's prequential score to the guard; snapshot or roll back the model as it says."""
        if self.guard is None or score is None:
            return None
        action = self.guard.observe(*score, loss=self._last_loss)
        if action is None and self.guard.mode == "rollback" and not self.guard.holding:
            self._since_snapshot += 1
            if self._snapshot is None or self._since_snapshot >= self.snapshot_every:
                self._snapshot = copy.deepcopy(self.model.state_dict())  # it just scored healthily: a good state
                self._since_snapshot = 0
        if action == "rollback" and self._snapshot is not None:
            self.model.load_state_dict(copy.deepcopy(self._snapshot))
            log.warning("recall guard: rolled the model back to its last healthy snapshot (v%d)", self.model.version)
        elif action is not None:
            log.warning("recall guard: %s", "holding Milvus writes" if action == "hold" else "publishing again")
        if action is not None:
            self.observer.on_guard(action, self.guard.holding)
        return action

    def _prepare(self, items: np.ndarray, users: np.ndarray, interactions: tuple[np.ndarray, np.ndarray]) -> UpsertJob:
        """The model's vectors for ``items``/``users`` as a job, refusing non-finite or mis-sized ones."""
        if not len(items) and not len(users):  # a batch of dead letters only: nothing to embed or write
            none = np.empty((0, self.publisher.store.dim), np.float32)
            return self.publisher.prepare(self.model.version, items, none, users, none, interactions)
        item_vecs, user_vecs = self.model.item_embeddings(items), self.model.user_embeddings(users)
        if not (np.isfinite(item_vecs).all() and np.isfinite(user_vecs).all()):
            raise DivergedModel(f"non-finite embeddings at model version {self.model.version}; not publishing")
        dim = self.publisher.store.dim
        if (len(items) and item_vecs.shape[1] != dim) or (len(users) and user_vecs.shape[1] != dim):
            raise ValueError(f"the model makes {item_vecs.shape[1]}-d vectors; the Milvus collections hold {dim}-d")
        job = self.publisher.prepare(self.model.version, items, item_vecs, users, user_vecs, interactions)
        job.hold = self.guard is not None and self.guard.holding
        return job

    def _submit(self, job: UpsertJob) -> None:
        """Hand ``job`` to the sink, waiting (consumption paused, membership kept) while it is full."""
        t0 = time.perf_counter()
        while not self.sink.has_room():
            if self.stop_event.is_set() and self.sink.failing:
                raise Stopped("Milvus still failing")
            self._backpressure()
            self._wait(0.02)
            self._collect()
        self.sink.submit(job)
        if job.context is not None:
            job.context.stages["queue"] = time.perf_counter() - t0

    def _backpressure(self) -> None:
        """Pause consumption while the sink is failing or full; resume when it has room again."""
        if self.sink.failing or not self.sink.has_room():
            if "publish" not in self.gate.reasons:
                self.gate.pause("publish")
        elif "publish" in self.gate.reasons:
            self.gate.resume("publish")

    def _apply_acks(self) -> int:
        """Apply acknowledged jobs in order: served state, offsets, audit log, observers; returns batches."""
        try:
            done = self.sink.completed()
        except SinkStopped as exc:
            raise Stopped(str(exc)) from exc
        batches = 0
        for job in done:
            published = self.publisher.acknowledged(job)
            pending: _Pending | None = job.context
            if pending is None:
                continue  # a re-publish of known embeddings
            batches += 1
            self.offsets.update(pending.offsets)
            if self.audit_log is not None:
                self.audit_log.writelines(f"{t} {p} {lo} {hi}\n" for (t, p), (lo, hi) in pending.ranges.items())
                self.audit_log.flush()
            self.summary.batches += 1
            self.summary.trained += len(pending.batch)
            if len(pending.batch):
                pending.stages["publish"] = sum(job.upsert_seconds.values())
                self.observer.after_batch(
                    BatchResult(
                        pending.batch,
                        pending.record_ts,
                        pending.report,
                        published,
                        job.acked_at,
                        pending.stages,
                        pending.invalid,
                    )
                )
        return batches

    def _collect(self) -> None:
        """Apply acknowledgements; checkpoint (after draining what is in flight) or commit when due."""
        batches = self._apply_acks()
        if not batches:
            return
        if self.checkpointer is None:
            self._commit(self.offsets)
            return
        self.checkpointer.note_batches(batches)
        if self.checkpointer.due():
            self._drain()
            self._save()

    def _drain(self) -> None:
        """Wait until the sink acknowledged every submitted job (polling, paused, to keep the membership)."""
        while self.sink.in_flight:
            if self.stop_event.is_set() and self.sink.failing:
                raise Stopped("Milvus still failing")
            self._backpressure()
            self._wait(0.02)
            if self.checkpointer is not None:
                self.checkpointer.note_batches(self._apply_acks())
            else:
                self._apply_acks()
        self._apply_acks()

    def _save(self, force: bool = False) -> None:
        """Checkpoint (everything trained is acknowledged: the caller drained), then commit what it holds."""
        if self.checkpointer is None:
            self._commit(self.offsets)
        elif force or self.checkpointer.due():
            t0 = time.perf_counter()
            self.checkpointer.save(self.offsets)
            self._commit(self.offsets)
            self._io_seconds["checkpoint"] += time.perf_counter() - t0

    def republish_all(self, chunk: int = 5000) -> None:
        """Queue every known item and user at the model's current version, in chunks, to the sink.

        Run after a restore and at a clean stop: a batch publishes only the ids it touched, while shared
        parameters (user histories, spectral refits, the popularity prior) move others too.
        """
        empty = np.empty(0, np.int64)
        items, users = self.model.known_items(), self.model.known_users()
        for start in range(0, max(len(items), len(users)), chunk):
            self._submit(self._prepare(items[start : start + chunk], users[start : start + chunk], (empty, empty)))

    def _refresh_slice(self) -> dict[str, np.ndarray]:
        """The rolling refresh's next slice of known ids, written with the batch so none is older than the bound."""
        known = {"item": self.model.known_items(), "user": self.model.known_users()}
        if self.refresh is None:
            return {role: ids[:0] for role, ids in known.items()}
        return self.refresh.next_slice(known, time.monotonic())

    def _retrying(self, op: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it succeeds, pausing consumption meanwhile; ``stop()`` ends it with ``Stopped``."""
        backoff = 0.5
        while True:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - any sink/broker failure is retried, never fatal
                self.observer.on_error(op, exc)
                if op not in self.gate.reasons:
                    log.warning("%s failed (%s); pausing consumption and retrying with backoff", op, exc)
                    self.gate.pause(op)
                if self.stop_event.is_set():
                    raise Stopped(f"{op} still failing: {exc}") from exc
                self._wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            if op in self.gate.reasons:
                log.info("%s recovered", op)
                self.gate.resume(op)
            return result

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds`` (less if stopped) while polling to keep the group membership alive."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop_event.is_set():
            self.observer.on_tick(time.monotonic())  # status lines go on during an outage
            try:
                polled = self.consumer.poll(timeout_ms=200, max_records=1)
            except KafkaError:
                time.sleep(0.2)
                continue
            self.gate.hold_back(polled)

    def _commit(self, offsets: Offsets) -> None:
        """Commit ``offsets`` that are ahead of this process's last commit (never backwards)."""
        ahead = {tp: o for tp, o in offsets.items() if o > self._committed.get(tp, -1)}
        if not ahead:
            return
        meta = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in ahead.items()}
        try:
            self.consumer.commit(meta, timeout_ms=5000)  # retried with the next checkpoint anyway
        except (CommitFailedError, KafkaError) as exc:
            # The checkpoint holds these offsets; a restart resumes from it whatever Kafka has.
            self.observer.on_error("commit", exc)
            log.warning("offset commit failed (%s); the checkpoint still holds the position", exc)
            return
        self._committed.update(ahead)

    def _report_lag(self, now: float) -> None:
        if now - self._last_lag < self.lag_interval_s:
            return
        self._last_lag = now
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        try:
            ends = self.consumer.end_offsets(assigned, timeout_ms=2000)  # never stall the loop for long
            lag = {tp.partition: max(ends[tp] - (self.consumer.position(tp) or 0), 0) for tp in assigned}
        except KafkaError as exc:
            self.observer.on_error("lag", exc)
            return
        self.observer.on_lag(lag)
