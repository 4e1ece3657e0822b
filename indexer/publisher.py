"""Publishing a trained batch: fresh embeddings of touched items and users to Milvus, mirrored in process."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ebrflow.indexer.milvus_store import MilvusStore
from ebrflow.indexer.mirror import EmbeddingMirror
from ebrflow.indexer.seen import SeenItems
from ebrflow.indexer.sink import UpsertJob, write


@dataclass
class Published:
    """What one publish changed: ids and their previous served vectors (for drift), per collection."""

    item_ids: np.ndarray
    item_previous: np.ndarray
    item_existed: np.ndarray
    item_vectors: np.ndarray
    user_ids: np.ndarray
    user_previous: np.ndarray
    user_existed: np.ndarray
    user_vectors: np.ndarray
    version: int
    upsert_seconds: dict[str, float] = field(default_factory=dict)
    held: bool = False  # the recall guard held the write: Milvus kept its rows, only the mirrors changed


class Publisher:
    """The served-state view: ``items``/``users`` mirrors of what Milvus holds, and each user's seen items.

    ``prepare`` turns a trained batch into an ``UpsertJob`` (the seen store learns the batch's interactions
    at once: they happened); the ``MilvusSink`` writes it; ``acknowledged`` then updates the mirrors, so they
    only ever hold rows Milvus accepted. ``publish`` writes and acknowledges a prepared job synchronously.
    """

    def __init__(self, store: MilvusStore, seen: SeenItems | None = None) -> None:
        self.store = store
        self.items = EmbeddingMirror(store.dim)
        self.users = EmbeddingMirror(store.dim)
        self.seen = seen or SeenItems(store.seen_capacity)
        self._jobs = 0  # jobs prepared so far: a job's sequence number
        self._changed_at: dict[int, int] = {}  # user → the job that last changed the user's seen list
        self._current: set[int] = set()  # users whose Milvus row holds their current seen list

    def forget_newer(self, version: int) -> int:
        """Delete Milvus rows newer than ``version`` (only at start-up, before anything was published)."""
        if len(self.items) or len(self.users):
            raise RuntimeError("forget_newer is for start-up, before anything was published")
        return self.store.delete_newer(version)

    def forget(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        """Forget expired ids: mirrors, seen lists and which users' lists Milvus holds (their rows are deleted)."""
        self.items.remove(item_ids)
        self.users.remove(user_ids)
        self.seen.remove(user_ids, item_ids)
        for u in np.asarray(user_ids).tolist():
            self._changed_at.pop(u, None)
            self._current.discard(u)

    def prepare(
        self,
        version: int,
        item_ids: np.ndarray,
        item_vectors: np.ndarray,
        user_ids: np.ndarray,
        user_vectors: np.ndarray,
        interactions: tuple[np.ndarray, np.ndarray],
    ) -> UpsertJob:
        """The rows to write for a batch: vectors at ``version``, and seen lists only where Milvus may lack the
        current one (users with interactions in this batch, or whose list no acknowledged, unheld write carried
        since it last changed); the others are partial updates of the vector alone: a rolling refresh re-sends
        vectors, and a 1,024-id list per user would be most of its bytes."""
        batch_users, batch_items = interactions
        self.seen.add(batch_users, batch_items)
        self._jobs += 1
        for u in set(batch_users.tolist()):
            self._changed_at[u] = self._jobs
            self._current.discard(u)
        current = self._current
        seen_lists = [None if u in current else self.seen.get(u) for u in user_ids.tolist()]
        return UpsertJob(version, item_ids, item_vectors, user_ids, user_vectors, seen_lists, seq=self._jobs)

    def acknowledged(self, job: UpsertJob) -> Published:
        """Milvus accepted ``job``: mirror its rows; returns what changed (previous vectors, for drift)."""
        if not job.hold and job.seen is not None:  # the seen lists written are current unless a later job changed them
            for u, seen in zip(job.user_ids.tolist(), job.seen):
                if seen is not None and self._changed_at.get(u, 0) <= job.seq:
                    self._current.add(u)
                    self._changed_at.pop(u, None)
        item_prev, item_existed = self.items.update(job.item_ids, job.item_vectors, job.acked_at)
        user_prev, user_existed = self.users.update(job.user_ids, job.user_vectors, job.acked_at)
        return Published(
            job.item_ids,
            item_prev,
            item_existed,
            job.item_vectors,
            job.user_ids,
            user_prev,
            user_existed,
            job.user_vectors,
            job.version,
            job.upsert_seconds,
            job.hold,
        )

    def publish(self, job: UpsertJob) -> Published:
        """Write a prepared job and acknowledge it, in the calling thread (benchmarks and tools)."""
        write(self.store, job)
        return self.acknowledged(job)
