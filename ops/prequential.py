"""Prequential (test-then-train) evaluation: the one core shared by the live trainer, ``bench/`` and the tests.

``Prequential`` decides which of a batch's events are scored (novel to their user, sampled reproducibly per batch),
splits them cold/warm by the user's prior events and accumulates Recall@K and NDCG@K from the ranks the caller
found. Where a top-K comes from is the caller's: the served mirrors in the trainer (``PrequentialEvaluator``), a
method's score matrix in ``bench/common.py``. ``top_k`` and ``ranks_in`` are the two ranking primitives.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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
    """Scores by segment (``all``, ``cold``, ``warm``): one batch's, or a running total."""

    all: Score = field(default_factory=Score)
    cold: Score = field(default_factory=Score)
    warm: Score = field(default_factory=Score)

    @classmethod
    def of(cls, ranks: np.ndarray, cold: np.ndarray) -> Evaluation:
        """Segment scores of events with 0-based ``ranks`` in their top-K (-1: missed) and a ``cold`` mask.

        >>> e = Evaluation.of(np.array([0, -1, 1]), np.array([True, False, False]))
        >>> (e.all.hits, e.all.n, e.cold.hits, e.warm.recall, round(e.all.ndcg, 3))
        (2, 3, 1, 0.5, 1.631)
        """
        hit = ranks >= 0
        gain = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)

        def part(mask: np.ndarray) -> Score:
            return Score(int(hit[mask].sum()), float(gain[mask].sum()), int(mask.sum()))

        return cls(part(np.ones(len(ranks), dtype=bool)), part(cold), part(~cold))

    def add(self, other: Evaluation) -> None:
        """Accumulate another evaluation, segment by segment."""
        self.all.add(other.all)
        self.cold.add(other.cold)
        self.warm.add(other.warm)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` best finite scores, best first (-1 pads rows with fewer).

    >>> top_k(np.array([[0.1, 0.9, -np.inf], [0.5, 0.2, 0.7]]), 2).tolist()
    [[1, 0], [2, 0]]
    """
    kk = min(k, scores.shape[1])
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    top[~np.isfinite(np.take_along_axis(vals, order, axis=1))] = -1
    return np.pad(top, ((0, 0), (0, k - kk)), constant_values=-1) if kk < k else top


def ranks_in(top: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of ``targets[i]`` in row ``top[i]`` of a top-K table, -1 where absent.

    >>> ranks_in(np.array([[7, 3], [5, 6]]), np.array([3, 9])).tolist()
    [1, -1]
    """
    ranks = np.full(len(targets), -1, dtype=np.int64)
    if len(targets) == 0:
        return ranks
    match = top == np.asarray(targets)[:, None]
    has = match.any(axis=1)
    ranks[has] = match[has].argmax(axis=1)
    return ranks


class Prequential:
    """Test-then-train bookkeeping: which events of each batch are scored, cold or warm, and the running totals.

    Only events whose item is new to the user are scored (a repeat cannot rank once seen items are excluded); at
    most ``sample`` of them per batch, drawn from ``(seed, batch number)`` so every method fed the same stream is
    scored on the same events. A user is *cold* with at most ``cold_max_events`` prior events.
    """

    def __init__(self, k: int = 20, cold_max_events: int = 5, sample: int | None = None, seed: int = 0) -> None:
        self.k = k
        self.cold_max_events = cold_max_events
        self.sample = sample
        self.seed = seed
        self.batches = 0
        self.prior: Counter[int] = Counter()
        self.total = Evaluation()

    def pick(self, novel: np.ndarray) -> np.ndarray:
        """Sorted indices of the events to score, from the batch's mask of novel events."""
        idx = np.flatnonzero(novel)
        if self.sample is not None and len(idx) > self.sample:
            idx = np.sort(np.random.default_rng([self.seed, self.batches]).choice(idx, self.sample, replace=False))
        return idx

    def record(self, batch: Batch, idx: np.ndarray, ranks: np.ndarray) -> Evaluation:
        """Score the picked events ``idx`` from their ``ranks``, then count the whole batch as prior history."""
        users = batch.user_ids[idx].tolist()
        cold = np.fromiter((self.prior[u] <= self.cold_max_events for u in users), dtype=bool, count=len(users))
        result = Evaluation.of(ranks, cold)
        self.total.add(result)
        self.prior.update(batch.user_ids.tolist())
        self.batches += 1
        return result


class PrequentialEvaluator:
    """Before a batch trains, asks for each (sampled) novel event: is its item in the user's *served* top-K?

    The top-K comes from the published mirrors (what Milvus serves), with the user's served seen items excluded;
    a user without a published embedding scores a miss. Sampling, segments and totals are ``Prequential``'s.
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
        self.core = Prequential(k, cold_max_events, sample, seed)

    @property
    def k(self) -> int:
        """The K of Recall@K."""
        return self.core.k

    @property
    def total(self) -> Evaluation:
        """Scores accumulated since start."""
        return self.core.total

    def evaluate(self, batch: Batch) -> Evaluation:
        """Score a sample of ``batch`` against the served embeddings, then count its events as prior history."""
        idx = self.core.pick(~self.seen.contains(batch.user_ids, batch.item_ids))
        return self.core.record(batch, idx, self._ranks(batch.user_ids[idx], batch.item_ids[idx]))

    def _ranks(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Rank (0-based) of each event's item in its user's served top-K, -1 if absent."""
        ranks = np.full(len(users), -1, dtype=np.int64)
        vectors, found = self.users.get(users)
        if not found.any() or len(self.items) == 0:
            return ranks
        rows = np.flatnonzero(found)
        exclude = [self.seen.get(u) for u in users[rows].tolist()]
        ranks[rows] = ranks_in(self.items.topk(vectors[rows], self.core.k, exclude=exclude), items[rows])
        return ranks


class NoEvaluation(PrequentialEvaluator):
    """Scores nothing: the evaluator of a rank other than 0 (rank 0 scores each batch for the job)."""

    def evaluate(self, batch: Batch) -> Evaluation:
        """An empty score."""
        return Evaluation()
