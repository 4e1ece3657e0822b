"""The streaming peers of bench.quality against brute-force answers on tiny constructed streams."""

import numpy as np
import pytest

from bench.scorers import CommonNeighboursScorer, ImplicitScorer, ItemKNNScorer, implicit_available
from ebrflow.model.base import Batch


def test_item_knn_cosine_matches_brute_force() -> None:
    users = [1, 1, 2, 2, 3, 3, 3, 1]
    items = [10, 11, 10, 12, 11, 12, 13, 10]  # the last event repeats (1, 10): counted once
    s = ItemKNNScorer()
    s.learn(Batch.of(users[:4], items[:4]))
    s.learn(Batch.of(users[4:], items[4:]))
    ids = [10, 11, 12, 13]
    r = np.zeros((3, 4))
    for u, i in set(zip(users, items)):
        r[u - 1, ids.index(i)] = 1.0
    deg = r.sum(0)
    expected = r @ (r.T @ r / np.sqrt(np.outer(deg, deg))) + 1e-6 * deg
    assert np.allclose(s.scores(np.array([1, 2, 3]), np.array(ids)), expected)


@pytest.mark.parametrize("adamic_adar", [False, True])
def test_common_neighbours_plus_reciprocity_by_hand(adamic_adar: bool) -> None:
    # edges: 1→2, 3→2, 1→4, 4→3 ; undirected N(1)={2,4}, N(3)={2,4}, N(2)={1,3}, N(4)={1,3}
    s = CommonNeighboursScorer(adamic_adar=adamic_adar, bonus=100.0)
    s.learn(Batch.of([1, 3, 1, 4], [2, 2, 4, 3]))
    got = s.scores(np.array([1, 3]), np.array([3, 4]))
    w = 1.0 / np.log1p(2.0) if adamic_adar else 1.0  # every common neighbour has degree 2
    deg = 2.0
    # (1, 3): common {2, 4}; 3 never contacted 1 → 2w.  (1, 4): no common; 4 never contacted 1.
    # (3, 3): self, common = N(3) (2 nodes).   (3, 4): no common; 4 contacted 3 → bonus.
    expected = np.array([[2 * w, 0.0], [2 * w, 100.0]]) + 1e-6 * deg
    assert np.allclose(got, expected)


@pytest.mark.skipif(not implicit_available(), reason="implicit not installed")
def test_implicit_refits_every_n_events() -> None:
    s = ImplicitScorer("ALS", refit_every=4, factors=4)
    s.learn(Batch.of([1, 2], [10, 11]))  # first batch: fitted at once
    first = s.fit_s
    s.learn(Batch.of([1], [11]))  # 1 event since: no refit, new ids would score 0
    assert s.fit_s == first
    s.learn(Batch.of([3, 3, 3], [12, 10, 11]))  # 4 events since the fit → refit
    assert s.fit_s > first
    assert s.scores(np.array([1, 3]), np.array([10, 11, 12])).shape == (2, 3)
