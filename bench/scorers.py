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

from ebrflow.model.base import Batch, RetrievalModel


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


class _Index:
    """Raw ids → dense columns in order of first appearance (numpy-friendly)."""

    def __init__(self) -> None:
        self.col: dict[int, int] = {}

    def add(self, raw: int) -> int:
        """Column of ``raw``, assigning the next one if new."""
        c = self.col.get(raw)
        if c is None:
            c = self.col[raw] = len(self.col)
        return c

    def cols(self, ids: np.ndarray) -> np.ndarray:
        """Columns of known ids (unknown ids raise KeyError)."""
        return np.fromiter((self.col[i] for i in ids.tolist()), dtype=np.int64, count=len(ids))


def _grow_square(m: np.ndarray, n: int) -> np.ndarray:
    if n <= m.shape[0]:
        return m
    out = np.zeros((max(n, 2 * m.shape[0]), max(n, 2 * m.shape[0])), dtype=m.dtype)
    out[: m.shape[0], : m.shape[1]] = m
    return out


class ItemKNNScorer:
    """Item-kNN with cosine similarity over the binary user×item matrix, updated incrementally per batch.

    ``sim(i, j) = |U(i) ∩ U(j)| / sqrt(|U(i)|·|U(j)|)`` and ``score(u, j) = Σ_{i ∈ items(u)} sim(i, j)``, plus a
    tie-break of ``1e-6 ×`` item degree. The co-occurrence matrix is dense (items²): fine for catalogues of a few
    thousand items (the streams of bench.quality), not for Gowalla-size catalogues.
    """

    def __init__(self, name: str = "item-kNN cosine") -> None:
        self.name = name
        self._items = _Index()
        self._users = _Index()
        self._hist: list[list[int]] = []
        self._co = np.zeros((256, 256), dtype=np.float32)

    def learn(self, batch: Batch) -> None:
        """Count every new (user, item) pair into the co-occurrence matrix."""
        for u, i in zip(batch.user_ids.tolist(), batch.item_ids.tolist()):
            ur, ic = self._users.add(u), self._items.add(i)
            if ur == len(self._hist):
                self._hist.append([])
            hist = self._hist[ur]
            if ic in hist:
                continue
            self._co = _grow_square(self._co, len(self._items.col))
            if hist:
                h = np.asarray(hist)
                self._co[ic, h] += 1.0
                self._co[h, ic] += 1.0
            self._co[ic, ic] += 1.0
            hist.append(ic)

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Sum of cosine similarities between each candidate and the user's items."""
        cols = self._items.cols(items)
        n = len(self._items.col)
        deg = np.diag(self._co)[:n].astype(np.float64)
        inv = 1.0 / np.sqrt(np.maximum(deg, 1.0))
        sim = self._co[:n][:, cols] * inv[:, None] * inv[cols][None, :]
        rows = np.zeros((len(users), n), dtype=np.float64)
        for r, u in enumerate(self._users.cols(users).tolist()):
            rows[r, self._hist[u]] = 1.0
        return rows @ sim + 1e-6 * deg[cols][None, :]


