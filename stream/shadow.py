"""Shadow A/B: extra model variants trained on the same consumed stream, each served from its own collections.

A variant sees every batch the served model sees, in the same trainer (one consumer, events decoded once): it is
scored test-then-train on the batch, trained on it, and its fresh embeddings are written synchronously to its own
aliased collections ``<prefix>_v_<name>_items``/``_users``. Variants never gate offsets or checkpoints' timing;
their state rides in the served model's checkpoints, so a restart resumes them at the same offsets.
``ebrflow promote NAME`` points the served aliases at a variant's collections.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ebrflow.indexer.generations import Generations
from ebrflow.indexer.publisher import Publisher
from ebrflow.model.base import Batch, RetrievalModel
from ebrflow.stream.policy import Coordinator, Policy, Solo, Step
from ebrflow.stream.refresh import RollingRefresh

if TYPE_CHECKING:
    from ebrflow.stream.pipeline import Pipeline


class Scorer(Protocol):
    """Test-then-train scoring over a variant's served state (``ops.prequential.PrequentialEvaluator``)."""

    def evaluate(self, batch: Batch) -> Any:
        """Score the batch before training; the result has ``all.hits`` and ``all.n``."""


def variant_prefix(prefix: str, name: str) -> str:
    """The collection prefix of variant ``name`` under the served ``prefix``.

    >>> variant_prefix("ebrflow", "two_tower")
    'ebrflow_v_two_tower'
    """
    return f"{prefix}_v_{name}"


@dataclass
class Variant:
    """One shadow model with its publisher (own collections, mirrors and seen store) and its evaluation."""

    name: str
    model: RetrievalModel
    publisher: Publisher
    evaluate: Scorer  # a PrequentialEvaluator over this variant's mirrors
    refresh: RollingRefresh | None = None  # the variant's own rolling refresh (see stream.refresh)
    seconds: dict[str, float] = field(default_factory=dict)

    def choose(self) -> int:
        """The generation of the variant's collections to write: the served one, or a new one when there is none
        or its dimension differs from the variant's (its configuration changed)."""
        store = self.publisher.store
        gens = Generations(store.client, store.prefix)
        served = gens.served()
        if served is not None and store.dim_of(gens.physical("items", served)) == store.dim:
            return served
        return max([*gens.existing(), 0]) + 1

    def serve(self) -> None:
        """Point the variant's aliases at the generation it writes (after ``republish_all`` filled it)."""
        store = self.publisher.store
        gens = Generations(store.client, store.prefix)
        if gens.served() != store.generation:
            gens.switch(store.generation)  # older ones stay: `ebrflow promote` may have pointed clients at them

    def learn(self, batch: Batch) -> tuple[int, int]:
        """Score the batch on what this variant serves, then train on it; returns (hits, evaluated)."""
        t0 = time.perf_counter()
        ev = self.evaluate.evaluate(batch)
        t1 = time.perf_counter()
        self.model.fit_batch(batch)
        self.seconds = {"evaluate": t1 - t0, "train": time.perf_counter() - t1}
        return ev.all.hits, ev.all.n

    def publish_batch(self, batch: Batch) -> None:
        """Write the variant's fresh vectors of the batch's items and users (idempotent: safe to retry)."""
        t0 = time.perf_counter()
        items, users = np.unique(batch.item_ids), np.unique(batch.user_ids)
        if self.refresh is not None:
            known = {"item": self.model.known_items(), "user": self.model.known_users()}
            due = self.refresh.next_slice(known, time.monotonic())
            items, users = np.union1d(items, due["item"]), np.union1d(users, due["user"])
        self.publish(items, users, (batch.user_ids, batch.item_ids))
        self.seconds["publish"] = time.perf_counter() - t0

    def publish(self, items: np.ndarray, users: np.ndarray, interactions: tuple[np.ndarray, np.ndarray]) -> None:
        """Write the variant's current vectors of ``items``/``users`` (and the interactions' seen lists)."""
        m, dim = self.model, self.publisher.store.dim
        item_vecs = m.item_embeddings(items) if len(items) else np.empty((0, dim), np.float32)
        user_vecs = m.user_embeddings(users) if len(users) else np.empty((0, dim), np.float32)
        self.publisher.publish(self.publisher.prepare(m.version, items, item_vecs, users, user_vecs, interactions))

    def republish_all(self, chunk: int = 5000) -> None:
        """Write every known embedding of the variant (after a restore and at a clean stop)."""
        empty = np.empty(0, np.int64)
        items, users = self.model.known_items(), self.model.known_users()
        for start in range(0, max(len(items), len(users)), chunk):
            self.publish(items[start : start + chunk], users[start : start + chunk], (empty, empty))


class ShadowVariants(Policy):
    """The loop's shadow A/B: every variant opens its collections at sync, learns and publishes each batch after
    the served model, and re-publishes everything at the end. Ranks: the leader picks each variant's generation
    and points its aliases; every rank trains every variant on the all-gathered batch and writes its own ids."""

    def __init__(self, variants: list[Variant], coordinator: Coordinator | None = None) -> None:
        self.variants = variants
        self.coordinator = coordinator or Solo()

    def on_sync(self, loop: Pipeline) -> None:
        """Open each variant's collections, fill them with its restored model, and serve them."""
        lead = self.coordinator.leader
        for v in self.variants:
            store = v.publisher.store
            if lead:
                loop.retrying("publish", lambda v=v: v.publisher.store.use_generation(v.choose()))
            generation = self.coordinator.share(store.generation)  # the leader created it; the others open it
            loop.retrying("publish", lambda s=store, g=generation: s.use_generation(g))
            loop.retrying("publish", v.republish_all)
            self.coordinator.barrier()
            if lead:
                loop.retrying("publish", v.serve)

    def after_publish(self, loop: Pipeline, step: Step) -> None:
        """Same batch, own model and collections, after the served one."""
        for v in self.variants:
            hits, evaluated = v.learn(step.batch)
            loop.retrying("publish", lambda v=v: v.publish_batch(step.batch))
            loop.observer.on_variant(v.name, hits, evaluated, v.seconds)

    def on_expire(self, loop: Pipeline, users: np.ndarray, items: np.ndarray) -> None:
        """Every variant forgets the expired ids too (model, served state, Milvus rows)."""
        for v in self.variants:
            v.model.expire(users, items)
            v.publisher.forget(users, items)
            store = v.publisher.store
            loop.retrying("publish", lambda s=store: s.delete_ids(s.items, items) + s.delete_ids(s.users, users))

    def on_finish(self, loop: Pipeline) -> None:
        """Re-publish every variant's embeddings after a run that trained."""
        if loop.summary.batches:
            for v in self.variants:
                loop.retrying("publish", v.republish_all)
