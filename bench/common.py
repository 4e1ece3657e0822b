"""The benchmarks' side of the one prequential evaluation (``ebrflow.ops.prequential`` is its core), plus datasets.

Protocol (identical for every method and for the live trainer; ``Prequential`` picks, segments and totals):
events are replayed in time order in micro-batches of ``batch_size``. For each batch, *before* the method
trains on it, every event whose item is new to its user (not in the user's history from earlier batches;
repeat pairs are not scored) is scored: is the item in the user's top-``k`` over all items seen in earlier
batches, with the user's already-seen items excluded? A user never seen before scores a miss for every method
(nothing to rank with). Cold = at most ``cold_max_events`` prior events. Then the method learns the batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ebrflow.model.base import Batch
from ebrflow.ops.prequential import Evaluation, Prequential, ranks_in, top_k
from ebrflow.stream.generator import EventArrays

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "movielens": (DATA / "movielens-100k" / "u.data.gz", "movielens"),
    "collegemsg": (DATA / "snap-collegemsg" / "CollegeMsg.txt.gz", "snap"),
}


SYNTHETIC = "synthetic"  # the built-in generator with the demo's settings (60,000 events), not a file


def synthetic_events(n_events: int = 60_000) -> EventArrays:
    """The stream ``ebrflow demo`` replays: ``SyntheticStream`` with ``DemoConfig`` defaults."""
    from ebrflow.config import DemoConfig
    from ebrflow.stream.generator import SyntheticStream

    d = DemoConfig()
    gen = SyntheticStream(users=d.users, items=d.items, communities=d.communities, seed=d.seed)
    parts = list(gen.chunks(n_events))
    return EventArrays(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("user_ids", "item_ids", "ts_ms")))


def load_dataset(name: str, limit: int | None = None) -> EventArrays:
    """A shared dataset (or ``SYNTHETIC``) in time order (stable sort), optionally its first ``limit`` events."""
    from ebrflow.stream.replay import read_events

    if name == SYNTHETIC:
        return synthetic_events(limit or 60_000)

    path, fmt = DATASETS[name]
    events = read_events(path, fmt)
    assert isinstance(events, EventArrays)
    if limit is not None:
        events = EventArrays(events.user_ids[:limit], events.item_ids[:limit], events.ts_ms[:limit])
    return events


def batches(events: EventArrays, batch_size: int) -> Iterator[Batch]:
    """Consecutive micro-batches of ``batch_size`` events (weights 1)."""
    for s in range(0, len(events), batch_size):
        e = slice(s, s + batch_size)
        yield Batch.of(events.user_ids[e], events.item_ids[e], ts_ms=events.ts_ms[e])


class Scorer(Protocol):
    """What a method must offer the evaluation: learn a batch, score known users against candidate items."""

    name: str

    def learn(self, batch: Batch) -> None:
        """Train on one micro-batch (after it was scored)."""
        ...

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Preference scores, shape (len(users), len(items)); every user and item appeared in an earlier batch."""
        ...


@dataclass
class BatchScore:
    """One batch's evaluation: stream time, scored events and hits/NDCG overall and for cold users."""

    ts_ms: int
    n: int
    hits: int
    ndcg: float
    n_cold: int
    hits_cold: int
    ndcg_cold: float
    n_new_user: int

    @classmethod
    def of(cls, ts_ms: int, ev: Evaluation, n_new_user: int) -> BatchScore:
        """The row of one batch's ``Evaluation`` (cold = at most ``cold_max_events`` prior events)."""
        return cls(ts_ms, ev.all.n, ev.all.hits, ev.all.ndcg, ev.cold.n, ev.cold.hits, ev.cold.ndcg, n_new_user)


