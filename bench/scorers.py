"""The methods compared by bench.quality, each behind the ``bench.common.Scorer`` interface.

- ``ModelScorer``: any ebrflow ``RetrievalModel``: inner product of its published embeddings (Milvus' IP score);
- ``RiverScorer``: river's ``reco.FunkMF`` / ``reco.BiasedMF``, scored vectorised from their factor dicts
  (equal to ``predict_one`` per item, checked in tests), with uniformly sampled negatives for implicit feedback;
- ``PopularityScorer``: most popular recently, exponentially decayed counts (same list for every user).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from model.base import Batch, RetrievalModel


class ModelScorer:
    """An ebrflow model: ``fit_batch`` to learn; the inner product of its embeddings (what Milvus ranks by) to score."""

    def __init__(self, name: str, model: RetrievalModel) -> None:
        self.name = name
        self.model = model

    def learn(self, batch: Batch) -> None:
        """One ``fit_batch`` call, exactly as the pipeline does."""
        self.model.fit_batch(batch)

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Inner product of user and item embeddings, exactly the served score."""
        return self.model.user_embeddings(users) @ self.model.item_embeddings(items).T


class RiverScorer:
    """A river recommender fed implicit feedback: each event is ``y=1``; ``negatives`` random seen items get ``y=0``.

    With positives only, squared loss has nothing to separate (BiasedMF's global mean becomes 1 and every
    residual ~0), so negatives are part of the protocol, drawn uniformly from the items seen so far.
    """

    def __init__(self, name: str, model: Any, negatives: int = 1, seed: int = 0) -> None:
        self.name = name
        self.model = model
        self.negatives = negatives
        self._rng = np.random.default_rng(seed)
        self._items: list[int] = []
        self._known: set[int] = set()

    def learn(self, batch: Batch) -> None:
        """``learn_one`` per event (and per sampled negative), in stream order."""
        for i in batch.item_ids.tolist():
            if i not in self._known:
                self._known.add(i)
                self._items.append(i)
        pool = np.asarray(self._items, dtype=np.int64)
        neg = pool[self._rng.integers(0, len(pool), size=(len(batch), self.negatives))].tolist()
        learn = self.model.learn_one
        for (u, i), negs in zip(zip(batch.user_ids.tolist(), batch.item_ids.tolist()), neg):
            learn(u, i, 1.0)
            for j in negs:
                learn(u, j, 0.0)

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``predict_one`` for every pair, computed from the model's factor dicts without creating entries."""
        return river_scores(self.model, users, items)


def _stack(latents: dict, ids: np.ndarray, n_factors: int) -> np.ndarray:
    zero = np.zeros(n_factors)
    return np.array([latents.get(x, zero) for x in ids.tolist()], dtype=np.float64).reshape(len(ids), n_factors)


def river_scores(model: Any, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Vectorised ``FunkMF``/``BiasedMF`` prediction for all (user, item) pairs (reads, never writes, the dicts)."""
    k = model.n_factors
    scores = _stack(model.u_latents, users, k) @ _stack(model.i_latents, items, k).T
    if hasattr(model, "u_biases"):
        ub = np.array([model.u_biases.get(u, 0.0) for u in users.tolist()])
        ib = np.array([model.i_biases.get(i, 0.0) for i in items.tolist()])
        scores += model.global_mean.get() + ub[:, None] + ib[None, :]
    return scores


class PopularityScorer:
    """Most popular recently: per-item counts decayed by half every ``half_life`` events (None: all-time counts)."""

    def __init__(self, name: str, half_life: float | None = 5000.0) -> None:
        self.name = name
        self.half_life = half_life
        self._counts: dict[int, float] = {}

    def learn(self, batch: Batch) -> None:
        """Decay every count by the batch's length, then count the batch's items."""
        if self.half_life:
            factor = 0.5 ** (len(batch) / self.half_life)
            self._counts = {i: c * factor for i, c in self._counts.items()}
        for i in batch.item_ids.tolist():
            self._counts[i] = self._counts.get(i, 0.0) + 1.0

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The same decayed counts for every user."""
        row = np.array([self._counts.get(i, 0.0) for i in items.tolist()])
        return np.broadcast_to(row, (len(users), len(items)))


ScorerFactory = Callable[[], Any]


def river_factory(kind: str, n_factors: int | None = None, lr: float | None = None, seed: int = 0) -> Any:
    """``reco.FunkMF``/``reco.BiasedMF`` with river's defaults, overriding ``n_factors``/SGD learning rate if given."""
    from river import optim, reco

    kwargs: dict[str, Any] = {"seed": seed}
    if n_factors is not None:
        kwargs["n_factors"] = n_factors
    if kind == "FunkMF":
        if lr is not None:
            kwargs["optimizer"] = optim.SGD(lr)
        return reco.FunkMF(**kwargs)
    if kind == "BiasedMF":
        if lr is not None:
            kwargs["bias_optimizer"] = optim.SGD(lr)
            kwargs["latent_optimizer"] = optim.SGD(lr)
        return reco.BiasedMF(**kwargs)
    raise ValueError(f"unknown river model {kind!r}")
