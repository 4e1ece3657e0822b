"""The one prequential core: the live evaluator (served mirrors) and the benchmarks' evaluation agree event by event."""

import numpy as np

from bench.common import batches, evaluate_stream
from ebrflow.indexer.mirror import EmbeddingMirror
from ebrflow.indexer.seen import SeenItems
from ebrflow.model.base import Batch
from ebrflow.ops.prequential import Prequential, PrequentialEvaluator
from ebrflow.stream.generator import EventArrays

RNG = np.random.default_rng(11)
USERS, ITEMS, DIM, BATCH = 40, 60, 8, 50
U = RNG.normal(size=(USERS, DIM)).astype(np.float32)
V = RNG.normal(size=(ITEMS, DIM)).astype(np.float32)


class FixedTable:
    """A method whose scores are inner products of fixed vectors (it learns nothing)."""

    name = "fixed"

    def learn(self, batch: Batch) -> None:
        pass

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return U[users] @ V[items].T


def stream(n: int = 1500) -> EventArrays:
    users = RNG.integers(0, USERS, n)
    items = (users * 7 + RNG.integers(0, 12, n)) % ITEMS  # each user keeps to a band of items: repeats happen
    return EventArrays(users.astype(np.int64), items.astype(np.int64), np.arange(n, dtype=np.int64))


def test_live_evaluator_and_bench_score_the_same_events_the_same_way() -> None:
    events = stream()
    bench = evaluate_stream(events, FixedTable(), batch_size=BATCH, k=5, sample=16, seed=3)

    items, users, seen = EmbeddingMirror(DIM), EmbeddingMirror(DIM), SeenItems()
    live = PrequentialEvaluator(items, users, seen, k=5, sample=16, seed=3)
    rows = []
    for batch in batches(events, BATCH):
        ev = live.evaluate(batch)
        rows.append((ev.all.n, ev.all.hits, round(ev.all.ndcg, 9), ev.cold.n, ev.cold.hits))
        i, u = np.unique(batch.item_ids), np.unique(batch.user_ids)  # publish what the batch touched
        items.update(i, V[i])
        users.update(u, U[u])
        seen.add(batch.user_ids, batch.item_ids)

    expected = [(b.n, b.hits, round(b.ndcg, 9), b.n_cold, b.hits_cold) for b in bench.per_batch]
    assert rows == expected
    assert sum(r[1] for r in rows) > 20 and sum(r[3] for r in rows) > 0  # hits and cold users were both exercised
    assert any(r[0] == 16 for r in rows)  # the sample cap was hit


def test_pick_scores_only_novel_events_and_samples_reproducibly() -> None:
    novel = np.array([True, False, True, True, True, False, True])
    a, b = Prequential(sample=3, seed=5), Prequential(sample=3, seed=5)
    picked = a.pick(novel)
    assert len(picked) == 3 and novel[picked].all() and np.all(np.diff(picked) > 0)
    assert picked.tolist() == b.pick(novel).tolist()
    assert Prequential(sample=None).pick(novel).tolist() == [0, 2, 3, 4, 6]


def test_cold_is_decided_by_prior_events_before_the_batch() -> None:
    core = Prequential(cold_max_events=1)
    first = Batch.of(np.array([1, 1, 2]), np.array([10, 11, 12]))
    ev = core.record(first, np.arange(3), np.array([0, -1, -1]))
    assert (ev.cold.n, ev.cold.hits, ev.warm.n) == (3, 1, 0)  # nobody had prior events
    ev = core.record(Batch.of(np.array([1, 2]), np.array([13, 14])), np.arange(2), np.array([-1, 2]))
    assert (ev.cold.n, ev.warm.n, ev.warm.hits) == (1, 1, 0)  # user 1 had 2 prior events, user 2 had 1
    assert core.total.all.n == 5 and core.total.all.hits == 2
