"""Publishing a trained batch: fresh embeddings of touched items and users to Milvus, mirrored in process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from indexer.milvus_store import MilvusStore
from indexer.mirror import EmbeddingMirror
from indexer.seen import SeenItems


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


class Publisher:
    """Upserts embeddings and keeps ``items``/``users`` mirrors and the seen-items store equal to Milvus.

    The mirrors and seen store change only after Milvus accepted the rows, so a failed publish
    can be retried as a whole.
    """

    def __init__(self, store: MilvusStore, seen: SeenItems | None = None) -> None:
        self.store = store
        self.items = EmbeddingMirror(store.dim)
        self.users = EmbeddingMirror(store.dim)
        self.seen = seen or SeenItems(store.seen_capacity)

    def forget_newer(self, version: int) -> int:
        """Delete Milvus rows newer than ``version`` and drop them from the mirrors (only at start: empty)."""
        removed = self.store.delete_newer(version)
        if removed and (len(self.items) or len(self.users)):
            raise RuntimeError("forget_newer is for start-up, before anything was published")
        return removed

    def publish(
        self,
        version: int,
        item_ids: np.ndarray,
        item_vectors: np.ndarray,
        user_ids: np.ndarray,
        user_vectors: np.ndarray,
        interactions: tuple[np.ndarray, np.ndarray],
    ) -> Published:
        """Upsert items, then users with their updated seen lists; returns what changed."""
        batch_users, batch_items = interactions
        staged = self.seen.with_added(user_ids, batch_users, batch_items)
        seen_lists = [staged.get(u) for u in user_ids.tolist()]
        t0 = time.perf_counter()
        self.store.upsert(self.store.items, item_ids, item_vectors, version)
        t1 = time.perf_counter()
        self.store.upsert(self.store.users, user_ids, user_vectors, version, seen=seen_lists)
        timings = {"items": t1 - t0, "users": time.perf_counter() - t1}
        self.seen.merge(staged)
        item_prev, item_existed = self.items.update(item_ids, item_vectors)
        user_prev, user_existed = self.users.update(user_ids, user_vectors)
        return Published(
            item_ids,
            item_prev,
            item_existed,
            item_vectors,
            user_ids,
            user_prev,
            user_existed,
            user_vectors,
            version,
            timings,
        )
