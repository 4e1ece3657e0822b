"""SSMTLModel end to end: the protocol, the served blocks, growth, guards, persistence, learning, cold start, blends."""

import numpy as np
import pytest
import torch

from ebrflow.model.backfill import backfill
from ebrflow.model.base import Batch, RetrievalModel
from ebrflow.model.ssmtl import SSMTLModel
from ebrflow.ops.prequential import ranks_in, top_k

N_COMMUNITIES, USERS_PER, ITEMS_PER = 8, 40, 25


def community_stream(n_batches: int, batch_size: int, seed: int = 0, p_in: float = 0.9):
    """Users and items split into communities; a user clicks an item of its own community with prob ``p_in``."""
    rng = np.random.default_rng(seed)
    n_users = N_COMMUNITIES * USERS_PER
    for b in range(n_batches):
        users = rng.integers(0, n_users, batch_size)
        own = users % N_COMMUNITIES
        comm = np.where(rng.random(batch_size) < p_in, own, rng.integers(0, N_COMMUNITIES, batch_size))
        items = 10_000 + comm + N_COMMUNITIES * rng.integers(0, ITEMS_PER, batch_size)
        ts = np.full(batch_size, b * 1000, dtype=np.int64)
        yield Batch.of(users, items, ts_ms=ts)


def small(**kw) -> SSMTLModel:
    args = dict(dim=16, fanouts=(5, 3), lr=0.05, dense_lr=0.005, device="cpu", seed=0)
    return SSMTLModel(**{**args, **kw})


def prequential_recall(model: SSMTLModel, batch: Batch, k: int = 10) -> float:
    """Share of the batch's events (known user and item) whose item is in the user's top-k before training."""
    known_items = model.known_items()
    if len(known_items) < k:
        return float("nan")
    known_users = set(model.graph.users.ids().tolist())
    item_set = set(known_items.tolist())
    sel = [j for j, (u, i) in enumerate(zip(batch.user_ids, batch.item_ids)) if u in known_users and i in item_set]
    if not sel:
        return float("nan")
    u = model.user_embeddings(batch.user_ids[sel])
    v = model.item_embeddings(known_items)
    top = known_items[top_k(u @ v.T, k)]
    return float(np.mean(ranks_in(top, batch.item_ids[sel]) >= 0))


def test_implements_protocol_and_reports_tasks():
    m = small(balancing="mgda", tasks={"retrieval": {}, "cca_ssg": {}, "graphmae": {}})  # the default is retrieval only
    assert isinstance(m, RetrievalModel)
    report = m.fit_batch(next(community_stream(1, 256)))
    assert report.steps == 1 and m.version == 1
    assert set(report.task_losses) == set(report.task_weights) == {"retrieval", "cca_ssg", "graphmae"}
    assert all(np.isfinite(v) for v in report.task_losses.values())
    assert min(report.task_weights.values()) >= 0
    simplex = m.balancer.last_simplex
    assert set(simplex) == set(report.task_weights) and sum(simplex.values()) == pytest.approx(1.0, abs=1e-5)
    emb = m.user_embeddings(np.array([0, 1]))
    assert emb.shape == (2, 16) and emb.dtype == np.float32 and np.isfinite(emb).all()
    with pytest.raises(KeyError):
        m.user_embeddings(np.array([999_999]))
    with pytest.raises(KeyError):
        m.item_embeddings(np.array([5]))


def test_tasks_switch_off_and_fixed_weights_reported():
    m = small(tasks={"retrieval": {}, "graphmae": {"weight": 0.3}})
    report = m.fit_batch(next(community_stream(1, 128)))
    assert report.task_weights == {"retrieval": 1.0, "graphmae": 0.3}
    with pytest.raises(ValueError):
        small(tasks={"nope": {}})


def test_new_ids_grow_tables_without_restart():
    m = small()
    for b in range(3):
        users = np.arange(b * 1500, (b + 1) * 1500)
        m.fit_batch(Batch.of(users, users + 1_000_000))
    assert len(m.known_items()) == 4500
    assert m.encoder.tables[0].capacity >= 4500
    assert m.user_embeddings(np.array([4499])).shape == (1, 16)


