"""Item-to-item neighbours use the model's own coordinates: the served popularity prior (the last coordinate)
changes user→item scores but never ``similar_items`` or the neighbour-churn drift signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ebrflow.indexer.milvus_store import MilvusStore, connect
from ebrflow.indexer.mirror import EmbeddingMirror
from ebrflow.indexer.query import QueryClient
from ebrflow.ops.drift import DriftMonitor

N, DIM = 60, 8


def _vectors(popularity: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(3)
    inner = rng.normal(size=(N, DIM - 1)).astype(np.float32)
    return np.concatenate([inner, popularity[:, None].astype(np.float32)], axis=1)


def test_similar_items_ignore_the_popularity_coordinate(tmp_path: Path) -> None:
    flat = np.zeros(N)
    skewed = np.log(np.linspace(1e-4, 1.0, N)) * 5.0  # a strong prior: popular items would win every query
    client = connect(str(tmp_path / "milvus.db"))
    ids = np.arange(N)
    stores = {}
    for name, prior in (("flat", flat), ("skewed", skewed)):
        store = MilvusStore(client, DIM, prefix=name)
        store.ensure_collections()
        store.upsert(store.items, ids, _vectors(prior), version=1)
        stores[name] = store
    try:
        for item in (0, 17, 42):
            pure = [
                [r.item_id for r in QueryClient(client, s.prefix, prior_coordinate=True).similar_items(item, 10)]
                for s in stores.values()
            ]
            assert pure[0] == pure[1], f"item {item}: neighbours moved with popularity"
        boosted = QueryClient(client, "skewed").similar_items(0, 10)
        unboosted = QueryClient(client, "flat").similar_items(0, 10)
        assert [r.item_id for r in boosted] != [r.item_id for r in unboosted]  # the prior does move raw IP ranks
    finally:
        client.close()


def test_neighbour_churn_ignores_the_popularity_coordinate() -> None:
    mirror = EmbeddingMirror(DIM)
    ids = np.arange(N)
    mirror.update(ids, _vectors(np.zeros(N)))
    monitor = DriftMonitor(mirror, k=5, probe_size=10, prior_coordinate=True)
    assert monitor._neighbour_jaccard() is None  # first computation: the reference
    mirror.update(ids, _vectors(np.log(np.linspace(1e-4, 1.0, N)) * 5.0))  # only popularity changed
    assert monitor._neighbour_jaccard() == 1.0
    raw = DriftMonitor(mirror, k=5, probe_size=10, prior_coordinate=False)
    raw._neighbour_jaccard()
    mirror.update(ids, _vectors(np.zeros(N)))
    assert raw._neighbour_jaccard() < 1.0
