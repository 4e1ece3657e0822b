"""The trainer loop of one rank among N (``torchrun``): Kafka partitions split by the consumer group, one model kept
identical by ``model.distributed.ReplicatedTrainer``, one Milvus writer per id.

Every rank runs the same cadence: poll its partitions for up to ``batch.max_wait_ms`` (or until the micro-batch is
full) → one collective step (all ranks' events, trained everywhere; a rank with nothing joins with an empty slice)
→ publish the touched ids it owns (``owner(id) == rank``) to Milvus, synchronously → audit log → checkpoint when due.
The step's header carries each rank's stop/idle flags and its next offset per partition, so every rank knows the
global trained position of every partition after each step: a partition that moves to another rank in a rebalance
resumes exactly where the previous owner stopped, and every rank's checkpoint holds every partition's offset.

Checkpoints are per rank (``<data_dir>/rank<r>/checkpoints``) with a global step id; on start the ranks agree on
the newest step every rank saved and restore it (offsets included), then each re-publishes the ids it owns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO, TypeVar

import numpy as np
import torch.distributed as dist
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from ebrflow.indexer.generations import Generations
from ebrflow.indexer.mirror import EmbeddingMirror
from ebrflow.indexer.publisher import Publisher
from ebrflow.model.base import Batch
from ebrflow.model.checkpoint import CheckpointStore, decode
from ebrflow.model.distributed import ReplicatedTrainer, owner, verify_replicas
from ebrflow.stream.batcher import MicroBatcher
from ebrflow.stream.checkpointer import CheckpointMismatch, Offsets, describe_mismatch
from ebrflow.stream.kafka_io import DeadLetterWriter
from ebrflow.stream.pausing import PartitionGate
from ebrflow.stream.pipeline import RunSummary
from ebrflow.stream.refresh import RollingRefresh
from ebrflow.stream.schema import EventCodec, InvalidEvent

log = logging.getLogger(__name__)
T = TypeVar("T")


class ServedScorer(Protocol):
    """Prequential scoring over what all ranks serve (``ops.prequential.PrequentialEvaluator`` is one): the loop
    mirrors every published vector into ``items``/``users`` and calls ``evaluate`` before training a batch."""

    items: EmbeddingMirror
    users: EmbeddingMirror

    def evaluate(self, batch: Batch) -> object:
        """Score the batch against the mirrors, then count it as history."""


class RankCheckpoints:
    """One rank's checkpoints: the (replicated) model and seen items, every partition's offset, the global step."""

    def __init__(self, store: CheckpointStore, trainer: ReplicatedTrainer, publisher: Publisher, fingerprint: dict):
        self.store, self.trainer, self.publisher, self.fingerprint = store, trainer, publisher, fingerprint

    def save(self, step: int, offsets: Offsets, generation: int | None) -> None:
        """Write this rank's checkpoint of global step ``step``."""
        self.store.save(
            {
                "model": self.trainer.served.state_dict(),
                "seen": self.publisher.seen.state_dict(),
                "offsets": {f"{t}:{p}": o for (t, p), o in offsets.items()},
                "step": step,
                "rank": self.trainer.rank,
                "world": self.trainer.world,
                "version": self.trainer.model.version,
                "fingerprint": self.fingerprint,
                "generation": generation,
                "saved_at": time.time(),
            }
        )

    def steps(self) -> dict[int, Path]:
        """Global step → checkpoint file of every checkpoint of this rank that verifies under this configuration."""
        found: dict[int, Path] = {}
        for path, state in self.store.verified():
            if state.get("fingerprint") != self.fingerprint:
                raise CheckpointMismatch(
                    f"checkpoint {path} was written by another model configuration "
                    f"({describe_mismatch(state.get('fingerprint') or {}, self.fingerprint)})"
                )
            found.setdefault(int(state["step"]), path)
        return found

    def restore(self) -> tuple[int, Offsets, int | None] | None:
        """Agree with every rank on a step and load it: (step, offsets, generation), or None to start empty.

        The step is the newest one every rank holding checkpoints saved. A rank without checkpoints (the job grew)
        receives that state from the lowest rank holding it: the model is replicated, so any copy serves.
        """
        try:
            mine: dict[int, Path] | None = self.steps()
        except CheckpointMismatch as exc:
            mismatch, mine = str(exc), None
        every: list[list[int] | None] = [None] * self.trainer.world
        dist.all_gather_object(every, None if mine is None else sorted(mine), group=self.trainer.group)
        if mine is None or any(s is None for s in every):
            raise CheckpointMismatch(
                mismatch if mine is None else "another rank's checkpoint has another configuration"
            )
        holding = [set(s) for s in every if s]
        common = set.intersection(*holding) if holding else set()
        if not common:
            if holding:
                log.warning("rank checkpoints share no step (%s): starting from an empty model", every)
            return None
        step = max(common)
        if all(every):
            state = decode(mine[step].read_bytes())
        else:
            src = min(r for r, s in enumerate(every) if s)
            box = [decode(mine[step].read_bytes()) if self.trainer.rank == src else None]
            dist.broadcast_object_list(box, src=src, group=self.trainer.group)
            state = box[0]
        self.trainer.served.load_state_dict(state["model"])
        self.publisher.seen.load_state_dict(state["seen"])
        offsets: Offsets = {}
        for key, offset in state["offsets"].items():
            topic, _, partition = key.rpartition(":")
            offsets[(topic, int(partition))] = int(offset)
        log.info("rank %d restored step %d (model version %d)", self.trainer.rank, step, self.trainer.model.version)
        return step, offsets, state.get("generation")


