"""The query client users call: top-K items for users from the served embeddings, seen items excluded.

Read-only: each call resolves the served generation (``indexer.generations``) and loads its collections for
reading (Milvus releases them when it restarts); nothing is ever created, altered or dropped. Needs pymilvus and
numpy only; ``ebrflow.client`` is its public import path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pymilvus import MilvusClient
from pymilvus.client.types import LoadState

from ebrflow.indexer.generations import Generations
from ebrflow.indexer.milvus_store import connect

MAX_TOPK = 16384  # Milvus' cap on one search's hits per query vector
OnUnknown = Literal["raise", "empty", "popular"]


@dataclass(frozen=True)
class Recommendation:
    """One recommended item and its score (inner product of the served vectors)."""

    item_id: int
    score: float


class UnknownUser(KeyError):
    """The user has no published embedding yet."""


class NothingServed(RuntimeError):
    """No model generation is served under this prefix yet (no trainer has published)."""

    exit_code = 69  # EX_UNAVAILABLE


class QueryClient:
    """Reads what the trainer published: ``recommend``/``recommend_many`` for users, ``similar_items`` for items.

    Seen items are excluded client-side: one search for the whole batch asks for ``overfetch × k`` hits per user
    and drops each user's own seen items; only a user left with fewer than ``k`` is searched again, alone, with
    the exclusion as a filter. ``filter``/``filter_params`` are a Milvus boolean expression on the items
    collection's scalar fields (``id``, ``version``, ``updated_at``) with its values bound separately, e.g.
    ``filter="version >= {v}", filter_params={"v": 100}``.

    ``prior_coordinate``: the served vectors' last coordinate is the popularity prior (the trainer's
    ``model.popularity_half_life > 0``, its default). It enables ``on_unknown="popular"`` and keeps the prior
    out of ``similar_items``.
    """

    overfetch = 4  # the batched search asks for this many hits per item wanted, to drop the seen ones

    def __init__(self, client: MilvusClient, prefix: str = "ebrflow", prior_coordinate: bool = False) -> None:
        self.client = client
        self.prefix = prefix
        self.prior_coordinate = prior_coordinate
        self.generations = Generations(client, prefix)
        self._lite: bool | None = None  # Milvus Lite binds no filter templates (asked once, at the first filter)

    @classmethod
    def from_uri(
        cls,
        uri: str,
        token: str | None = None,
        prefix: str = "ebrflow",
        prior_coordinate: bool = False,
        timeout_s: float = 30.0,
    ) -> QueryClient:
        """A client of a Milvus Lite path (it must exist: nothing is created) or an ``http(s)://`` server."""
        if "://" not in uri and not Path(uri).exists():
            raise NothingServed(f"no Milvus Lite database at {uri}: nothing has been published there")
        return cls(connect(uri, token or "", timeout_s), prefix, prior_coordinate)

    def close(self) -> None:
        """Close the Milvus connection."""
        self.client.close()

    def collections(self) -> tuple[str, str]:
        """(items, users) collections of one generation, loaded for reading: the ones the items alias points at
        (resolved per call, so a query never mixes two generations across an alias switch), else plain
        collections named like the aliases (the layout before generations)."""
        served = self.generations.served_collections()
        if served is None:
            served = (self.generations.alias("items"), self.generations.alias("users"))
            if not self.client.has_collection(served[0]):
                raise NothingServed(f"no model is served under the Milvus prefix {self.prefix!r} yet")
        for name in served:  # loading needs the Load privilege: asked only when Milvus restarted since the publish
            if self.client.get_load_state(name)["state"] != LoadState.Loaded:
                self.client.load_collection(name)
        return served

    def recommend(
        self,
        user_id: int,
        k: int = 20,
        exclude_seen: bool = True,
        filter: str | None = None,
        filter_params: dict[str, Any] | None = None,
        on_unknown: OnUnknown = "raise",
    ) -> list[Recommendation]:
        """The user's top-``k`` items, excluding items the user interacted with.

        A user without a published embedding raises ``UnknownUser`` (``on_unknown="raise"``), gets ``[]``
        (``"empty"``) or the most popular items under the served prior (``"popular"``, needs ``prior_coordinate``;
        scores are then the prior, ``scale · log q_recent``).
        """
        return self._recommend([user_id], k, exclude_seen, filter, filter_params, on_unknown)[0]

    def recommend_many(
        self,
        user_ids: Sequence[int],
        k: int = 20,
        exclude_seen: bool = True,
        filter: str | None = None,
        filter_params: dict[str, Any] | None = None,
        on_unknown: Literal["empty", "popular"] = "empty",
    ) -> list[list[Recommendation]]:
        """``recommend`` for each user, in order: one ``get`` of the users, one batched search (and an exact
        search of its own for each user the over-fetch left short).

        Unknown users never fail the batch: they get ``[]`` or, with ``on_unknown="popular"``, the popular items.
        """
        if on_unknown == "raise":
            raise ValueError("recommend_many answers every user: on_unknown must be 'empty' or 'popular'")
        return self._recommend(user_ids, k, exclude_seen, filter, filter_params, on_unknown)

    def similar_items(
        self, item_id: int, k: int = 20, filter: str | None = None, filter_params: dict[str, Any] | None = None
    ) -> list[Recommendation]:
        """The ``k`` items closest to ``item_id`` (itself excluded), by inner product of the model's own
        coordinates: with ``prior_coordinate`` the popularity prior takes no part in item-to-item scores."""
        items, _ = self.collections()
        rows = self._get(items, [int(item_id)], ("embedding",))
        if int(item_id) not in rows:
            raise KeyError(item_id)
        query = np.array(rows[int(item_id)]["embedding"], np.float32)
        if self.prior_coordinate:
            query[-1] = 0.0  # pure item-to-item similarity: the candidates' popularity coordinate counts 0
        return self._search(items, [query], [{int(item_id)}], k, filter, filter_params)[0]

    def _recommend(
        self,
        user_ids: Sequence[int],
        k: int,
        exclude_seen: bool,
        filter: str | None,
        filter_params: dict[str, Any] | None,
        on_unknown: OnUnknown,
    ) -> list[list[Recommendation]]:
        if on_unknown not in ("raise", "empty", "popular"):
            raise ValueError(f"on_unknown must be 'raise', 'empty' or 'popular', not {on_unknown!r}")
        if on_unknown == "popular" and not self.prior_coordinate:
            raise ValueError("on_unknown='popular' needs the served popularity prior (prior_coordinate=True)")
        ids = [int(u) for u in user_ids]
        items, users = self.collections()
        rows = self._get(users, ids, ("embedding", "seen") if exclude_seen else ("embedding",))
        unknown = [u for u in ids if u not in rows]
        if unknown and on_unknown == "raise":
            raise UnknownUser(unknown[0])
        keys = list(rows)
        vectors = [np.asarray(rows[u]["embedding"], np.float32) for u in keys]
        exclude = [{int(x) for x in rows[u].get("seen") or ()} for u in keys]
        if unknown and on_unknown == "popular":
            keys.append(None)  # one query for every unknown user: the prior coordinate alone ranks by popularity
            vectors.append(np.eye(1, self._dim(items), self._dim(items) - 1, np.float32)[0])
            exclude.append(set())
        found = dict(zip(keys, self._search(items, vectors, exclude, k, filter, filter_params)))
        return [found.get(u, found.get(None, [])) for u in ids]

    def _get(self, collection: str, ids: list[int], fields: tuple[str, ...]) -> dict[int, dict]:
        rows = self.client.get(collection, ids=sorted(set(ids)), output_fields=list(fields)) if ids else []
        return {int(r["id"]): r for r in rows}

    def _dim(self, collection: str) -> int:
        fields = self.client.describe_collection(collection)["fields"]
        return int(next(f["params"]["dim"] for f in fields if f["name"] == "embedding"))

    def _search(
        self,
        items: str,
        vectors: list[np.ndarray],
        exclude: list[set[int]],
        k: int,
        filter: str | None,
        filter_params: dict[str, Any] | None,
    ) -> list[list[Recommendation]]:
        """Top-``k`` per vector minus its ``exclude`` set: one batched search over-fetching ``overfetch × k`` hits
        (at most ``k`` + the largest set), then, only for vectors that lost too many hits to their set, one search
        each with the set as a bound ``id not in`` filter (exact)."""
        limit = min(k + min((self.overfetch - 1) * k, max(map(len, exclude), default=0)), MAX_TOPK)
        found = self._hits(items, vectors, limit, filter, filter_params)
        for i, hits in enumerate(found):
            kept = [r for r in hits if r.item_id not in exclude[i]][:k]
            if len(kept) < k and len(hits) == limit:
                seen = "id not in {ebrflow_seen}"
                flt = f"({filter}) and {seen}" if filter else seen
                kept = self._hits(
                    items, [vectors[i]], k, flt, {**(filter_params or {}), "ebrflow_seen": sorted(exclude[i])}
                )[0]
            found[i] = kept
        return found

    def _hits(
        self, items: str, vectors: list[np.ndarray], limit: int, filter: str | None, params: dict[str, Any] | None
    ) -> list[list[Recommendation]]:
        """One search: the top ``limit`` hits of each vector that pass ``filter``."""
        if not vectors:
            return []
        flt, params = self._bind(filter, params)
        res = self.client.search(
            items,
            data=[v.tolist() for v in vectors],
            limit=limit,
            filter=flt,
            filter_params=params,
            anns_field="embedding",
            search_params={"metric_type": "IP"},
        )
        return [[Recommendation(int(h["id"]), float(h["distance"])) for h in hits] for hits in res]

    def _bind(self, filter: str | None, params: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        """The filter and its parameters as the server takes them: Milvus binds ``{name}`` templates itself;
        Milvus Lite (3.2) parses no templates, so for it the values are written into the filter as literals."""
        if not filter or not params:
            return filter or "", params or {}
        if self._lite is None:
            self._lite = str(self.client.get_server_version()).startswith("milvus_lite")
        return (bind_literals(filter, params), {}) if self._lite else (filter, params)


def bind_literals(filter: str, params: dict[str, Any]) -> str:
    """``filter`` with each ``{name}`` replaced by ``params[name]`` as a Milvus literal (strings JSON-quoted).

    >>> print(bind_literals("id in {ids} and tag == {t} and version > {v}", {"ids": [1, 2], "t": "a", "v": 3}))
    id in [1, 2] and tag == "a" and version > 3
    """

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float, np.integer, np.floating)):
            return repr(value.item() if isinstance(value, np.generic) else value)
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
            return "[" + ", ".join(map(literal, value)) + "]"
        raise TypeError(f"filter_params values are numbers, strings, booleans or lists of them, not {value!r}")

    return re.sub(r"\{(\w+)\}", lambda m: literal(params[m.group(1)]), filter)