class CommonNeighboursScorer:
    """User–user link prediction: common neighbours (or Adamic–Adar) on the undirected graph + a reciprocity bonus.

    ``score(u, v) = Σ_{w ∈ N(u) ∩ N(v)} weight(w) + bonus · [v contacted u before] + 1e-6 · deg(v)``, with
    ``weight(w) = 1`` (common neighbours) or ``1 / log(1 + deg(w))`` (Adamic–Adar). Neighbourhoods ignore
    direction and multiplicity. Users and items must share one id space (e.g. CollegeMsg's senders and receivers).
    """

    def __init__(self, name: str = "common neighbours + reciprocity", adamic_adar: bool = False, bonus: float = 100.0):
        self.name = name
        self.adamic_adar = adamic_adar
        self.bonus = bonus
        self._nodes = _Index()
        self._adj = np.zeros((256, 256), dtype=np.float32)  # undirected, binary
        self._out = np.zeros((256, 256), dtype=np.float32)  # directed: _out[a, b] = a contacted b

    def learn(self, batch: Batch) -> None:
        """Add each event's edge (both directions to the undirected graph)."""
        u = np.array([self._nodes.add(x) for x in batch.user_ids.tolist()], dtype=np.int64)
        v = np.array([self._nodes.add(x) for x in batch.item_ids.tolist()], dtype=np.int64)
        n = len(self._nodes.col)
        self._adj, self._out = _grow_square(self._adj, n), _grow_square(self._out, n)
        self._out[u, v] = 1.0
        self._adj[u, v] = 1.0
        self._adj[v, u] = 1.0

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Common-neighbour (Adamic–Adar) count plus the reciprocity bonus, per (user, candidate)."""
        n = len(self._nodes.col)
        u, v = self._nodes.cols(users), self._nodes.cols(items)
        adj = self._adj[:n, :n].astype(np.float64)
        deg = adj.sum(axis=1)
        left = adj[u] / np.log1p(np.maximum(deg, 1.0))[None, :] if self.adamic_adar else adj[u]
        cn = left @ adj[:, v]
        return cn + self.bonus * self._out[:n, :n][v][:, u].T + 1e-6 * deg[v][None, :]


def implicit_available() -> bool:
    """Whether the optional ``implicit`` package (ALS/BPR on CPU) can be imported."""
    try:
        import implicit  # noqa: F401
    except ImportError:
        return False
    return True


class ImplicitScorer:
    """The batch retrain a team would run instead: ``implicit`` ALS or BPR refit on all history every N events.

    Between refits users and items keep their last factors; ids that arrived since the last refit score 0 (plus
    a 1e-6 × popularity tie-break). ``fit_s`` accumulates the refit cost (also inside the evaluation's learn time).
    """

    def __init__(self, kind: str = "ALS", refit_every: int = 5000, factors: int = 64, seed: int = 0) -> None:
        self.name = f"implicit {kind}"
        self.kind = kind
        self.refit_every = refit_every
        self.factors = factors
        self.seed = seed
        self.fit_s = 0.0
        self._users, self._items = _Index(), _Index()
        self._rows: list[int] = []
        self._cols: list[int] = []
        self._since = 0
        self._uf = np.zeros((0, factors))
        self._if = np.zeros((0, factors))
        self._pop = np.zeros(0)

    def learn(self, batch: Batch) -> None:
        """Record the events; refit on everything once ``refit_every`` events arrived since the last fit."""
        for u, i in zip(batch.user_ids.tolist(), batch.item_ids.tolist()):
            self._rows.append(self._users.add(u))
            self._cols.append(self._items.add(i))
        self._since += len(batch)
        if self._since >= self.refit_every or not len(self._if):
            self._refit()

    def _refit(self) -> None:
        import time

        import scipy.sparse as sp
        from implicit.als import AlternatingLeastSquares
        from implicit.bpr import BayesianPersonalizedRanking

        t0 = time.perf_counter()
        shape = (len(self._users.col), len(self._items.col))
        m = sp.csr_matrix((np.ones(len(self._rows), np.float32), (self._rows, self._cols)), shape=shape)
        m.data[:] = 1.0
        cls = AlternatingLeastSquares if self.kind == "ALS" else BayesianPersonalizedRanking
        model = cls(factors=self.factors, random_state=self.seed, num_threads=1)
        model.fit(m, show_progress=False)
        self._uf, self._if = np.asarray(model.user_factors), np.asarray(model.item_factors)
        self._pop = np.asarray(m.sum(axis=0)).ravel()
        self._since = 0
        self.fit_s += time.perf_counter() - t0

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Factor dot products from the last refit (0 for ids newer than it) plus a popularity tie-break."""
        u, i = self._users.cols(users), self._items.cols(items)
        uf = np.zeros((len(u), self._uf.shape[1]))
        ok = u < len(self._uf)
        uf[ok] = self._uf[u[ok]]
        vf = np.zeros((len(i), self._if.shape[1]))
        ok = i < len(self._if)
        vf[ok] = self._if[i[ok]]
        pop = np.zeros(len(i))
        ok = i < len(self._pop)
        pop[ok] = self._pop[i[ok]]
        return uf @ vf.T + 1e-6 * pop[None, :]
