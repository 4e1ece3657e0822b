"""The one trainer loop, for one trainer and for every rank: take a batch → evaluate → train → publish →
checkpoint when due → commit. Policies (``stream.policy``) act at named points; the source forms the batches
(``stream.consumer.ConsumerThread``, or ``stream.ranked.RankedSource`` all-gathering every rank's)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TextIO, TypeVar

import numpy as np

from ebrflow.indexer.sink import SinkStopped, UpsertJob
from ebrflow.model.base import Batch, RetrievalModel, TrainReport
from ebrflow.stream.batcher import Taken
from ebrflow.stream.checkpointer import Offsets, Restored
from ebrflow.stream.policy import BatchResult, Observer, Policy, Step
from ebrflow.stream.publishing import Publishing

log = logging.getLogger(__name__)
T = TypeVar("T")


class Source(Protocol):
    """Where batches come from (``ConsumerThread`` for one trainer, ``RankedSource`` for ranks)."""

    consumed: int
    invalid: int

    def start(self, start_offsets: Offsets, from_beginning: bool, max_events: int | None, idle: float | None) -> None:
        """Subscribe and start reading."""

    def take(self, timeout_s: float) -> Taken:
        """The next batch, or ``Taken.nothing`` (``last``: none follows)."""

    def commit(self, offsets: Offsets, wait: bool = False) -> None:
        """Commit acknowledged offsets (never backwards)."""

    def pause(self, reason: str) -> None:
        """Stop fetching until ``resume(reason)``."""

    def resume(self, reason: str) -> None:
        """Drop a pause reason."""

    def held(self) -> tuple[int, int]:
        """(partitions of the topic this process holds, partitions of the topic)."""

    def holding(self) -> bool:
        """Whether this process holds its share of the topic (one trainer: all of it)."""

    def lag(self, report: Callable[[dict[int, int]], None]) -> None:
        """Measure records behind the end per held partition; hand them to ``report``."""

    def end_offsets(self) -> Offsets:
        """The broker's end offset of every partition of the topic."""

    def stop(self) -> None:
        """Read no more; ``take`` reports ``last`` once what was read is handed over."""

    def close(self) -> None:
        """Stop the source's thread."""


class Checkpoints(Protocol):
    """The loop's checkpoint schedule and store (``Checkpointer``, or ``RankCheckpoints`` for ranks)."""

    generation: int | None

    def restore(self) -> Restored | None:
        """Load the newest usable checkpoint."""

    def note_batches(self, n: int) -> None:
        """Count acknowledged batches towards the schedule."""

    def due(self) -> bool:
        """Whether a checkpoint is due."""

    def save(self, offsets: Offsets) -> None:
        """Write the model, seen items and ``offsets``."""


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


class Stopped(Exception):
    """``stop()`` was called while an operation was being retried: exit without committing it."""


