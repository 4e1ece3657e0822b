"""The loop's way to Milvus: jobs of the model's vectors (never non-finite or mis-sized ones) through the sink."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from ebrflow.indexer.publisher import Publisher
from ebrflow.indexer.sink import InlineSink, MilvusSink, UpsertJob
from ebrflow.model.base import RetrievalModel


class DivergedModel(RuntimeError):
    """The model produced non-finite embeddings; they are never published."""


class Publishing:
    """Owns the sink of one run: ``depth`` jobs in flight on ``MilvusSink``'s thread (training overlaps the upsert),
    or with ``depth`` 0 an ``InlineSink`` that writes each job before ``submit`` returns (ranks).

    ``held``: the recall guard holds Milvus writes: jobs are acknowledged without writing (mirrors still follow).
    """

    def __init__(self, publisher: Publisher, depth: int = 2, max_backoff_s: float = 30.0) -> None:
        self.publisher = publisher
        self.depth = depth
        self.max_backoff_s = max_backoff_s
        self.held = False
        self.sink: MilvusSink | InlineSink | None = None

    def open(self, stop: threading.Event, on_error: Callable[[BaseException], None]) -> None:
        """Start the sink (``stop`` interrupts its retries)."""
        store = self.publisher.store
        if self.depth:
            self.sink = MilvusSink(store, stop, self.depth, self.max_backoff_s, on_error)
        else:
            self.sink = InlineSink(store, self.max_backoff_s, on_error)

    def close(self) -> None:
        """Stop the sink (jobs not acknowledged are dropped: no checkpoint covers them)."""
        if self.sink is not None:
            self.sink.close()

    @property
    def failing(self) -> bool:
        """Milvus keeps refusing the job at the head of the queue."""
        return self.sink is not None and self.sink.failing

    def prepare(
        self, model: RetrievalModel, items: np.ndarray, users: np.ndarray, interactions: tuple[np.ndarray, np.ndarray]
    ) -> UpsertJob:
        """The model's vectors for ``items``/``users`` as a job, refusing non-finite or mis-sized ones."""
        dim = self.publisher.store.dim
        if not len(items) and not len(users):  # a batch of dead letters only: nothing to embed or write
            none = np.empty((0, dim), np.float32)
            return self.publisher.prepare(model.version, items, none, users, none, interactions)
        item_vecs, user_vecs = model.item_embeddings(items), model.user_embeddings(users)
        if not (np.isfinite(item_vecs).all() and np.isfinite(user_vecs).all()):
            raise DivergedModel(f"non-finite embeddings at model version {model.version}; not publishing")
        if (len(items) and item_vecs.shape[1] != dim) or (len(users) and user_vecs.shape[1] != dim):
            raise ValueError(f"the model makes {item_vecs.shape[1]}-d vectors; the Milvus collections hold {dim}-d")
        job = self.publisher.prepare(model.version, items, item_vecs, users, user_vecs, interactions)
        job.hold = self.held
        return job

    def forget_newer(self, version: int) -> int:
        """Delete Milvus rows newer than ``version`` (at start-up, before anything was published)."""
        return self.publisher.forget_newer(version)