def test_non_finite_loss_skips_step_and_keeps_weights():
    m = small()
    m.fit_batch(next(community_stream(1, 128)))
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    version = m.version
    bad = next(community_stream(1, 128, seed=1))
    bad = Batch(bad.user_ids, bad.item_ids, np.full(128, np.nan, np.float32), bad.ts_ms)
    report = m.fit_batch(bad)
    assert report.skipped_steps == 1 and report.steps == 0 and m.version == version
    for k, v in m.encoder.state_dict().items():
        if k.startswith("tables"):
            n = before[k].shape[0]
            assert torch.equal(v[:n], before[k])
        else:
            assert torch.equal(v, before[k])


def test_state_dict_round_trip_gives_identical_embeddings(tmp_path):
    m = small(ttl_ms=10_000_000)
    for batch in community_stream(3, 256):
        m.fit_batch(batch)
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    clone = small(ttl_ms=10_000_000)
    clone.load_state_dict(torch.load(path, weights_only=True))
    users, items = m.graph.users.ids(), m.known_items()
    assert clone.version == m.version
    assert np.array_equal(m.user_embeddings(users), clone.user_embeddings(users))
    assert np.array_equal(m.item_embeddings(items), clone.item_embeddings(items))
    report = clone.fit_batch(next(community_stream(1, 256, seed=9)))  # and it keeps training
    assert report.steps == 1


@pytest.mark.parametrize("balancing", ["fixed", "mgda"])
def test_learns_on_a_stream_prequential_recall_rises(balancing):
    m = small(replay_ratio=0.25, reservoir_size=2000, balancing=balancing)
    recalls = []
    for batch in community_stream(30, 256):
        recalls.append(prequential_recall(m, batch))
        m.fit_batch(batch)
    early, late = np.nanmean(recalls[1:6]), np.nanmean(recalls[-5:])
    chance = 10 / (N_COMMUNITIES * ITEMS_PER)
    # knowing only communities caps recall@10 at 0.9 · 10/25 = 0.36; chance is 10/200
    assert late > max(early + 0.05, 3 * chance), (early, late)


def test_cold_user_lands_near_its_community():
    m = small()
    for batch in community_stream(25, 256):
        m.fit_batch(batch)
    cold_user, community = 77_777, 3
    items = 10_000 + community + N_COMMUNITIES * np.array([0, 1])  # two events in community 3
    warm = next(community_stream(1, 254, seed=5))
    m.fit_batch(Batch.of(np.r_[warm.user_ids, [cold_user] * 2], np.r_[warm.item_ids, items]))
    assert m.user_degree(np.array([cold_user])).tolist() == [2]
    u = m.user_embeddings(np.array([cold_user]))[0]
    all_items = m.known_items()
    scores = m.item_embeddings(all_items) @ u
    own = (all_items - 10_000) % N_COMMUNITIES == community
    assert scores[own].mean() > scores[~own].mean() + 0.1
    # rank of the community among all items: its items fill the top far above chance (1/8; more than 3× that,
    # though the served degree prior, ``key_degree``, lifts busy items of every community too)
    top = all_items[np.argsort(-scores)[:ITEMS_PER]]
    assert np.mean((top - 10_000) % N_COMMUNITIES == community) > 3 / N_COMMUNITIES


def test_user_user_mode_trains_and_serves_targets():
    m = small(graph_mode="user_user", symmetric=True)
    rng = np.random.default_rng(0)
    users = rng.integers(0, 100, 300)
    friends = (users + rng.integers(1, 5, 300)) % 100
    report = m.fit_batch(Batch.of(users, friends))
    assert report.steps == 1
    targets = m.known_items()
    assert set(targets.tolist()) == set(friends.tolist())
    assert m.item_embeddings(targets).shape == (len(targets), 16)


def test_backfill_runs_epochs_and_respects_the_budget():
    m = small()
    batches = list(community_stream(4, 128))
    summary = backfill(m, lambda: iter(batches), epochs=3, progress=False)
    assert summary.epochs == 3 and summary.batches == 12 and summary.steps == 12
    assert len(summary.epoch_losses) == 3 and summary.epoch_losses[-1] < summary.epoch_losses[0]
    short = backfill(m, lambda: iter(batches), epochs=100, progress=False, max_seconds=0.0)
    assert short.stopped_early and short.batches == 1


