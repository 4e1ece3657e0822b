"""The LightGCN encoder and the spectral block on constructed inputs: layers, recency, spectral fit, cold users."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ebrflow.model.base import Batch
from ebrflow.model.edges import EdgeLog
from ebrflow.model.encoder import GraphEncoder, NeighbourMean, combine_layers
from ebrflow.model.graph import USER, GraphStore
from ebrflow.model.spectral import normalised, procrustes, spectral_embeddings
from ebrflow.model.ssmtl import SSMTLModel


def test_neighbour_mean_layer_has_no_parameters_and_returns_the_mean() -> None:
    layer = NeighbourMean()
    assert list(layer.parameters()) == []
    assert layer(torch.zeros(1, 2), torch.tensor([[1.0, 3.0]])).tolist() == [[1.0, 3.0]]
    enc = GraphEncoder(4, 2, n_layers=2)
    assert list(enc.layers.parameters()) == [] and enc.shared_parameters() == [t.weight for t in enc.tables]


def test_combine_layers_weights_and_mean() -> None:
    outs = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([6.0])]
    assert combine_layers(outs, None).item() == pytest.approx(3.0)
    assert combine_layers(outs, (0.0, 1.0, 0.5)).item() == pytest.approx(5.0)
    with pytest.raises(ValueError):
        combine_layers(outs, (1.0,))


def test_recency_weights_halve_per_newer_neighbour() -> None:
    g = GraphStore(capacity=4)
    g.add_events(np.array([1, 1, 1]), np.array([7, 8, 9]), np.array([10, 20, 30]))
    rows, cols, w = g.user_edges(np.array([0]), recency_half_life=1.0)
    by_item = dict(zip(cols.tolist(), w.tolist()))
    assert by_item == {0: 0.25, 1: 0.5, 2: 1.0}
    g.add_events(np.array([1]), np.array([7]), np.array([40]))  # repeat: item 7 becomes the most recent
    _, cols, w = g.user_edges(np.array([0]), recency_half_life=1.0)
    assert dict(zip(cols.tolist(), w.tolist()))[0] == 1.0


def test_full_rank_spectral_propagation_equals_item_knn_cosine() -> None:
    rng = np.random.default_rng(0)
    r = (rng.random((12, 6)) < 0.4).astype(float)
    r[:, r.sum(0) == 0] = 1.0
    r = np.c_[r, r[:, :1]]  # 7 items of rank ≤ 6: k = 7 keeps every non-zero singular value (svds gives ≤ 6)
    users, items = spectral_embeddings(sp.csr_matrix(r), k=7)
    deg = r.sum(0)
    cosine = r.T @ r / np.sqrt(np.outer(deg, deg))
    knn = r @ cosine
    prop = (r @ items) @ items.T  # one propagation layer of the item vectors, then inner product
    ratio = prop / knn
    assert np.allclose(ratio, ratio[0, 0], atol=1e-6)
    assert users.shape == (12, 7) and np.isclose(np.linalg.norm(items, axis=1).max(), 1.0)


def test_normalised_and_procrustes() -> None:
    m = sp.csr_matrix(np.array([[1.0, 1.0], [0.0, 1.0]]))
    assert np.allclose(normalised(m, 0.5, 0.5).toarray(), [[1 / np.sqrt(2), 1 / 2], [0.0, 1 / np.sqrt(2)]])
    x = np.random.default_rng(1).standard_normal((5, 3))
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((3, 3)))
    assert np.allclose((x @ q) @ procrustes(x @ q, x), x)


def test_edge_log_deduplicates_and_keeps_latest_time() -> None:
    log = EdgeLog()
    log.append(np.array([0, 1, 0]), np.array([3, 3, 3]), np.array([5, 6, 9]))
    m = log.matrix((2, 4))
    assert m.toarray().tolist() == [[0, 0, 0, 1], [0, 0, 0, 1]]
    assert log.ts.tolist() == [9, 6]
    assert log.matrix((2, 4), cutoff=7).toarray()[1].sum() == 0
    sym = log.matrix((4, 4), symmetric=True).toarray()
    assert sym[3, 0] == 1 and sym[0, 3] == 1


def _two_blocks(n_batches: int = 6):
    rng = np.random.default_rng(0)
    for b in range(n_batches):
        users = rng.integers(0, 40, 128)
        items = 1000 + (users % 2) * 50 + rng.integers(0, 50, 128)  # even users: items 1000–1049, odd: 1050–1099
        yield Batch.of(users, items, ts_ms=np.full(128, b))


def test_one_event_user_gets_its_neighbours_embedding() -> None:
    m = SSMTLModel(dim=8, spectral_every=1, steps_per_batch=0, device="cpu")
    for batch in _two_blocks():
        m.fit_batch(batch)
    m.fit_batch(Batch.of([999], [1003], ts_ms=[10]))  # a brand-new user with one event in block 0
    items = m.known_items()
    scores = m.user_embeddings(np.array([999])) @ m.item_embeddings(items).T
    top = items[np.argsort(-scores[0])[:20]]
    assert (top < 1050).mean() >= 0.9


def test_state_dict_round_trip_keeps_the_spectral_block() -> None:
    m = SSMTLModel(dim=8, spectral_every=256, device="cpu")
    for batch in _two_blocks(3):
        m.fit_batch(batch)
    state = m.state_dict()
    other = SSMTLModel(dim=8, spectral_every=256, device="cpu")
    other.load_state_dict(state)
    ids = np.arange(10)
    assert np.allclose(m.user_embeddings(ids), other.user_embeddings(ids), atol=1e-6)
    assert np.allclose(m.item_embeddings(m.known_items()), other.item_embeddings(m.known_items()), atol=1e-6)
    assert other.spectral.since == m.spectral.since and other.spectral.fitted_edges == m.spectral.fitted_edges
    assert np.array_equal(other.spectral.base[USER], m.spectral.base[USER]) and len(m.spectral.base[USER])


def test_mgda_runs_with_parameter_free_propagation() -> None:
    m = SSMTLModel(dim=8, tasks={"retrieval": {}, "infonce": {}}, balancing="mgda", device="cpu")
    report = m.fit_batch(next(_two_blocks(1)))
    assert report.steps == 1 and np.isfinite(report.loss)


def test_l2_is_the_mean_squared_length_of_touched_rows() -> None:
    m = SSMTLModel(dim=2, spectral_dim=0, popularity_half_life=0, device="cpu", l2=0.5)
    m.fit_batch(Batch.of([1, 2], [7, 8]))
    with torch.no_grad():
        m.encoder.tables[0].weight[:2] = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        m.encoder.tables[1].weight[:2] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # users: (25 + 0) / 2 ; items: (1 + 4) / 2
    assert m.root_norm(np.array([0, 1]), np.array([0, 1])).item() == pytest.approx(12.5 + 2.5)
