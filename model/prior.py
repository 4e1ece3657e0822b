"""A recent-popularity prior added to any model's served score through one extra embedding coordinate."""

from __future__ import annotations

import numpy as np

from ebrflow.model.base import Batch, RetrievalModel, TrainReport
from ebrflow.model.frequency import ItemFrequency
from ebrflow.model.tables import IdIndex


class RecentPopularity:
    """Each item row's share of recent events (decayed with a half-life of ``half_life`` events), optionally mixed
    with its lifetime share (``lifetime``): what the served popularity coordinate carries.

    >>> p = RecentPopularity(half_life=100)
    >>> p.count(np.array([0, 0, 1]))
    >>> bool(p.log_q(np.array([0]))[0] > p.log_q(np.array([1]))[0])
    True
    """

    def __init__(self, half_life: float = 1000.0, lifetime: float = 0.0) -> None:
        self.half_life = half_life
        self.lifetime = lifetime
        self._frequency = ItemFrequency(decay=1.0)
        self._lifetime = ItemFrequency(decay=1.0)

    def count(self, rows: np.ndarray) -> None:
        """Count one batch's item rows (the recent counts decay by the batch's length first)."""
        self._frequency.decay = 0.5 ** (len(rows) / self.half_life)
        self._frequency.update(rows)
        self._lifetime.update(rows)

    def log_q(self, rows: np.ndarray) -> np.ndarray:
        """Log popularity of item ``rows``: the recent share, mixed with the lifetime share by ``lifetime``.

        An item absent from recent events otherwise gets the floor share (1e-9) whatever its history; the lifetime
        share backs such items off to how popular they have been (in a file replayed in random order, recency is
        noise and the lifetime share is the signal).
        """
        if self.lifetime <= 0:
            return self._frequency.log_q(rows)
        recent, lifetime = np.exp(self._frequency.log_q(rows)), np.exp(self._lifetime.log_q(rows))
        mixed = (1.0 - self.lifetime) * recent + self.lifetime * lifetime
        return np.log(np.maximum(mixed, 1e-9))

    def reset(self, rows: np.ndarray) -> None:
        """Forget the counts of ``rows`` (removed items: another may reuse the row)."""
        self._frequency.reset(rows)
        self._lifetime.reset(rows)

    def state_dict(self) -> dict:
        """Recent and lifetime counts."""
        return {"frequency": self._frequency.state_dict(), "lifetime": self._lifetime.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()`` (checkpoints without lifetime counts start them from the recent ones)."""
        self._frequency.load_state_dict(state["frequency"])
        self._lifetime.load_state_dict(state.get("lifetime", state["frequency"]))


class PopularityPrior:
    """Wraps a ``RetrievalModel`` so the served score becomes ``s(u, i) + scale · log q_recent(i)``.

    ``q_recent`` is each item's share of recent events, decayed with a half-life of ``half_life`` events.
    Users get a trailing 1 and items a trailing ``scale · log q_recent``, so Milvus' inner product ranks by
    the sum. With ``scale`` = the inner model's softmax temperature, the served logit is
    ``cos / T + log q_recent``: the model's (logQ-corrected) preference times recent popularity. On the
    streaming benchmarks (bench/results/quality.md) this prior is worth more than any other change we tried.

    >>> from ebrflow.model.two_tower import TwoTowerModel
    >>> m = PopularityPrior(TwoTowerModel(dim=7, device="cpu"), half_life=100, scale=0.1)
    >>> _ = m.fit_batch(Batch.of([1, 2, 3], [10, 10, 11]))
    >>> m.dim, bool(m.item_embeddings(np.array([10]))[0, -1] > m.item_embeddings(np.array([11]))[0, -1])
    (8, True)
    """

    def __init__(
        self, model: RetrievalModel, half_life: float = 1000.0, scale: float = 0.1, lifetime: float = 0.0
    ) -> None:
        self.model = model
        self.scale = scale
        self.dim = model.dim + 1
        self._items = IdIndex()
        self.popularity = RecentPopularity(half_life, lifetime)

    @property
    def version(self) -> int:
        """The inner model's version."""
        return self.model.version

    def fit_batch(self, batch: Batch) -> TrainReport:
        """Train the inner model, then count the batch's items into the decayed popularity."""
        report = self.model.fit_batch(batch)
        self.count(batch)
        return report

    def count(self, batch: Batch) -> None:
        """Count the batch's items into the decayed popularity (what ``fit_batch`` adds to the inner model's step)."""
        self.popularity.count(self._items.add(batch.item_ids))

    def user_embeddings(self, user_ids: np.ndarray) -> np.ndarray:
        """The inner user vectors with a trailing 1."""
        u = self.model.user_embeddings(user_ids)
        return np.concatenate([u, np.ones((len(u), 1), np.float32)], axis=1)

    def item_embeddings(self, item_ids: np.ndarray) -> np.ndarray:
        """The inner item vectors with a trailing ``scale · log q_recent``."""
        v = self.model.item_embeddings(item_ids)
        prior = self.scale * self.popularity.log_q(self._items.lookup(np.asarray(item_ids, dtype=np.int64)))
        return np.concatenate([v, prior[:, None].astype(np.float32)], axis=1)

    def expire(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        """Forget ids in the inner model and the removed items' popularity counts."""
        self.model.expire(user_ids, item_ids)
        self.popularity.reset(self._items.remove(np.asarray(item_ids, dtype=np.int64)))

    def known_items(self) -> np.ndarray:
        """The inner model's items."""
        return self.model.known_items()

    def known_users(self) -> np.ndarray:
        """The inner model's users."""
        return self.model.known_users()

    def state_dict(self) -> dict:
        """The inner state plus the popularity counts."""
        return {
            "model": self.model.state_dict(),
            "items": self._items.state_dict(),
            **self.popularity.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        self.model.load_state_dict(state["model"])
        self._items.load_state_dict(state["items"])
        self.popularity.load_state_dict(state)