@dataclass
class StreamResult:
    """A method's whole run: per-batch scores, totals and where its wall time went."""

    method: str
    per_batch: list[BatchScore] = field(default_factory=list)
    learn_s: float = 0.0
    score_s: float = 0.0

    def total(self, cold: bool = False, start: int = 0) -> dict[str, float | int | None]:
        """Recall@K and NDCG@K over scored events from batch ``start`` on (all users, or cold users only)."""
        part = self.per_batch[start:]
        n = sum(b.n_cold if cold else b.n for b in part)
        hits = sum(b.hits_cold if cold else b.hits for b in part)
        ndcg = sum(b.ndcg_cold if cold else b.ndcg for b in part)
        return {"n": n, "hits": hits, "recall": hits / n if n else None, "ndcg": ndcg / n if n else None}

    def rolling_recall(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(stream time ms, Recall@K over the last ``window`` batches) per batch."""
        ts = np.array([b.ts_ms for b in self.per_batch], dtype=np.int64)
        n = np.cumsum([b.n for b in self.per_batch], dtype=np.float64)
        h = np.cumsum([b.hits for b in self.per_batch], dtype=np.float64)
        n_w = n - np.r_[np.zeros(window), n[:-window]] if len(n) > window else n
        h_w = h - np.r_[np.zeros(window), h[:-window]] if len(h) > window else h
        return ts, np.divide(h_w, n_w, out=np.full_like(h_w, np.nan), where=n_w > 0)


class History:
    """What the evaluation knows from earlier batches: per-user seen items and the candidate items."""

    def __init__(self) -> None:
        self.seen: dict[int, set[int]] = {}
        self.seen_cols: dict[int, list[int]] = {}
        self.item_col: dict[int, int] = {}
        self.items: list[int] = []

    def novel(self, batch: Batch) -> np.ndarray:
        """Mask of events whose item the user has not interacted with in an earlier batch."""
        empty: set[int] = set()
        return np.fromiter(
            (i not in self.seen.get(u, empty) for u, i in zip(batch.user_ids.tolist(), batch.item_ids.tolist())),
            dtype=bool,
            count=len(batch),
        )

    def add(self, batch: Batch) -> None:
        """Count the batch as history (after it was scored)."""
        for u, i in zip(batch.user_ids.tolist(), batch.item_ids.tolist()):
            col = self.item_col.get(i)
            if col is None:
                col = self.item_col[i] = len(self.items)
                self.items.append(i)
            s = self.seen.setdefault(u, set())
            if i not in s:
                s.add(i)
                self.seen_cols.setdefault(u, []).append(col)


def ranks_of(history: History, scorer: Scorer, users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """0-based rank of each (user, item) in the user's top-``k`` over ``history.items``; -1 if absent or unknown."""
    ranks = np.full(len(users), -1, dtype=np.int64)
    known = np.fromiter((u in history.seen for u in users.tolist()), dtype=bool, count=len(users))
    if not known.any() or not history.items:
        return ranks
    uniq, inverse = np.unique(users[known], return_inverse=True)
    candidates = np.asarray(history.items, dtype=np.int64)
    scores = np.array(scorer.scores(uniq, candidates), dtype=np.float64, copy=True)
    cols = [history.seen_cols[u] for u in uniq.tolist()]
    rows = np.repeat(np.arange(len(uniq)), [len(c) for c in cols])
    scores[rows, np.concatenate(cols)] = -np.inf
    scores[~np.isfinite(scores)] = -np.inf
    top = top_k(scores, k)
    target = np.array([history.item_col.get(i, -2) for i in items[known].tolist()], dtype=np.int64)
    ranks[known] = ranks_in(top[inverse], target)
    return ranks


def evaluate_stream(
    events: EventArrays,
    scorer: Scorer,
    batch_size: int = 256,
    k: int = 20,
    cold_max_events: int = 5,
    sample: int | None = None,
    seed: int = 0,
) -> StreamResult:
    """Test-then-train over ``events``: score each batch's novel events (at most ``sample`` per batch), then learn.

    The sample of scored events depends only on the batch index and ``seed``, so every method is scored on
    exactly the same events.
    """
    history, result = History(), StreamResult(scorer.name)
    core = Prequential(k, cold_max_events, sample, seed)
    for batch in batches(events, batch_size):
        idx = core.pick(history.novel(batch))
        users, items = batch.user_ids[idx], batch.item_ids[idx]
        t0 = time.perf_counter()
        ranks = ranks_of(history, scorer, users, items, k)
        t1 = time.perf_counter()
        scorer.learn(batch)
        result.learn_s += time.perf_counter() - t1
        result.score_s += t1 - t0
        n_new_user = sum(u not in history.seen for u in users.tolist())
        result.per_batch.append(BatchScore.of(int(batch.ts_ms.max()), core.record(batch, idx, ranks), n_new_user))
        history.add(batch)
    return result