def test_backfill_refits_the_spectral_block_per_epoch_not_per_growth_step():
    """Backfill refits while the graph doubles and once per epoch's end (and only if the graph changed); the
    streaming schedule (every ``spectral_growth`` of the graph) is restored afterwards and still used by
    ``spectral_refits="stream"``."""
    batches = [
        Batch.of(u, i, ts_ms=np.arange(len(u)))
        for u, i in (
            (np.arange(64) % 40, 10_000 + np.arange(64) % 25),  # distinct edges, all new
            *(((np.arange(64) * 7 + b) % 320, 10_000 + (np.arange(64) * 3 + b) % 200) for b in range(1, 24)),
        )
    ]
    streamed = small(spectral_every=32, spectral_growth=0.01)
    s_stream = backfill(streamed, lambda: iter(batches), epochs=3, progress=False, spectral_refits="stream")
    m = small(spectral_every=32, spectral_growth=0.01)
    summary = backfill(m, lambda: iter(batches), epochs=3, progress=False)
    assert s_stream.spectral_refits == 3 * len(batches)  # every batch (64 events ≥ max(32, 1% of edges))
    assert summary.spectral_refits <= 8 and summary.spectral_seconds > 0
    assert m.spectral.fitted_edges == m.graph.history_matrix().nnz  # the last fit saw the complete graph
    assert m.spectral.schedule == "stream" and not m.spectral.refit_if_changed()
    refits = summary.spectral_refits
    summary = backfill(m, lambda: iter(batches), epochs=2, progress=False)  # same file again: no new edges
    assert summary.spectral_refits <= 1 and refits >= 2  # at most once, when its events reach the fitted edges
    m.fit_batch(Batch.of(np.arange(40), np.full(40, 99_999)))  # 40 new edges ≥ max(32, 1%): the stream schedule
    assert m.spectral.fitted_edges == m.graph.history_matrix().nnz
    frozen = small(spectral_every=32, spectral_growth=0.01, steps_per_batch=0)  # training-free: one fit at the end
    summary = backfill(frozen, lambda: iter(batches), epochs=1, progress=False)
    assert summary.spectral_refits == 2 and frozen.spectral.fitted_edges == frozen.graph.history_matrix().nnz


@pytest.mark.parametrize("capacity", [8, 2])  # every neighbour buffered; the buffer keeps only the latest 2
def test_learned_block_is_one_lightgcn_hop_by_hand(capacity):
    """A served learned vector is ``½ e + ½ Σ d_self^½ / n_buf · d_nbr^-½ · e_nbr`` over the buffered neighbours
    (recency-weighted for users): LightGCN's symmetric normalisation, the sum scaled up where the buffer is full."""
    m = small(neighbour_capacity=capacity, steps_per_batch=0, recency_half_life=1.0)
    # users 10, 11; items 5, 6, 7 in this order: u10 → 5, 6, 7 (latest last), u11 → 5
    m.fit_batch(Batch.of([10, 10, 10, 11], [5, 6, 7, 5], ts_ms=[0, 1, 2, 3]))
    eu, ei = (t.weight.detach().numpy().astype(np.float64) for t in m.encoder.tables)
    d_u, d_i = np.array([3.0, 1.0]), np.array([2.0, 1.0, 1.0])
    kept = [0, 1, 2] if capacity == 8 else [1, 2]  # u10's buffered items
    recency = {2: 1.0, 1: 0.5, 0: 0.25}  # halves per newer neighbour (half-life 1)
    n_buf = len(kept)
    hop = sum(d_u[0] ** 0.5 / n_buf * d_i[j] ** -0.5 * recency[j] * ei[j] for j in kept)
    assert np.allclose(m.learned_block("query", np.array([0])), 0.5 * eu[0] + 0.5 * hop, atol=1e-6)
    item_hop = sum(d_i[0] ** 0.5 / 2 * d_u[v] ** -0.5 * eu[v] for v in (0, 1))  # item 5: users 10 and 11
    assert np.allclose(m.learned_block("key", np.array([0])), 0.5 * ei[0] + 0.5 * item_hop, atol=1e-6)


