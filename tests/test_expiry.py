"""Expiry (run.expire_after_s): ids unseen for an event-time span leave the model's tables and graph, the mirrors,
the seen lists and Milvus; their rows are reused, so state stays bounded; checkpoints and ranks follow."""

from __future__ import annotations

import numpy as np
import pytest

from ebrflow.app import build_model, build_trainer
from ebrflow.config import ModelConfig, Settings
from ebrflow.indexer.mirror import EmbeddingMirror
from ebrflow.indexer.seen import SeenItems
from ebrflow.model.base import Batch
from ebrflow.model.tables import IdIndex
from ebrflow.stream.kafka_io import make_producer
from ebrflow.stream.schema import Event, EventCodec


def test_removed_ids_free_their_rows_for_new_ones_and_survive_a_state_round_trip() -> None:
    idx = IdIndex()
    idx.add(np.arange(10, 20))
    assert idx.remove(np.array([12, 15, 99])).tolist() == [2, 5]
    assert 12 not in idx and len(idx.ids()) == 8
    assert idx.add(np.array([30, 31, 32])).tolist() == [2, 5, 10]  # freed rows first, lowest first
    again = IdIndex()
    again.load_state_dict(idx.state_dict())
    assert again.ids().tolist() == idx.ids().tolist() and again.lookup(np.array([31])).tolist() == [5]
    again.remove(np.array([10]))
    assert again.add(np.array([40])).tolist() == [0]


@pytest.mark.parametrize("kind", ["ssmtl", "two_tower"])
def test_an_expired_model_forgets_ids_and_reuses_their_rows(kind: str) -> None:
    model = build_model(ModelConfig(kind=kind, dim=9, device="cpu"))  # with its popularity block (prior)
    rng = np.random.default_rng(0)
    for b in range(6):
        users, items = rng.integers(0, 60, 256), rng.integers(100, 140, 256)
        model.fit_batch(Batch.of(users, items, ts_ms=np.full(256, b * 1000)))
    gone_users, gone_items = np.arange(0, 30), np.arange(100, 120)
    model.expire(gone_users, gone_items)
    assert not set(model.known_users().tolist()) & set(gone_users.tolist())
    assert not set(model.known_items().tolist()) & set(gone_items.tolist())
    with pytest.raises(KeyError):
        model.item_embeddings(np.array([100]))
    before = len(model.known_items()) + len(model.known_users())
    state = model.state_dict()
    # new ids take the freed rows: the tables do not grow
    for b in range(6, 9):
        users, items = rng.integers(1000, 1030, 256), rng.integers(500, 520, 256)
        report = model.fit_batch(Batch.of(users, items, ts_ms=np.full(256, b * 1000)))
        assert np.isfinite(report.loss)
    assert len(model.known_items()) + len(model.known_users()) == before + 50
    rows = len(model.graph.items) if kind == "ssmtl" else len(model.model.items)
    assert rows == 40  # 40 items ever had a row at once: the 20 new ones reused the 20 freed rows
    assert np.isfinite(model.item_embeddings(np.arange(500, 520))).all()
    restored = build_model(ModelConfig(kind=kind, dim=9, device="cpu"))
    restored.load_state_dict(state)
    assert sorted(restored.known_items().tolist()) == sorted(set(range(120, 140)))


def test_mirrors_and_seen_lists_forget_ids() -> None:
    mirror = EmbeddingMirror(dim=2)
    mirror.update(np.array([5, 6, 7]), np.arange(6, dtype=np.float32).reshape(3, 2))
    mirror.remove(np.array([6, 8]))
    assert sorted(mirror.ids().tolist()) == [5, 7] and 6 not in mirror
    assert mirror.get(np.array([7]))[0].tolist() == [[4.0, 5.0]]
    assert mirror.topk(np.array([[1.0, 1.0]], np.float32), k=3).tolist() == [[7, 5, -1]]
    seen = SeenItems()
    seen.add(np.array([1, 1, 2]), np.array([10, 11, 10]))
    seen.remove(np.array([2]), np.array([11]))
    assert len(seen) == 1 and seen.get(1).tolist() == [10]


def _send(settings: Settings, users: range, items: range, n: int, start_ms: int, step_ms: int) -> None:
    producer, codec = make_producer(settings.kafka.bootstrap_servers), EventCodec()
    for k in range(n):
        u, i = users[k % len(users)], items[(k * 7) % len(items)]
        event = Event(user_id=u, item_id=i, ts=start_ms + k * step_ms)
        producer.send(settings.kafka.topic, value=codec.encode(event), partition=0)  # in event-time order
    producer.flush()
    producer.close()


def test_the_trainer_forgets_ids_unseen_for_the_span_everywhere(settings: Settings) -> None:
    """Phase 1's users and items never come back after a minute of event time; with a 5 s span they leave the model,
    the mirrors, the seen lists and Milvus (the metric counts the deleted rows), and a restore keeps them gone."""
    run = settings.run.model_copy(update={"expire_after_s": 5.0})
    settings = settings.model_copy(update={"run": run, "batch": settings.batch.model_copy(update={"max_events": 100})})
    t0 = 1_700_000_000_000
    _send(settings, range(0, 50), range(1000, 1030), 1000, t0, 1)
    _send(settings, range(200, 250), range(2000, 2030), 2000, t0 + 60_000, 10)
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        summary = trainer.run(max_events=3000, idle_exit_s=30)
        store = trainer.store
        assert summary.trained == 3000
        assert sorted(trainer.model.known_items().tolist()) == list(range(2000, 2030))
        assert sorted(trainer.model.known_users().tolist()) == list(range(200, 250))
        assert store.count(store.items) == 30 and store.count(store.users) == 50
        assert not store.get(store.items, list(range(1000, 1030)))
        assert sorted(trainer.publisher.items.ids().tolist()) == list(range(2000, 2030))
        assert all(trainer.publisher.seen.count(u) == 0 for u in range(50))
        expired = {c: trainer.metrics.expired.labels(c)._value.get() for c in ("items", "users")}
        assert expired == {"items": 30, "users": 50}
    finally:
        trainer.close()
    again = build_trainer(settings, settings.kafka.bootstrap_servers)  # from the checkpoint: nothing comes back
    try:
        again.run(max_events=0)
        assert sorted(again.model.known_items().tolist()) == list(range(2000, 2030))
        assert again.store.count(again.store.items) == 30
    finally:
        again.close()
