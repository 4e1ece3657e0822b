"""The contract between the stream and any retrieval model: a micro-batch in, a report and embeddings out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Batch:
    """A micro-batch of valid interaction events as parallel numpy arrays (one row per event).

    ``user_ids`` and ``item_ids`` are the raw int64 ids from the wire; models map them to rows
    themselves, so new ids may appear in any batch.
    """

    user_ids: np.ndarray  # int64
    item_ids: np.ndarray  # int64
    weights: np.ndarray  # float32, > 0
    ts_ms: np.ndarray  # int64, event time

    def __post_init__(self) -> None:
        n = len(self.user_ids)
        if not (len(self.item_ids) == len(self.weights) == len(self.ts_ms) == n):
            raise ValueError("Batch arrays must have equal length")

    def __len__(self) -> int:
        return len(self.user_ids)

    @classmethod
    def of(
        cls,
        user_ids: list[int] | np.ndarray,
        item_ids: list[int] | np.ndarray,
        weights: list[float] | np.ndarray | None = None,
        ts_ms: list[int] | np.ndarray | None = None,
    ) -> Batch:
        """Build a batch from lists, defaulting weights to 1 and timestamps to 0."""
        users = np.asarray(user_ids, dtype=np.int64)
        n = len(users)
        return cls(
            user_ids=users,
            item_ids=np.asarray(item_ids, dtype=np.int64),
            weights=np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32),
            ts_ms=np.zeros(n, np.int64) if ts_ms is None else np.asarray(ts_ms, np.int64),
        )


@dataclass
class TrainReport:
    """What one ``fit_batch`` call did: total loss, per-task losses and weights, and whether it was skipped."""

    loss: float
    steps: int
    task_losses: dict[str, float] = field(default_factory=dict)
    task_weights: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0


@runtime_checkable
class RetrievalModel(Protocol):
    """A continually trained two-sided embedding model.

    ``version`` increases with every successful optimisation step; it is what gets published
    next to each embedding in Milvus. Embeddings are float32 rows whose inner product is the
    retrieval score (Milvus metric IP); models may append a bias coordinate, so rows need not be unit length.
    """

    dim: int

    @property
    def version(self) -> int:
        """Number of optimiser steps applied so far."""
        ...

    def fit_batch(self, batch: Batch) -> TrainReport:
        """Learn from one micro-batch (new ids join here) and report what happened."""
        ...

    def user_embeddings(self, user_ids: np.ndarray) -> np.ndarray:
        """Current embeddings of known users, shape (len(user_ids), dim); unknown ids raise KeyError."""
        ...

    def item_embeddings(self, item_ids: np.ndarray) -> np.ndarray:
        """Current embeddings of known items, shape (len(item_ids), dim); unknown ids raise KeyError."""
        ...

    def known_items(self) -> np.ndarray:
        """All item ids the model has seen, int64."""
        ...

    def known_users(self) -> np.ndarray:
        """All user ids the model has seen, int64."""
        ...

    def expire(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        """Forget these ids (unseen for the expiry span): they leave ``known_*`` and their state; unknown ids are
        skipped; an id that comes back is new."""
        ...

    def state_dict(self) -> dict:
        """Everything needed to resume training (tensors and plain containers only, no pickled objects)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        ...
