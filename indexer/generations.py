"""Model generations in Milvus: physical collections per generation behind the aliases clients query.

Clients read ``<prefix>_items`` and ``<prefix>_users``: Milvus aliases of the physical collections
``<prefix>_items_g<N>`` / ``<prefix>_users_g<N>`` of the served generation N. A trainer whose model is not the
served one (a backfill, a restore without a usable checkpoint, a dimension change, ``--new-generation``) fills
generation N+1 while clients keep reading N; ``switch`` then re-points both aliases (blue-green) and the old
collections are dropped after a grace period. ``QueryClient`` resolves the items alias once per query and reads
the users collection of the same generation, so it never mixes two generations.
"""

from __future__ import annotations

import logging
import re

from pymilvus import MilvusClient

log = logging.getLogger(__name__)

ROLES = ("items", "users")


class Generations:
    """Names, discovery and the alias switch of one prefix's generations.

    >>> g = Generations(None, "ebrflow")  # names only; a client is needed for the rest
    >>> g.alias("items"), g.physical("users", 3), g.generation_of("ebrflow_users_g3")
    ('ebrflow_items', 'ebrflow_users_g3', 3)
    """

    def __init__(self, client: MilvusClient | None, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._pattern = re.compile(rf"^{re.escape(prefix)}_(?:items|users)_g(\d+)$")

    def alias(self, role: str) -> str:
        """The name clients query for ``role`` ("items"/"users")."""
        return f"{self.prefix}_{role}"

    def physical(self, role: str, generation: int) -> str:
        """The physical collection of ``role`` in ``generation``."""
        return f"{self.prefix}_{role}_g{generation}"

    def generation_of(self, collection: str) -> int | None:
        """The generation a physical collection name belongs to (None for other names)."""
        match = self._pattern.match(collection)
        return int(match.group(1)) if match else None

    def served(self) -> int | None:
        """The generation the items alias points at (None before the first switch)."""
        if self.alias("items") not in self.client.list_aliases().get("aliases", []):
            return None
        return self.generation_of(self.client.describe_alias(self.alias("items"))["collection_name"])

    def served_collections(self) -> tuple[str, str] | None:
        """(items, users) physical collections behind the aliases, from the items alias alone (None without it).

        The users collection is the items collection's sibling (``…_items_gN`` → ``…_users_gN``), also after
        ``ebrflow promote`` pointed the aliases at a variant's collections.
        """
        if self.alias("items") not in self.client.list_aliases().get("aliases", []):
            return None
        items = self.client.describe_alias(self.alias("items"))["collection_name"]
        head, _, generation = items.rpartition("_items_g")
        return items, f"{head}_users_g{generation}"

    def promote(self, items: str, users: str) -> None:
        """Point the aliases at the given physical collections (users first, as ``switch`` does)."""
        self.client.alter_alias(users, self.alias("users"))
        self.client.alter_alias(items, self.alias("items"))
        log.info("aliases of %s now point at %s, %s", self.prefix, items, users)

    def existing(self) -> list[int]:
        """Generations with at least one physical collection, ascending."""
        found = {self.generation_of(name) for name in self.client.list_collections()}
        return sorted(g for g in found if g is not None)

    def legacy(self) -> bool:
        """Whether plain collections named like the aliases exist (the layout before generations)."""
        names = set(self.client.list_collections())
        return any(self.alias(role) in names for role in ROLES)

    def load(self, generation: int) -> None:
        """Load ``generation``'s collections for search (Milvus Lite releases them when its process restarts)."""
        for role in ROLES:
            if self.client.has_collection(self.physical(role, generation)):
                self.client.load_collection(self.physical(role, generation))

    def switch(self, generation: int) -> None:
        """Point both aliases at ``generation`` (users first: a ``QueryClient`` follows the items alias).

        Plain collections of the pre-generation layout that hold the alias names are dropped first (once).
        """
        aliases = set(self.client.list_aliases().get("aliases", []))
        for role in ("users", "items"):
            alias, target = self.alias(role), self.physical(role, generation)
            if alias in aliases:
                self.client.alter_alias(target, alias)
                continue
            if self.client.has_collection(alias):
                log.warning("dropping %s: collections of the layout before generations give way to an alias", alias)
                self.client.drop_collection(alias)
            self.client.create_alias(target, alias)
        log.info("serving generation %d (%s, %s)", generation, *(self.physical(r, generation) for r in ROLES))

    def drop_older(self, generation: int) -> list[int]:
        """Drop the physical collections of generations below ``generation`` (never the served one)."""
        served = self.served()
        dropped = [g for g in self.existing() if g < generation and g != served]
        for g in dropped:
            for role in ROLES:
                if self.client.has_collection(self.physical(role, g)):
                    self.client.drop_collection(self.physical(role, g))
            log.info("dropped generation %d", g)
        return dropped
