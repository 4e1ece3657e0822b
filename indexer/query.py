"""The query client users call: top-K items for a user from the served embeddings, seen items excluded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ebrflow.indexer.generations import Generations
from ebrflow.indexer.milvus_store import MilvusStore


@dataclass(frozen=True)
class Recommendation:
    """One recommended item and its cosine score."""

    item_id: int
    score: float


class UnknownUser(KeyError):
    """The user has no published embedding yet."""


class NothingServed(RuntimeError):
    """No model generation is served under this prefix yet (no trainer has published)."""

    exit_code = 69  # EX_UNAVAILABLE


class QueryClient:
    """Reads what the trainer published: ``recommend(user, k)`` and ``similar_items(item, k)``."""

    def __init__(self, store: MilvusStore, prior_coordinate: bool = False) -> None:
        self.store = store
        self.generations = Generations(store.client, store.prefix)
        served = self.generations.served_collections() if store.generation is None else None
        for name in served or ():
            store.client.load_collection(name)
        self.prior_coordinate = prior_coordinate  # the last coordinate is the popularity prior (model.popularity_*)

    def collections(self) -> tuple[str, str]:
        """(items, users) collections of one generation: the one the items alias points at when aliases exist
        (resolved per call, so a query never mixes two generations across an alias switch), else the store's."""
        served = self.generations.served_collections() if self.store.generation is None else None
        if served is None:
            if not self.store.client.has_collection(self.store.items):
                raise NothingServed(f"no model is served under the Milvus prefix {self.store.prefix!r} yet")
            return self.store.items, self.store.users
        return served

    def recommend(self, user_id: int, k: int = 20, exclude_seen: bool = True) -> list[Recommendation]:
        """The user's top-``k`` items by cosine, excluding items the user interacted with."""
        items, users = self.collections()
        rows = self.store.get(users, [int(user_id)], fields=("embedding", "seen"))
        if int(user_id) not in rows:
            raise UnknownUser(user_id)
        row = rows[int(user_id)]
        seen = [int(x) for x in row["seen"]] if exclude_seen else None
        hits = self.store.search(items, np.asarray(row["embedding"], np.float32), k, exclude=seen)
        return [Recommendation(i, s) for i, s in hits]

    def similar_items(self, item_id: int, k: int = 20) -> list[Recommendation]:
        """The ``k`` items closest to ``item_id`` (itself excluded), by inner product of the model's own
        coordinates: with ``prior_coordinate`` the popularity prior takes no part in item-to-item scores."""
        items, _ = self.collections()
        rows = self.store.get(items, [int(item_id)], fields=("embedding",))
        if int(item_id) not in rows:
            raise KeyError(item_id)
        query = np.array(rows[int(item_id)]["embedding"], np.float32)
        if self.prior_coordinate:
            query[-1] = 0.0  # pure item-to-item similarity: the candidates' popularity coordinate counts 0
        hits = self.store.search(items, query, k, exclude=[int(item_id)])
        return [Recommendation(i, s) for i, s in hits]
