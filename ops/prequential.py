"""Prequential (test-then-train) evaluation against the served embeddings: Recall@K and NDCG@K, cold vs warm."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from ebrflow.indexer.mirror import EmbeddingMirror
from ebrflow.indexer.seen import SeenItems
from ebrflow.model.base import Batch


@dataclass
class Score:
    """Hits, NDCG sum and count of scored events for one segment."""

    hits: int = 0
    ndcg: float = 0.0
    n: int = 0

    @property
    def recall(self) -> float | None:
        """Hit rate, or None when nothing was scored."""
        return self.hits / self.n if self.n else None

    def add(self, other: Score) -> None:
        """Accumulate another score."""
        self.hits += other.hits
        self.ndcg += other.ndcg
        self.n += other.n


@dataclass
class Evaluation:
    """One batch's scores by segment (``all``, ``cold``, ``warm``)."""

    all: Score
    cold: Score
    warm: Score


class PrequentialEvaluator:
    """Before a batch trains, asks for each (sampled) event: is its item in the user's served top-K?

    The top-K comes from the published mirrors (what Milvus serves), with the user's already-seen
    items excluded, so only events with an item new to the user are scored (a repeat cannot rank).
    A user without a published embedding scores a miss. A user is *cold* with at most
    ``cold_max_events`` prior events. At most ``sample`` events per batch are scored (uniformly).
    """

    def __init__(
        self,
        items: EmbeddingMirror,
        users: EmbeddingMirror,
        seen: SeenItems,
        k: int = 20,
        cold_max_events: int = 5,
        sample: int = 256,
        seed: int = 0,
    ) -> None:
        self.items = items
        self.users = users
        self.seen = seen
        self.k = k
        self.cold_max_events = cold_max_events
        self.sample = sample
        self._prior: Counter[int] = Counter()
        self._rng = np.random.default_rng(seed)
        self.total = Evaluation(Score(), Score(), Score())

    def evaluate(self, batch: Batch) -> Evaluation:
        """Score a sample of ``batch`` and then count its events as prior history."""
        idx = self._novel_sample(batch)
        users, items = batch.user_ids[idx], batch.item_ids[idx]
        prior = np.array([self._prior[u] for u in users.tolist()], dtype=np.int64)
        cold = prior <= self.cold_max_events
        ranks = self._ranks(users, items)
        hit = ranks >= 0
        gains = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
        result = Evaluation(
            all=Score(int(hit.sum()), float(gains.sum()), len(idx)),
            cold=Score(int(hit[cold].sum()), float(gains[cold].sum()), int(cold.sum())),
            warm=Score(int(hit[~cold].sum()), float(gains[~cold].sum()), int((~cold).sum())),
        )
        self._prior.update(batch.user_ids.tolist())
        for mine, theirs in (
            (self.total.all, result.all),
            (self.total.cold, result.cold),
            (self.total.warm, result.warm),
        ):
            mine.add(theirs)
        return result

    def _novel_sample(self, batch: Batch) -> np.ndarray:
        """Up to ``sample`` indices, uniformly among events whose item is new to the user, in batch order.

        Events are visited in random order and checked only until the sample is full, so the per-event
        seen-items lookup is not paid for the whole batch.
        """
        users, items = batch.user_ids.tolist(), batch.item_ids.tolist()
        picked: list[int] = []
        for i in self._rng.permutation(len(batch)).tolist():
            if items[i] not in self.seen.get(users[i]):
                picked.append(i)
                if len(picked) == self.sample:
                    break
        return np.sort(np.asarray(picked, dtype=np.int64))

    def _ranks(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Rank (0-based) of each event's item in its user's served top-K, -1 if absent."""
        ranks = np.full(len(users), -1, dtype=np.int64)
        vectors, found = self.users.get(users)
        if not found.any() or len(self.items) == 0:
            return ranks
        rows = np.flatnonzero(found)
        exclude = [self.seen.get(u) for u in users[rows].tolist()]
        top = self.items.topk(vectors[rows], self.k, exclude=exclude)
        match = top == items[rows, None]
        has = match.any(axis=1)
        ranks[rows[has]] = match[has].argmax(axis=1)
        return ranks
