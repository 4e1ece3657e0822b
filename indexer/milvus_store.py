"""Milvus collections for item and user embeddings: schema, idempotent upserts, scheduled flushes, reads."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import CollectionSchema, DataType, MilvusClient
from pymilvus.milvus_client.index import IndexParams

log = logging.getLogger(__name__)

# Index types that Milvus Lite and standalone both load; others fail only at load time, so reject them early.
SUPPORTED_INDEXES = {"FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX"}


class MilvusLiteBusy(RuntimeError):
    """A Milvus Lite database another process has open (Lite allows one process per data dir)."""

    exit_code = 75  # EX_TEMPFAIL, as for another trainer holding the topic: ``ebrflow`` prints one line


class MilvusLiteMissing(RuntimeError):
    """A Milvus Lite path was given but the ``milvus-lite`` package is not installed (the ``client`` extra alone)."""

    exit_code = 69  # EX_UNAVAILABLE


class _Held(logging.Handler):
    """Keeps the records milvus_lite logs while a database opens, instead of printing its tracebacks."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def connect(uri: str, token: str = "", timeout_s: float = 30.0) -> MilvusClient:
    """A client for a Milvus Lite path (created if missing) or a ``http(s)://host:port`` server.

    A Lite path that cannot be opened raises ``MilvusLiteMissing`` (no milvus-lite) or ``MilvusLiteBusy`` with
    milvus_lite's own reason; the tracebacks milvus_lite logs while failing are held back, not printed.
    """
    if "://" in uri:
        return MilvusClient(uri=uri, token=token, timeout=timeout_s)
    try:
        import milvus_lite  # noqa: F401 - pymilvus opens a local path through it
    except ImportError:
        raise MilvusLiteMissing(
            f"milvus.uri {uri} is a Milvus Lite path, and milvus-lite is not installed: "
            "pip install 'ebrflow[client,lite]' (or point milvus.uri at an http:// Milvus server)"
        ) from None
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    lite_log, held = logging.getLogger("milvus_lite"), _Held()
    propagate = lite_log.propagate
    lite_log.addHandler(held)
    lite_log.propagate = False
    try:
        return MilvusClient(uri=uri, token=token, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - pymilvus says only "Open local milvus failed"; milvus_lite logged why
        reasons = [str(r.exc_info[1]) for r in held.records if r.exc_info and r.exc_info[1] is not None]
        why = reasons[-1] if reasons else str(exc)
        raise MilvusLiteBusy(
            f"could not open Milvus Lite at {uri} ({why}); Milvus Lite allows one process per data dir: stop the "
            f"other process, or serve the directory with `milvus-lite server --data-dir {uri} --port P` and set "
            "milvus.uri to http://127.0.0.1:P"
        ) from None
    finally:
        lite_log.removeHandler(held)
        lite_log.propagate = propagate


class MilvusStore:
    """The items and users collections: ``<prefix>_items``/``<prefix>_users`` (the aliases clients read, or plain
    collections of that name without generations), or after ``use_generation(N)`` the physical collections
    ``<prefix>_items_g<N>``/``<prefix>_users_g<N>`` a trainer writes (see ``indexer.generations``).

    Both: ``id`` INT64 primary key, ``embedding`` FLOAT_VECTOR(dim) under inner product (vectors are
    L2-normalised, so IP is cosine), ``version`` INT64 (model step), ``updated_at`` INT64 (Unix ms).
    Users also hold ``seen`` ARRAY<INT64> (recent items, excluded at query time).
    """

    def __init__(
        self,
        client: MilvusClient,
        dim: int,
        prefix: str = "ebrflow",
        index_type: str = "FLAT",
        seen_capacity: int = 1024,
        flush_interval_s: float = 30.0,
    ) -> None:
        if index_type not in SUPPORTED_INDEXES:
            raise ValueError(f"index_type {index_type!r} not in {sorted(SUPPORTED_INDEXES)}")
        if not 1 <= seen_capacity <= 4096:
            raise ValueError("seen_capacity must be in 1..4096 (Milvus array capacity)")
        self.client = client
        self.dim = dim
        self.prefix = prefix
        self.items = f"{prefix}_items"
        self.users = f"{prefix}_users"
        self.generation: int | None = None
        self.index_type = index_type
        self.seen_capacity = seen_capacity
        self.flush_interval_s = flush_interval_s
        self._last_flush = time.monotonic()
        self._schemas: dict[str, dict] = {}  # collection → its description (field types for column upserts)

    def use_generation(self, generation: int) -> None:
        """Write and read the physical collections of ``generation`` (created and loaded if missing)."""
        self.generation = generation
        self.items = f"{self.prefix}_items_g{generation}"
        self.users = f"{self.prefix}_users_g{generation}"
        self.ensure_collections()

    def dim_of(self, collection: str) -> int | None:
        """The embedding dimension of an existing collection (or alias), None if it does not exist."""
        if not self.client.has_collection(collection):
            return None
        desc = self.client.describe_collection(collection)
        dims = [f["params"].get("dim") for f in desc["fields"] if f["name"] == "embedding"]
        return int(dims[0]) if dims else None

    def ensure_collections(self) -> None:
        """Create missing collections (checking the dimension of existing ones) and load them."""
        for name, with_seen in ((self.items, False), (self.users, True)):
            existing = self.dim_of(name)
            if existing is not None and existing != self.dim:
                raise ValueError(f"collection {name} has dim {existing}, model has {self.dim}")
            self._schemas.pop(name, None)
            if existing is None:
                self.client.create_collection(name, schema=self._schema(with_seen), index_params=self._index())
                log.info("created Milvus collection %s (dim %d, %s)", name, self.dim, self.index_type)
            self.client.load_collection(name)

    def _schema(self, with_seen: bool) -> CollectionSchema:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("version", DataType.INT64)
        schema.add_field("updated_at", DataType.INT64)
        if with_seen:
            schema.add_field("seen", DataType.ARRAY, element_type=DataType.INT64, max_capacity=self.seen_capacity)
        return schema

    def _index(self) -> IndexParams:
        params = self.client.prepare_index_params()
        extra = {"HNSW": {"M": 16, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024}}.get(self.index_type, {})
        params.add_index("embedding", index_type=self.index_type, metric_type="IP", params=extra)
        return params

    def upsert(
        self,
        collection: str,
        ids: np.ndarray,
        vectors: np.ndarray,
        version: int,
        seen: list[np.ndarray | None] | None = None,
    ) -> None:
        """Write rows (idempotent: the same id overwrites). ``seen`` only for the users collection: a user whose
        entry is None keeps the seen list Milvus holds (a partial update of vector, version and time only).

        Rows go column by column (``_write_columns``): pymilvus' row-wise path packs every field of every row in
        Python, most of an upsert's client time and all of it under the GIL the training thread needs."""
        if len(ids) == 0:
            return
        now = int(time.time() * 1000)
        full = np.ones(len(ids), dtype=bool) if seen is None else np.array([s is not None for s in seen])
        for partial, keep in ((False, full), (True, ~full)):
            if not keep.any():
                continue
            idx = np.flatnonzero(keep)
            columns = {
                "id": ids[idx].astype(np.int64),
                "embedding": np.ascontiguousarray(vectors[idx], dtype=np.float32),
                "version": np.full(len(idx), version, dtype=np.int64),
                "updated_at": np.full(len(idx), now, dtype=np.int64),
            }
            if seen is not None and not partial:
                columns["seen"] = [seen[i][-self.seen_capacity :].tolist() for i in idx.tolist()]
            self._write_columns(collection, columns, partial)

    def _write_columns(self, collection: str, columns: dict[str, Any], partial: bool) -> None:
        """One column-oriented upsert through the client's connection (the schema cached per collection)."""
        if collection not in self._schemas:
            self._schemas[collection] = self.client.describe_collection(collection)
        schema = self._schemas[collection]
        types = {f["name"]: f["type"] for f in schema["fields"]}
        entities = [{"name": name, "type": types[name], "values": values} for name, values in columns.items()]
        # pymilvus has no public column-oriented upsert: this is the call MilvusClient.upsert makes for rows, with the
        # same connection and call context (the client's database), on the batch path instead of the row path
        connection, context = self.client._get_connection(), self.client._generate_call_context()
        connection.upsert(collection, entities, schema=schema, partial_update=partial, context=context)

    def delete_newer(self, version: int) -> int:
        """Delete rows written by a model version above ``version`` (a lost run); returns how many."""
        removed = 0
        for name in (self.items, self.users):
            res = self.client.delete(name, filter=f"version > {int(version)}")
            removed += int(res.get("delete_count", 0)) if isinstance(res, dict) else len(res or [])
        return removed

    def delete_ids(self, collection: str, ids: np.ndarray) -> int:
        """Delete the rows of ``ids`` (expired ids); returns how many ids were asked for."""
        if not len(ids):
            return 0
        self.client.delete(collection, ids=np.asarray(ids, dtype=np.int64).tolist())
        return len(ids)

    def flush_if_due(self, force: bool = False) -> bool:
        """Flush both collections every ``flush_interval_s`` (unflushed rows are searched on a slow path)."""
        if not force and time.monotonic() - self._last_flush < self.flush_interval_s:
            return False
        for name in (self.items, self.users):
            self.client.flush(name)
        self._last_flush = time.monotonic()
        return True

    def get(
        self, collection: str, ids: list[int], fields: tuple[str, ...] = ("embedding", "version")
    ) -> dict[int, dict]:
        """Rows by id (missing ids are absent from the result)."""
        if not ids:
            return {}
        rows = self.client.get(collection, ids=ids, output_fields=list(fields))
        return {int(r["id"]): r for r in rows}

    def count(self, collection: str) -> int:
        """Number of distinct ids in a collection."""
        res = self.client.query(collection, filter="id >= 0", output_fields=["count(*)"])
        return int(res[0]["count(*)"])