@dataclass
class _Local:
    """What this rank consumed for one step."""

    batch: Batch
    ranges: dict[tuple[str, int], tuple[int, int]]
    invalid: int


class RankedLoop:
    """One rank's loop (see the module doc). All ranks must run it together; ``stop()`` stops all after a step."""

    def __init__(
        self,
        consumer: KafkaConsumer,
        topic: str,
        codec: EventCodec,
        dlq: DeadLetterWriter,
        trainer: ReplicatedTrainer,
        publisher: Publisher,
        batcher: MicroBatcher,
        checkpoints: RankCheckpoints | None = None,
        checkpoint_every: int = 50,
        audit_log: TextIO | None = None,
        generations: Generations | None = None,
        max_staleness_s: float | None = 300.0,
        max_backoff_s: float = 30.0,
        evaluator: ServedScorer | None = None,
    ) -> None:
        self.consumer, self.topic, self.codec, self.dlq = consumer, topic, codec, dlq
        self.trainer, self.publisher, self.batcher = trainer, publisher, batcher
        self.checkpoints, self.checkpoint_every, self.audit_log = checkpoints, checkpoint_every, audit_log
        self.generations, self.max_backoff_s = generations, max_backoff_s
        self.evaluator = evaluator  # prequential recall over what all ranks serve (one rank runs it)
        self.refresh = RollingRefresh(max_staleness_s, time.monotonic()) if max_staleness_s else None
        self.gate = PartitionGate(consumer)
        self.summary = RunSummary()
        self.offsets: Offsets = {}  # every partition's next untrained offset, as of the last step (all ranks agree)
        self.step_id = 0  # global steps that trained events (the checkpoint step id)
        self.partitions: list[int] = []
        self._stop = False
        self.owned = (0, 0)  # (items, users) this rank published at its last full re-publish
        self._committed: Offsets = {}
        self._invalid = 0

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.trainer.rank

    def stop(self) -> None:
        """Stop every rank after the current step (the flag rides in the next step's header)."""
        self._stop = True

    def run(self, max_events: int | None = None, idle_exit_s: float | None = None) -> RunSummary:
        """Step with the other ranks until any rank is stopped or reaches ``max_events``, or every rank has been
        idle (no records, partitions held) for ``idle_exit_s``; then a final checkpoint and re-publish."""
        start = time.monotonic()
        self._start()
        last_record = time.monotonic()
        while True:
            local = self._consume(max_events)
            now = time.monotonic()
            if len(local.batch) or local.invalid or not self.gate.joined:
                last_record = now
            done = self._stop or (max_events is not None and self.summary.consumed >= max_events)
            idle = idle_exit_s is not None and now - last_record > idle_exit_s
            headers = self._step(local, done, idle)
            if headers[:, 0].any() or headers[:, 1].all():
                break
        self._finish()
        self.summary.seconds = time.monotonic() - start
        return self.summary

    def _start(self) -> None:
        """Agree on the partition count, restore the common checkpoint, pick the Milvus generation, re-publish."""
        counts = [0] * self.trainer.world
        known = len(self.consumer.partitions_for_topic(self.topic) or ())
        dist.all_gather_object(counts, known, group=self.trainer.group)
        self.partitions = list(range(max(counts)))
        restored = self.checkpoints.restore() if self.checkpoints is not None else None
        generation = None
        if restored is not None:
            self.step_id, self.offsets, generation = restored
        self.gate.start_offsets = dict(self.offsets)
        self.gate.from_beginning = self.checkpoints is not None
        self._choose_generation(generation)
        self.republish_owned()
        self.consumer.subscribe([self.topic], listener=self.gate)

    def _choose_generation(self, restored: int | None) -> None:
        """Rank 0 picks the generation (the restored one, else the served one, else 1, served at once) and deletes
        rows newer than the restored model; every rank then writes it."""
        if self.generations is None:
            return
        choice = [None]
        if self.rank == 0:
            gens = self.generations
            served = gens.served()
            writing = restored or served or max([0, *gens.existing()]) + 1
            self.publisher.store.use_generation(writing)
            if served is None:
                gens.switch(writing)
            removed = self.publisher.forget_newer(self.trainer.model.version)
            if removed:
                log.warning("deleted %d Milvus rows newer than the restored model", removed)
            choice = [writing]
        dist.broadcast_object_list(choice, src=0, group=self.trainer.group)
        if self.rank != 0:
            self.publisher.store.use_generation(int(choice[0]))

    def _consume(self, max_events: int | None) -> _Local:
        """Poll this rank's partitions until the micro-batch is full or ``max_wait`` passed (the step cadence)."""
        deadline = time.monotonic() + self.batcher.max_wait_s
        while self.batcher.room() > 0 and not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            limit = self.batcher.room()
            if max_events is not None:
                limit = min(limit, max_events - self.summary.consumed)
                if limit <= 0:
                    break
            try:
                polled = self.consumer.poll(timeout_ms=max(int(left * 1000), 1), max_records=limit)
            except KafkaError as exc:
                log.warning("poll failed (%s)", exc)
                time.sleep(min(left, 0.5))
                continue
            for tp, records in polled.items():
                for rec in records:
                    self._take(rec, tp)
        ranges = self.batcher.ranges()
        batch, _, _ = self.batcher.take()
        invalid, self._invalid = self._invalid, 0
        return _Local(batch, ranges, invalid)

    def _take(self, rec, tp: TopicPartition) -> None:  # noqa: ANN001 - a kafka-python ConsumerRecord
        self.gate.taken(tp.topic, tp.partition, rec.offset)
        self.batcher.add_offset((tp.topic, tp.partition), rec.offset)
        self.summary.consumed += 1
        try:
            event = self.codec.decode(rec.value)
        except InvalidEvent as exc:
            self.dlq.send(rec.key, rec.value, exc.reason, exc.detail, tp.topic, tp.partition, rec.offset)
            self._invalid += 1
            self.summary.invalid += 1
            return
        self.batcher.add(event, record_ts_ms=rec.timestamp or 0)

    def _step(self, local: _Local, done: bool, idle: bool) -> np.ndarray:
        """One collective step: exchange, train, publish owned ids, audit, checkpoint; returns every rank's flags."""
        if local.invalid:
            self._retrying("dlq", lambda: self.dlq.flush(timeout_s=5.0))
        nexts = [self.gate.next_offsets.get((self.topic, p), -1) for p in self.partitions]
        global_batch, headers = self.trainer.exchange(local.batch, [int(done), int(idle), *nexts])
        if len(global_batch) and self.evaluator is not None:
            self.evaluator.evaluate(global_batch)  # test, then train: against what all ranks serve now
        self.trainer.fit_global(global_batch)
        for p, offset in zip(self.partitions, headers[:, 2:].max(axis=0).tolist()):
            if offset >= 0:
                key = (self.topic, p)
                self.offsets[key] = max(self.offsets.get(key, 0), offset)
                if self.gate.next_offsets.get(key, -1) < offset:
                    self.gate.next_offsets[key] = offset  # moved here in a rebalance: resume after the old owner
        if len(global_batch):
            self.step_id += 1
            self._publish(global_batch)
            self.summary.batches += 1
        self.summary.trained += len(local.batch)
        if self.audit_log is not None and local.ranges:
            self.audit_log.writelines(f"{t} {p} {lo} {hi}\n" for (t, p), (lo, hi) in local.ranges.items())
            self.audit_log.flush()
        if len(global_batch) and self.step_id % self.checkpoint_every == 0:
            self._save()
        return headers

    def _publish(self, batch: Batch) -> None:
        """Upsert the touched (and rolling-refresh) ids this rank owns; every rank records the batch's seen items."""
        model = self.trainer.served
        items, users = np.unique(batch.item_ids), np.unique(batch.user_ids)
        if self.refresh is not None:
            due = self.refresh.next_slice({"item": model.known_items(), "user": model.known_users()}, time.monotonic())
            items, users = np.union1d(items, due["item"]), np.union1d(users, due["user"])
        self._write(items, users, (batch.user_ids, batch.item_ids))

    def republish_owned(self, chunk: int = 5000) -> None:
        """Write every known id this rank owns at the model's current version (after a restore, at the end)."""
        model, world, empty = self.trainer.served, self.trainer.world, np.empty(0, np.int64)
        items, users = model.known_items(), model.known_users()
        self.owned = (int((owner(items, world) == self.rank).sum()), int((owner(users, world) == self.rank).sum()))
        for s in range(0, max(len(items), len(users)), chunk):
            self._write(items[s : s + chunk], users[s : s + chunk], (empty, empty))

    def _write(self, items: np.ndarray, users: np.ndarray, interactions: tuple[np.ndarray, np.ndarray]) -> None:
        """Upsert the ids of ``items``/``users`` this rank owns (synchronously, retried); with an evaluator, mirror
        every one of them as served (each id's owner writes the same replicated vector)."""
        model, world = self.trainer.served, self.trainer.world
        mine_i, mine_u = owner(items, world) == self.rank, owner(users, world) == self.rank
        if self.evaluator is None:
            items, users, mine_i, mine_u = items[mine_i], users[mine_u], mine_i[mine_i], mine_u[mine_u]
        item_vecs, user_vecs = model.item_embeddings(items), model.user_embeddings(users)
        job = self.publisher.prepare(
            model.version, items[mine_i], item_vecs[mine_i], users[mine_u], user_vecs[mine_u], interactions
        )
        self._retrying("publish", lambda: self.publisher.publish(job))
        if self.evaluator is not None:
            self.evaluator.items.update(items, item_vecs, time.time())
            self.evaluator.users.update(users, user_vecs, time.time())

    def _save(self) -> None:
        """Check the replicas agree, checkpoint this rank at the current step, commit its partitions' offsets."""
        if not verify_replicas(self.trainer):
            log.error("replicas diverged at step %d: every rank reloaded rank 0's state", self.step_id)
        if self.checkpoints is not None:
            self.checkpoints.save(self.step_id, self.offsets, self.publisher.store.generation)
        self._commit()

    def _commit(self) -> None:
        """Commit the trained offsets of this rank's partitions (informational: restarts position from checkpoints)."""
        held = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        ahead = {k: o for k, o in self.offsets.items() if k in held and o > self._committed.get(k, -1)}
        if not ahead:
            return
        try:
            self.consumer.commit({TopicPartition(*k): OffsetAndMetadata(o, "", -1) for k, o in ahead.items()})
            self._committed.update(ahead)
        except KafkaError as exc:
            log.warning("offset commit failed (%s); the checkpoint holds the position", exc)

    def _finish(self) -> None:
        """Final checkpoint and re-publish of the owned ids (spectral refits moved ids no batch touched)."""
        if self.summary.batches:
            self.republish_owned()
            self._save()
        self.publisher.store.flush_if_due(force=True)
        dist.barrier(group=self.trainer.group)

    def _retrying(self, op: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it succeeds, with exponential backoff (the other ranks wait in the next collective)."""
        backoff = 0.5
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - Milvus/broker failures are retried, never fatal
                log.warning("%s failed (%s); retrying in %.1f s", op, exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
