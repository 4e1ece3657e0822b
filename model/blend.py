"""Which mix of the learned block and the training-free blocks is served, chosen on events not yet trained on.

A served vector concatenates a learned block (trained id embeddings, LightGCN-pooled) and training-free blocks
(spectral vectors and recent popularity); one inner product adds their scores, so the user side's block weights
decide how much each counts. No fixed weight holds everywhere: on a stream the learned block is a few passes
old and the training-free structure wins, on a catalogue trained for epochs the learned block wins by far (and the
two disagree on scale by orders of magnitude). So the weights are chosen the way a user would judge them: each
candidate is scored on held-out events (a batch before the model trains on it, or a backfill's held-out slice),
per user segment (cold: at most ``cold_max_events`` prior events, warm), and the best one recently is served.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# (weights of the learned, spectral and popularity blocks); the first is served until there is evidence
CANDIDATES: tuple[tuple[float, float, float], ...] = (
    (0.0, 1.0, 1.0),
    (1.0, 1.0, 1.0),
    (10.0, 1.0, 1.0),
    (100.0, 1.0, 1.0),
    (1000.0, 1.0, 1.0),
    (1.0, 0.0, 0.0),
    (100.0, 0.0, 1.0),
    (1000.0, 0.0, 1.0),
)
SEGMENTS = ("cold", "warm")


def candidate_ranks(
    blocks: list[np.ndarray], positive: np.ndarray, excluded: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """Per candidate and event, how many items outscore the event's positive under that candidate's weights.

    ``blocks`` are (events × items) score matrices, one per kind of block, ``positive`` the column of each event's
    item, ``excluded`` a mask of items that do not compete (the positive itself, items the user already has);
    ``candidates`` is (C × blocks). Returns (C × events).

    >>> learned, free = np.array([[0.0, 1.0, 0.0]]), np.array([[1.0, 0.0, 0.5]])
    >>> excluded = np.array([[True, False, False]])
    >>> candidate_ranks([learned, free], np.array([0]), excluded, np.array([[0.0, 1.0], [1.0, 0.0]])).tolist()
    [[0], [1]]
    """
    rows = np.arange(len(positive))
    out = np.empty((len(candidates), len(positive)), dtype=np.int64)
    for c, weights in enumerate(candidates):
        scores = sum(w * b for w, b in zip(weights, blocks) if w)
        if isinstance(scores, int):  # every weight zero: nothing outscores anything
            scores = np.zeros_like(blocks[0])
        above = (scores > scores[rows, positive][:, None]) & ~excluded
        out[c] = above.sum(axis=1)
    return out


class BlendSelector:
    """Decayed hit counts of every candidate blend per user segment, and the blend each segment is served.

    ``record`` takes one batch's held-out ranks; an event is a hit when fewer than ``k_eff`` items outscore it (the
    top-``k`` of the whole catalogue, scaled to the sampled items). Once a segment has ``min_events`` evaluated
    events it switches to the candidate with the most hits, if that one leads the served one by more than ``z``
    standard errors of the difference (so noise does not move it); counts halve every ``half_life`` evaluated events,
    so the choice follows a learned block that keeps improving.
    """

    def __init__(
        self,
        candidates: tuple[tuple[float, ...], ...] = CANDIDATES,
        cold_max_events: int = 5,
        half_life: float = 20_000.0,
        min_events: int = 200,
        z: float = 2.0,
    ) -> None:
        self.candidates = np.asarray(candidates, dtype=np.float64)
        self.cold_max_events = cold_max_events
        self.half_life = half_life
        self.min_events = min_events
        self.z = z
        self.hits = np.zeros((len(SEGMENTS), len(candidates)))
        self.n = np.zeros(len(SEGMENTS))
        self.chosen = np.zeros(len(SEGMENTS), dtype=np.int64)

    def segment(self, degrees: np.ndarray) -> np.ndarray:
        """0 (cold) or 1 (warm) per user from its prior events."""
        return (np.asarray(degrees) > self.cold_max_events).astype(np.int64)

    def weights(self, degrees: np.ndarray) -> np.ndarray:
        """(users × blocks) served block weights for users with these prior event counts."""
        return self.candidates[self.chosen[self.segment(degrees)]]

    def record(self, ranks: np.ndarray, degrees: np.ndarray, k_eff: float) -> None:
        """Count hits (rank < ``k_eff``) of every candidate on held-out events of users with ``degrees``."""
        if ranks.shape[1] == 0:
            return
        seg = self.segment(degrees)
        decay = 0.5 ** (ranks.shape[1] / self.half_life)
        self.hits *= decay
        self.n *= decay
        hit = (ranks < k_eff).astype(np.float64)
        for s in range(len(SEGMENTS)):
            mine = seg == s
            self.hits[s] += hit[:, mine].sum(axis=1)
            self.n[s] += mine.sum()
        for s in range(len(SEGMENTS)):
            best, served = int(np.argmax(self.hits[s])), self.chosen[s]
            lead = self.hits[s, best] - self.hits[s, served]
            if self.n[s] >= self.min_events and lead > self.z * np.sqrt(self.hits[s, best] + self.hits[s, served]):
                self.chosen[s] = best

    def reset(self) -> None:
        """Forget the evidence (not the choice), e.g. before scoring a backfill's held-out slice."""
        self.hits[:] = 0.0
        self.n[:] = 0.0

    def report(self) -> dict[str, tuple[float, ...]]:
        """The served (learned, spectral, popularity) weights per segment."""
        return {name: tuple(self.candidates[self.chosen[s]].tolist()) for s, name in enumerate(SEGMENTS)}

    def state_dict(self) -> dict:
        """Counts and choices as tensors."""
        return {
            "hits": torch.from_numpy(self.hits.copy()),
            "n": torch.from_numpy(self.n.copy()),
            "chosen": torch.from_numpy(self.chosen.copy()),
            "candidates": torch.from_numpy(self.candidates.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; a checkpoint with other candidates starts the evidence afresh."""
        if state["candidates"].shape != self.candidates.shape or not np.allclose(
            state["candidates"].numpy(), self.candidates
        ):
            return
        self.hits = state["hits"].numpy().copy()
        self.n = state["n"].numpy().copy()
        self.chosen = state["chosen"].numpy().copy()


def held_out_ranks(
    model: Any, batch: Any, candidates: np.ndarray, n_events: int, n_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Rank held-out events under every candidate blend, as a served query would: up to ``n_events`` events of
    ``batch`` that are new to their user (both ends already known to ``model``), each event's item against
    ``n_items`` random known items (or all of them), every item the user already had excluded.

    ``model`` offers ``graph``, ``query_blocks``, ``key_blocks`` and ``known_item_rows`` (``SSMTLModel``). Returns
    (ranks: candidates × events, the events' user rows, the factor that scales Recall@20 to the sampled pool), or
    None when there is nothing to score.
    """
    g = model.graph
    users, items = g.users.find(batch.user_ids), g.items.find(batch.item_ids)
    known = np.flatnonzero((users >= 0) & (items >= 0))
    if len(known) < 2:
        return None
    users, items = users[known], items[known]
    distinct, inverse = np.unique(users, return_inverse=True)
    pos, had = g.log.targets_of(distinct)  # every item each user has had: served queries exclude them
    n_rows = g.n_rows(g.item_type)
    # events new to their user; only history entries of the batch's items can match (a heavy user's history is long)
    in_batch = np.zeros(n_rows, dtype=bool)
    in_batch[items] = True
    hit = in_batch[had]
    width = np.int64(n_rows + 1)
    pick = np.flatnonzero(~np.isin(inverse * width + items, pos[hit] * width + had[hit]))
    if len(pick) > n_events:
        pick = np.sort(rng.choice(pick, n_events, replace=False))
    if not len(pick):
        return None
    users, items, inverse = users[pick], items[pick], inverse[pick]
    pool = model.known_item_rows()
    n_known = len(pool)
    if n_known > n_items:
        pool = pool[rng.choice(n_known, n_items, replace=False)]
    columns = np.r_[items, pool]  # each event's own item first (its positive), then the pool that competes
    blocks = [q @ k.T for q, k in zip(model.query_blocks(users), model.key_blocks(columns))]
    excluded = np.ones((len(items), len(columns)), dtype=bool)
    excluded[:, len(items) :] = pool[None, :] == items[:, None]
    column = np.full(n_rows, -1, dtype=np.int64)
    column[pool] = np.arange(len(pool)) + len(items)
    # the user's items so far do not compete: each event gets its user's history edges that land in the pool
    in_pool = column[had] >= 0
    pos, had = pos[in_pool], had[in_pool]
    order = np.argsort(pos, kind="stable")
    had_sorted, counts = had[order], np.bincount(pos, minlength=len(distinct))
    first = np.r_[0, np.cumsum(counts)[:-1]]
    per_event = counts[inverse]
    event = np.repeat(np.arange(len(items)), per_event)
    offset = np.arange(int(per_event.sum())) - np.repeat(np.cumsum(per_event) - per_event, per_event)
    excluded[event, column[had_sorted[np.repeat(first[inverse], per_event) + offset]]] = True
    ranks = candidate_ranks(blocks, np.arange(len(items)), excluded, candidates)
    return ranks, users, max(20.0 * len(pool) / max(n_known, 1), 1.0)
