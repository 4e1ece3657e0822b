"""What makes the one loop (``stream.pipeline``) run as one rank among N (``torchrun``): how a batch is formed (the
all-gather), which ids a rank writes, and how the ranks agree. The loop, the policies and the checkpoints' schedule
are the single trainer's.

Every rank runs the same cadence: its consumer thread gathers records of the partitions the group gave it; each
``RankedSource.take`` waits up to ``batch.max_wait_ms`` for its local micro-batch (closing the open one at the
deadline) and then all-gathers every rank's (``ReplicatedTrainer.exchange``): a rank with nothing joins with an empty
slice. The exchange's header carries each rank's stop/idle flags, its event count and its next offset per partition,
so every rank knows the trained position of every partition after each step: a partition that moves to another rank
in a rebalance resumes exactly where the previous owner stopped, and every rank's checkpoint holds every
partition's offset. Every rank trains the same global batch into its replica and writes only the ids it owns
(``OwnedStore``, ``OwnIds``); rank 0 mirrors every vector and scores each batch for the job (``SharedScore`` hands
its score to every rank when the recall guard runs, so every rank acts on the same verdict).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch.distributed as dist

from ebrflow.indexer.milvus_store import MilvusStore
from ebrflow.model.distributed import ReplicatedTrainer, owner, verify_replicas
from ebrflow.stream.batcher import Taken
from ebrflow.stream.checkpointer import Offsets
from ebrflow.stream.consumer import ConsumerThread
from ebrflow.stream.policy import Policy, Step

if TYPE_CHECKING:
    from ebrflow.stream.pipeline import Pipeline

log = logging.getLogger(__name__)
T = TypeVar("T")


class RankGroup:
    """The ranks' coordinator (``stream.policy.Coordinator``): rank 0 leads, its decisions are broadcast."""

    def __init__(self, rank: int, world: int, group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world, self.group = rank, world, group
        self.leader = rank == 0

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier(group=self.group)


class OwnedStore:
    """A ``MilvusStore`` that upserts only the rows of ids this rank owns (``owner(id) == rank``: one writer per
    row); everything else goes to the wrapped store."""

    def __init__(self, store: MilvusStore, rank: int, world: int) -> None:
        self._store, self.rank, self.world = store, rank, world

    def upsert(self, collection: str, ids: np.ndarray, vectors: np.ndarray, version: int, seen: Any = None) -> None:
        """Write the owned rows of ``ids``."""
        mine = owner(ids, self.world) == self.rank
        if seen is not None:
            seen = [s for s, m in zip(seen, mine.tolist()) if m]
        self._store.upsert(collection, ids[mine], vectors[mine], version, seen=seen)

    def delete_ids(self, collection: str, ids: np.ndarray) -> int:
        """Delete the owned rows of ``ids``; returns how many."""
        return self._store.delete_ids(collection, ids[owner(ids, self.world) == self.rank])

    def owned(self, ids: np.ndarray) -> int:
        """How many of ``ids`` this rank writes."""
        return int((owner(ids, self.world) == self.rank).sum())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class RankedSource:
    """Forms each step's batch: this rank's micro-batch all-gathered with every other rank's (see the module doc)."""

    def __init__(self, local: ConsumerThread, trainer: ReplicatedTrainer, max_wait_s: float) -> None:
        self.local, self.trainer, self.max_wait_s = local, trainer, max_wait_s
        self.topic = local.topic
        self.partitions: list[int] = []
        self.offsets: Offsets = {}  # every partition's next offset as the job trained it
        self._stop = False
        self._idle_exit_s: float | None = None
        self._last_activity = time.monotonic()

    @property
    def consumed(self) -> int:
        """Records this rank read."""
        return self.local.consumed

    @property
    def invalid(self) -> int:
        """Records this rank dead-lettered."""
        return self.local.invalid

    def start(
        self, start_offsets: Offsets, from_beginning: bool, max_events: int | None, idle_exit_s: float | None
    ) -> None:
        """Agree on the partition count, then start this rank's consumer thread."""
        counts: list[int] = [0] * self.trainer.world
        known = len(self.local.consumer.partitions_for_topic(self.topic) or ())
        dist.all_gather_object(counts, known, group=self.trainer.group)
        self.partitions = list(range(max(counts)))
        self.offsets = dict(start_offsets)
        self._idle_exit_s = idle_exit_s
        self._last_activity = time.monotonic()
        self.local.start(start_offsets, from_beginning, max_events, None)

    def take(self, timeout_s: float) -> Taken:
        """One collective step's batch (every rank calls this in lockstep); ``last`` once any rank is done or
        every rank has been idle (no record, in its group) for ``idle_exit_s``."""
        local = self.local.take(self.max_wait_s, flush=True)
        now = time.monotonic()
        if len(local.batch) or local.invalid or not self.local.joined:
            self._last_activity = now
        done = self._stop or local.last
        idle = self._idle_exit_s is not None and now - self._last_activity > self._idle_exit_s
        nexts = [local.offsets.get((self.topic, p), -1) for p in self.partitions]
        batch, headers = self.trainer.exchange(local.batch, [int(done), int(idle), len(local.batch), *nexts])
        advanced: Offsets = {}
        for p, offset in zip(self.partitions, headers[:, 3:].max(axis=0).tolist() if len(self.partitions) else []):
            key = (self.topic, p)
            if offset > self.offsets.get(key, -1):
                advanced[key] = self.offsets[key] = offset
        self.local.raise_positions(advanced)  # a partition moved here resumes after its previous owner
        record_ts = np.zeros(len(batch), np.int64)  # Kafka timestamps of this rank's rows (the others': unknown)
        start = int(headers[: self.trainer.rank, 2].sum())
        record_ts[start : start + len(local.batch)] = local.record_ts
        last = bool(headers[:, 0].any() or headers[:, 1].all())
        return Taken(batch, record_ts, advanced, local.ranges, local.invalid, len(local.batch), local.io_seconds, last)

    def commit(self, offsets: Offsets, wait: bool = False) -> None:
        """Commit the offsets of this rank's partitions (informational: restarts position from checkpoints)."""
        self.local.commit(offsets, wait)

    def pause(self, reason: str) -> None:
        """Pause this rank's consumption."""
        self.local.pause(reason)

    def resume(self, reason: str) -> None:
        """Resume this rank's consumption."""
        self.local.resume(reason)

    def held(self) -> tuple[int, int]:
        """(partitions this rank holds, partitions of the topic)."""
        return self.local.held()

    def holding(self) -> bool:
        """This rank is in the group (it may hold no partition: more ranks than partitions)."""
        return self.local.joined

    def lag(self, report: Callable[[dict[int, int]], None]) -> None:
        """Lag of this rank's partitions."""
        self.local.lag(report)

    def end_offsets(self) -> Offsets:
        """The broker's end offsets of every partition."""
        return self.local.end_offsets()

    def stop(self) -> None:
        """Stop every rank after the current step (the flag rides in the next step's header)."""
        self._stop = True
        self.local.stop()

    def close(self) -> None:
        """Stop this rank's consumer thread."""
        self.local.close()


class SharedScore(Policy):
    """Ranks with the recall guard: rank 0's prequential score of each batch on every rank (only rank 0 scores), so
    every rank's guard reaches the same verdict at the same batch. Put it before the guard."""

    def __init__(self, group: RankGroup) -> None:
        self.group = group

    def before_train(self, loop: Pipeline, step: Step) -> None:
        """Replace this rank's score with rank 0's."""
        step.score = self.group.share(step.score)


class OwnIds(Policy):
    """A rank other than 0 embeds and mirrors only the ids it writes (rank 0 mirrors every id: it scores for the
    job). Put it last: after the rolling refresh added its ids."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def before_publish(self, loop: Pipeline, step: Step) -> None:
        """Keep the batch's ids this rank owns."""
        step.items = step.items[owner(step.items, self.world) == self.rank]
        step.users = step.users[owner(step.users, self.world) == self.rank]


class ReplicaCheck(Policy):
    """At every checkpoint the ranks compare replica digests; a diverged rank reloads rank 0's state."""

    def __init__(self, trainer: ReplicatedTrainer) -> None:
        self.trainer = trainer

    def at_checkpoint(self, loop: Pipeline) -> None:
        """Verify (and repair) the replicas before they are saved."""
        if not verify_replicas(self.trainer):
            log.error("replicas diverged: every rank reloaded rank 0's state")