def test_served_vectors_are_the_weighted_blocks():
    """Users: ``[w_l · learned | w_f · spectral | w_f · scale]``; items: ``[learned | spectral | log q]``, with the
    blend weights of the user's segment; the inner product is the weighted sum of the blocks' scores."""
    m = small(popularity_scale=0.25)
    for batch in community_stream(3, 200):
        m.fit_batch(batch)
    m.selector.chosen[:] = 3  # (100, 1) for cold and warm users
    users, items = np.array([0, 1]), m.known_items()[:5]
    rows, item_rows = m.graph.users.lookup(users), m.graph.items.lookup(items)
    u, v = m.user_embeddings(users), m.item_embeddings(items)
    assert m.learned_dim == 8 and m.spectral.dim == 7 and u.shape == (2, 16) and v.shape == (5, 16)
    assert np.allclose(v[:, :8], m.learned_block("key", item_rows))
    assert np.allclose(v[:, 8:15], m.spectral.keys(item_rows)) and np.allclose(v[:, 15], m.popularity.log_q(item_rows))
    assert np.allclose(u[:, :8], 100 * m.learned_block("query", rows), rtol=1e-5)
    assert np.allclose(u[:, 8:15], m.spectral.queries(rows)) and np.allclose(u[:, 15], 0.25)


def test_warm_started_refits_rank_like_the_arpack_fit():
    """Refits warm-started from the last fit rank held-out events about as well as ARPACK from scratch."""
    cold, warm = small(spectral_iters=0), small(spectral_iters=1)
    stream = list(community_stream(12, 300, seed=5))
    for batch in stream[:9]:
        cold.fit_batch(batch)
        warm.fit_batch(batch)
    recall = {
        name: np.mean([prequential_recall(m, b) for b in stream[9:]]) for name, m in (("cold", cold), ("warm", warm))
    }
    assert recall["cold"] > 0.3 and abs(recall["warm"] - recall["cold"]) < 0.05, recall


def test_a_failing_svd_never_stops_training(monkeypatch, caplog):
    """ARPACK error 3 (seen once in CI on a small graph) falls back to a dense SVD; any other refit failure keeps
    the previous spectral vectors."""
    from scipy.sparse.linalg import ArpackError

    import ebrflow.model.spectral as spectral

    def arpack_fails(*args, **kwargs):
        raise ArpackError(3)

    monkeypatch.setattr(spectral, "svds", arpack_fails)
    m = small()
    stream = list(community_stream(3, 200))
    m.fit_batch(stream[0])
    assert "dense SVD" in caplog.text and np.abs(m.spectral.base[0]).sum() > 0
    before = m.spectral.base[1].copy()
    monkeypatch.setattr(spectral, "warm_svd", arpack_fails)
    monkeypatch.setattr(spectral, "DENSE_LIMIT", 0)  # now even the fallback fails
    m.fit_batch(stream[1])
    m.fit_batch(stream[2])  # the next refit is due after 256 events
    assert "spectral refit failed" in caplog.text
    assert np.array_equal(m.spectral.base[1][: len(before)], before) and m.version > 1


def test_key_degree_serves_the_low_pass_filter():
    """With ``key_degree`` ½ a spectral key is its vector times √(item degree) and a query the ``d_i^-½``-weighted
    sum of its items' vectors, so scores are ``r_u D^-½ B Bᵀ D^½`` (B: the items' spectral vectors, GF-CF's
    low-pass filter when B comes from the symmetric-normalised matrix); ``key_degree`` 0 leaves keys alone."""
    kw = dict(spectral_a=0.5, spectral_power=0.0, recency_half_life=0.0, steps_per_batch=0)
    scaled, plain = small(key_degree=0.5, **kw), small(key_degree=0.0, **kw)
    for batch in community_stream(3, 200, seed=1):
        scaled.fit_batch(batch)
        plain.fit_batch(batch)
    g, items, users = scaled.graph, scaled.known_items(), scaled.known_users()
    item_rows, user_rows = g.items.lookup(items), g.users.lookup(users)
    base = scaled.spectral.base[g.item_type][item_rows].astype(np.float64)
    degree = g.column_degree[item_rows].astype(np.float64)
    pos, nbr, _ = g.user_edges(user_rows)
    r = np.zeros((len(user_rows), g.n_rows(g.item_type)))
    r[pos, nbr] = 1.0
    r = r[:, item_rows]
    query = r @ (base / np.sqrt(degree)[:, None])
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    assert np.allclose(scaled.spectral.keys(item_rows), np.sqrt(degree)[:, None] * base, atol=1e-5)
    assert np.allclose(scaled.spectral.queries(user_rows), query, atol=1e-5)
    assert np.allclose(plain.spectral.keys(item_rows), base, atol=1e-6)
    assert np.abs(base).sum() > 0 and degree.max() > degree.min()
