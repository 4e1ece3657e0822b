"""Shadow A/B: variants trained on the same stream in one trainer, own collections and metrics, promote."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from ebrflow.app import build_trainer
from ebrflow.cli import app
from ebrflow.config import Settings
from ebrflow.indexer.generations import Generations
from ebrflow.indexer.query import QueryClient
from ebrflow.stream.shadow import variant_prefix
from tests.faults import send_events


def with_variants(settings: Settings) -> Settings:
    variants = {"tt": {"kind": "two_tower", "dim": 12}, "rr": {"options": {"spectral_every": 512}}}
    return settings.model_copy(update={"model": settings.model.model_copy(update={"variants": variants})})


def test_variants_train_publish_and_report_side_by_side_and_survive_a_restart(settings: Settings) -> None:
    settings = with_variants(settings)
    prefix = settings.milvus.collection_prefix
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        send_events(settings, 0, 3000)
        summary = trainer.run(max_events=3000, idle_exit_s=30)
        assert summary.trained == 3000
        variants = {v.name: v for v in trainer.variants}
        for name, variant in variants.items():
            store = variant.publisher.store
            items = variant.model.known_items()
            assert store.items == f"{variant_prefix(prefix, name)}_items_g1"
            rows = store.get(store.items, items.tolist())
            served = np.array([rows[i]["embedding"] for i in items.tolist()], np.float32)
            np.testing.assert_allclose(served, variant.model.item_embeddings(items), atol=1e-5)
        assert variants["tt"].publisher.store.dim == 12 and variants["tt"].model.version > 0
        m = trainer.metrics
        scored = {v: m.variant_evaluated.labels(v)._value.get() for v in ("served", "tt", "rr")}
        hits = {v: m.variant_hits.labels(v)._value.get() for v in ("served", "tt", "rr")}
        assert all(n > 0 for n in scored.values()) and all(h > 0 for h in hits.values()), (scored, hits)
        assert m.variant_seconds.labels("tt", "train")._value.get() > 0
        versions = {name: v.model.version for name, v in variants.items()}
    finally:
        trainer.close()
    print(f"variants: scored {scored}, Recall@K { ({v: round(hits[v] / scored[v], 3) for v in scored}) }")

    again = build_trainer(settings, settings.kafka.bootstrap_servers)  # the checkpoint carries every variant
    try:
        again.run(max_events=0)
        assert {v.name: v.model.version for v in again.variants} == versions
    finally:
        again.close()

    # a variant whose dimension changed starts fresh in a new generation of its own collections (no retry loop)
    changed = settings.model.variants | {"tt": {"kind": "two_tower", "dim": 8}}
    resized = settings.model_copy(update={"model": settings.model.model_copy(update={"variants": changed})})
    again = build_trainer(resized, settings.kafka.bootstrap_servers)
    try:
        again.run(max_events=0)
        tt = next(v for v in again.variants if v.name == "tt")
        assert tt.publisher.store.generation == 2 and tt.publisher.store.dim == 8
        assert Generations(tt.publisher.store.client, variant_prefix(prefix, "tt")).served() == 2
    finally:
        again.close()

    env = {"EBRFLOW_MILVUS__URI": settings.milvus.uri, "EBRFLOW_MODEL__DIM": str(settings.model.dim)}
    result = CliRunner().invoke(app, ["promote", "rr"], env=env)  # rr was restored with its trained state
    assert result.exit_code == 0, result.output
    missing = CliRunner().invoke(app, ["promote", "nope"], env=env)
    assert missing.exit_code != 0
    again = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        client = again.store.client
        assert Generations(client, prefix).served_collections() == (
            f"{variant_prefix(prefix, 'rr')}_items_g1",
            f"{variant_prefix(prefix, 'rr')}_users_g1",
        )
        recs = QueryClient(client, prefix).recommend(0, k=5)
        assert len(recs) == 5
    finally:
        again.close()