class Pipeline:
    """Runs the loop until stopped. What it guarantees (each is tested on the real broker and Milvus):

    - Training of batch n+1 overlaps the Milvus upsert of batch n (``MilvusSink``) and the poll and decode of
      batch n+2 (the consumer thread). A batch's offsets count only once Milvus acknowledged it; a checkpoint
      waits for every batch in flight.
    - Kafka offsets are committed only together with a checkpoint (or after each acknowledged batch without
      checkpoints), so the committed position never runs ahead of a state that can be restored; on start every
      partition is positioned from the restored checkpoint, and Milvus rows of a newer, lost model are deleted.
    - Failures are retried with exponential backoff while consumption is paused; ``stop()`` interrupts any
      retry, and nothing unacknowledged is committed.
    """

    def __init__(
        self,
        source: Source,
        model: RetrievalModel,
        publishing: Publishing,
        observer: Observer,
        checkpoints: Checkpoints | None = None,
        policies: Iterable[Policy] = (),
        audit_log: TextIO | None = None,
        fit: Callable[[Batch], TrainReport] | None = None,
    ) -> None:
        self.source, self.model, self.publishing, self.observer = source, model, publishing, observer
        self.checkpoints, self.policies, self.audit_log = checkpoints, list(policies), audit_log
        self.fit = fit or model.fit_batch  # ranks: the replicated, gradient-averaged step
        self.publisher = publishing.publisher
        self.offsets: Offsets = {}  # acknowledged: the next untrained offset per partition
        self.restored: Restored | None = None
        self.synced = False  # Milvus equals the restored model; batches may be trained
        self.stop_event = threading.Event()
        self.summary = RunSummary()
        self._running = False
        self._checkpoint_s = self._observe_s = 0.0  # checkpoint and observer seconds, reported with the next batch

    def stop(self) -> None:
        """Finish the current batch and exit (interrupts retries: then nothing more is committed)."""
        self.stop_event.set()
        self.source.stop()

    def readiness(self) -> dict[str, bool]:
        """What ``/readyz`` checks: the loop runs, it holds its partitions, Milvus accepts writes."""
        return {
            "running": self._running and not self.stop_event.is_set(),
            "partitions": self.synced and self.source.holding(),
            "milvus": self.publishing.sink is not None and not self.publishing.failing,
        }

    def run(self, max_events: int | None = None, idle_exit_s: float | None = None) -> RunSummary:
        """Consume until ``stop()``, ``max_events`` records, or ``idle_exit_s`` without records once the consumer
        holds its partitions (the group join and the wait for the whole topic are not idle time)."""
        start = time.monotonic()
        self.publishing.open(self.stop_event, lambda exc: self.observer.on_error("publish", exc))
        try:
            self._start(max_events, idle_exit_s)
            while True:
                now = time.monotonic()
                self.observer.on_tick(now)
                if not self.synced and not self._sync(now):
                    if self.stop_event.is_set():
                        break
                    self._wait(0.05)
                    continue
                self._collect()  # acknowledged batches: offsets, audit, observers; checkpoint and commit when due
                if not self.publishing.sink.has_room():
                    self._wait(0.02)  # backpressure: the consumer thread's backlog fills, then it pauses
                    continue
                taken = self.source.take(timeout_s=0.1)
                if not taken.empty:
                    self._step(taken)
                for policy in self.policies:
                    policy.on_tick(self, now)
                if taken.last:
                    break
            self._finish()
        except Stopped as exc:
            log.warning("stopped during a retry (%s): nothing after the last commit was committed", exc)
        finally:
            self._running = False
            self.publishing.close()
            self.summary.consumed, self.summary.invalid = self.source.consumed, self.source.invalid
            self.summary.seconds = time.monotonic() - start
        return self.summary

    def _start(self, max_events: int | None, idle_exit_s: float | None) -> None:
        """Restore the checkpoint; start the source from its offsets (a partition it does not name: from its
        beginning, as the restored model has seen none of it)."""
        restored = self.restored = self.checkpoints.restore() if self.checkpoints is not None else None
        if restored is not None:
            self.offsets.update(restored.offsets)
        for policy in self.policies:
            policy.on_start(self)
        from_beginning = self.checkpoints is not None and (restored is None or restored.source == "run")
        self.source.start(dict(restored.offsets) if restored else {}, from_beginning, max_events, idle_exit_s)
        self._running = True

    def _sync(self, now: float) -> bool:
        """Once every policy is ready: make Milvus equal the restored model (policies pick the collections, then
        rows of a lost, newer run are deleted and every embedding is re-published)."""
        if not all(policy.ready(self, now) for policy in self.policies):
            return False
        for policy in self.policies:
            policy.on_sync(self)
        if self.checkpoints is not None:
            version = self.model.version
            removed = self.retrying("publish", lambda: self.publishing.forget_newer(version))
            if removed:
                log.warning("deleted %d Milvus rows newer than the restored model (version %d)", removed, version)
            self.republish_all()
        self.synced = True
        return True

    def _step(self, taken: Taken) -> None:
        """Evaluate, train and queue the batch's rows for Milvus; its offsets count once Milvus acknowledges."""
        step = Step(taken.batch)
        stages = {**taken.io_seconds, "checkpoint": self._checkpoint_s, "observe": self._observe_s}
        self._checkpoint_s = self._observe_s = 0.0
        interactions = (step.batch.user_ids, step.batch.item_ids)
        if len(step.batch):
            t0 = time.perf_counter()
            step.score = self.observer.before_train(step.batch)
            for policy in self.policies:
                policy.before_train(self, step)
            t1 = time.perf_counter()
            step.report = self.fit(step.batch)
            t2 = time.perf_counter()
            for policy in self.policies:
                policy.before_publish(self, step)
            job = self.publishing.prepare(self.model, step.items, step.users, interactions)
            stages.update(evaluate=t1 - t0, train=t2 - t1, embed=time.perf_counter() - t2)
        else:  # only dead letters: nothing to write, but their offsets advance in order with the rest
            job = self.publishing.prepare(self.model, step.items, step.users, interactions)
        job.context = (taken, step.report, stages)
        self.submit(job)
        if len(step.batch):
            for policy in self.policies:
                policy.after_publish(self, step)
        if step.republish:
            self.republish_all()  # Milvus equals the model again (after a hold, or at the restored weights)

    def _finish(self) -> None:
        """Drain, re-publish every embedding (shared parameters moved ids no batch touched), checkpoint."""
        self.drain()
        if self.summary.batches:
            self.republish_all()
        for policy in self.policies:
            policy.on_finish(self)
        if self.summary.batches:
            self.drain()
            self._save(force=True)

    def submit(self, job: UpsertJob) -> None:
        """Hand ``job`` to the sink, waiting (consumption paused, acknowledgements applied) while it is full."""
        t0 = time.perf_counter()
        while not self.publishing.sink.has_room():
            if self.stop_event.is_set() and self.publishing.failing:
                raise Stopped("Milvus still failing")
            self._wait(0.02)
            self._collect()
        self.publishing.sink.submit(job)
        if job.context is not None:
            job.context[2]["queue"] = time.perf_counter() - t0

    def _apply_acks(self) -> int:
        """Apply acknowledged jobs in order: served state, offsets, audit log, observers; returns batches."""
        try:
            done = self.publishing.sink.completed()
        except SinkStopped as exc:
            raise Stopped(str(exc)) from exc
        batches = 0
        for job in done:
            published = self.publisher.acknowledged(job)
            if job.context is None:
                continue  # a re-publish of known embeddings
            taken, report, stages = job.context
            batches += 1
            self.offsets.update(taken.offsets)
            if self.audit_log is not None and taken.ranges:
                self.audit_log.writelines(f"{t} {p} {lo} {hi}\n" for (t, p), (lo, hi) in taken.ranges.items())
                self.audit_log.flush()
            self.summary.batches += 1
            self.summary.trained += taken.own
            if len(taken.batch):
                stages["publish"] = sum(job.upsert_seconds.values())
                t0 = time.perf_counter()
                self.observer.after_batch(
                    BatchResult(
                        taken.batch, taken.record_ts, report, published, job.acked_at, stages, taken.invalid, taken.own
                    )
                )
                self._observe_s += time.perf_counter() - t0
        return batches

    def _collect(self) -> None:
        """Apply acknowledgements; checkpoint (after draining what is in flight) or commit when due."""
        batches = self._apply_acks()
        if not batches:
            return
        if self.checkpoints is None:
            self.source.commit(self.offsets)
            return
        self.checkpoints.note_batches(batches)
        if self.checkpoints.due():
            self.drain()
            self._save()

    def drain(self) -> None:
        """Wait until the sink acknowledged every submitted job."""
        while self.publishing.sink.in_flight:
            if self.stop_event.is_set() and self.publishing.failing:
                raise Stopped("Milvus still failing")
            self._wait(0.02)
            batches = self._apply_acks()
            if self.checkpoints is not None:
                self.checkpoints.note_batches(batches)
        batches = self._apply_acks()
        if self.checkpoints is not None:
            self.checkpoints.note_batches(batches)

    def _save(self, force: bool = False) -> None:
        """Checkpoint (everything trained is acknowledged: the caller drained), then commit what it holds."""
        if self.checkpoints is None:
            self.source.commit(self.offsets, wait=force)
        elif force or self.checkpoints.due():
            t0 = time.perf_counter()
            for policy in self.policies:
                policy.at_checkpoint(self)
            self.checkpoints.save(self.offsets)
            self.source.commit(self.offsets, wait=force)
            self._checkpoint_s += time.perf_counter() - t0

    def republish_all(self, chunk: int = 5000) -> None:
        """Queue every known item and user at the model's current version, in chunks, to the sink."""
        empty = np.empty(0, np.int64)
        items, users = self.model.known_items(), self.model.known_users()
        for start in range(0, max(len(items), len(users)), chunk):
            part_items, part_users = items[start : start + chunk], users[start : start + chunk]
            self.submit(self.publishing.prepare(self.model, part_items, part_users, (empty, empty)))

    def retrying(self, op: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it succeeds, pausing consumption meanwhile; ``stop()`` ends it with ``Stopped``."""
        backoff, paused = 0.5, False
        while True:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - any sink/broker failure is retried, never fatal
                self.observer.on_error(op, exc)
                if not paused:
                    log.warning("%s failed (%s); pausing consumption and retrying with backoff", op, exc)
                    self.source.pause(op)
                    paused = True
                if self.stop_event.is_set():
                    raise Stopped(f"{op} still failing: {exc}") from exc
                self._wait(backoff)
                backoff = min(backoff * 2, self.publishing.max_backoff_s)
                continue
            if paused:
                log.info("%s recovered", op)
                self.source.resume(op)
            return result

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds`` (less if stopped); the consumer thread keeps the group membership."""
        if self.stop_event.is_set():  # stopping: still wait a little (draining) without spinning
            time.sleep(min(seconds, 0.01))
            return
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self.stop_event.is_set():
            self.observer.on_tick(time.monotonic())  # status lines go on during an outage
            self.stop_event.wait(min(left, 0.2))
