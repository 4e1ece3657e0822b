"""The live graph store: ring-buffer order, TTL eviction, sampling, modes and state round trip."""

import numpy as np
import pytest
import torch

from ebrflow.model.edges import RingBuffers
from ebrflow.model.graph import ITEM, USER, GraphStore


def arr(*xs):
    return np.asarray(xs, dtype=np.int64)


def test_ring_buffer_overwrites_oldest_first():
    rb = RingBuffers(capacity=3, rows=2)
    for dst, ts in ((10, 1), (11, 2), (12, 3)):
        rb.append(arr(0), arr(dst), arr(ts))
    assert sorted(rb.nbr[0].tolist()) == [10, 11, 12]
    rb.append(arr(0), arr(13), arr(4))  # evicts 10, the oldest
    assert sorted(rb.nbr[0].tolist()) == [11, 12, 13]
    rb.append(arr(0, 0), arr(14, 15), arr(5, 6))  # evicts 11 then 12
    assert sorted(rb.nbr[0].tolist()) == [13, 14, 15]
    assert rb.count[0] == 6 and rb.last_ts[0] == 6


def test_ring_buffer_batch_append_equals_one_by_one():
    rng = np.random.default_rng(0)
    src, dst = rng.integers(0, 5, 200), rng.permutation(1000)[:200]  # distinct edges
    ts = np.arange(200)
    a, b = RingBuffers(4, rows=5), RingBuffers(4, rows=5)
    a.append(src, dst, ts)
    for s, d, t in zip(src, dst, ts):
        b.append(arr(s), arr(d), arr(t))
    for r in range(5):
        assert sorted(a.nbr[r].tolist()) == sorted(b.nbr[r].tolist())
    assert a.count.tolist() == b.count.tolist()


def test_repeated_edge_refreshes_instead_of_taking_a_slot():
    rb = RingBuffers(capacity=2, rows=1)
    rb.append(arr(0, 0), arr(1, 2), arr(1, 2))
    rb.append(arr(0), arr(1), arr(9))  # already buffered: only its time moves
    assert sorted(rb.nbr[0].tolist()) == [1, 2] and rb.count[0] == 2
    assert rb.ts[0][rb.nbr[0].tolist().index(1)] == 9


def test_ttl_evicts_idle_rows_and_hides_old_edges():
    g = GraphStore(capacity=4, ttl_ms=100)
    g.add_events(arr(1, 2), arr(10, 11), arr(0, 0))
    g.add_events(arr(1), arr(12), arr(150))  # user 1 active at 150, user 2 idle since 0
    assert g.evict() == 3  # user 2 and items 10, 11 are idle since 0
    users = g.users.lookup(arr(1, 2))
    assert g.buffers[USER].count[users[1]] == 0
    assert g.buffers[USER].count[users[0]] > 0
    rows, masks, _ = g.sample(users[:1], USER, [4])
    got = set(rows[1][masks[1]].tolist())
    assert got == {int(g.items.lookup(arr(12))[0])}  # edge to item 10 (ts 0) is older than the TTL


def test_evict_counts_every_idle_row():
    g = GraphStore(capacity=4, ttl_ms=10)
    g.add_events(arr(1, 2, 3), arr(7, 8, 9), arr(0, 0, 100))
    # idle: users 1, 2 and items 7, 8
    assert g.evict() == 4
    assert g.evict() == 0


def test_sampling_shapes_and_valid_neighbours():
    rng = np.random.default_rng(1)
    g = GraphStore(capacity=8, seed=3)
    users, items = rng.integers(0, 50, 2000), rng.integers(0, 80, 2000)
    g.add_events(users, items, np.zeros(2000, np.int64))
    u_rows = g.users.lookup(users)
    i_rows = g.items.lookup(items)
    truth_u = {(u, i) for u, i in zip(u_rows.tolist(), i_rows.tolist())}
    roots = np.arange(len(g.users))
    rows, masks, types = g.sample(roots, USER, [5, 3])
    assert types == [USER, ITEM, USER]
    assert rows[1].shape == (len(roots), 5) and rows[2].shape == (len(roots), 5, 3)
    assert masks[1].all()  # every user has ≥ 5 distinct items here
    for r, nbrs, ok in zip(roots, rows[1], masks[1]):
        assert all((int(r), int(n)) in truth_u for n in nbrs[ok])
        assert len(set(nbrs[ok].tolist())) == ok.sum()  # without replacement
    hop2_valid = rows[2][masks[2]]
    assert hop2_valid.max() < len(g.users)


def test_sampling_masks_missing_neighbours():
    g = GraphStore(capacity=8)
    g.add_events(arr(1, 1), arr(5, 6), arr(0, 0))
    rows, masks, _ = g.sample(g.users.lookup(arr(1)), USER, [4, 2])
    assert masks[1].sum() == 2
    assert not masks[2][~masks[1]].any()


def test_user_user_mode_requires_explicit_symmetry():
    with pytest.raises(ValueError):
        GraphStore(mode="user_user")
    sym = GraphStore(mode="user_user", symmetric=True, capacity=4)
    u, v = sym.add_events(arr(1), arr(2), arr(0))
    assert sym.n_types == 1 and sym.item_type == USER
    assert sym.buffers[USER].count[v[0]] == 1  # 2 → 1 stored too
    directed = GraphStore(mode="user_user", symmetric=False, capacity=4)
    u, v = directed.add_events(arr(1), arr(2), arr(0))
    assert directed.buffers[USER].count[u[0]] == 1 and directed.buffers[USER].count[v[0]] == 0


def test_user_degree_counts_events():
    g = GraphStore()
    g.add_events(arr(1, 1, 2), arr(5, 6, 5), arr(0, 0, 0))
    assert g.user_degree(arr(1, 2)).tolist() == [2, 1]


def test_degrees_count_distinct_neighbours_beyond_the_buffer():
    g = GraphStore(capacity=2)
    g.add_events(arr(1, 1, 1, 2), arr(5, 6, 7, 5), arr(0, 1, 2, 3))  # user 1: items 5, 6, 7
    assert g.degree_of(USER, np.array([0, 1])).tolist() == [3, 1]  # the buffer keeps 2, the degree counts 3
    assert g.degree_of(ITEM, np.array([0, 1, 2])).tolist() == [2, 1, 1]
    pos, nbr, w = g.neighbours(USER, np.array([0]))
    assert sorted(nbr.tolist()) == [1, 2] and w.tolist() == [1.0, 1.0]  # the two latest: items 6 and 7


def test_state_round_trip(tmp_path):
    g = GraphStore(capacity=4, ttl_ms=1000)
    rng = np.random.default_rng(0)
    g.add_events(rng.integers(0, 30, 300), rng.integers(0, 30, 300), rng.integers(0, 500, 300))
    path = tmp_path / "g.pt"
    torch.save(g.state_dict(), path)
    h = GraphStore(capacity=4, ttl_ms=1000)
    h.load_state_dict(torch.load(path, weights_only=True))
    assert np.array_equal(g.users.ids(), h.users.ids()) and np.array_equal(g.items.ids(), h.items.ids())
    for t in range(2):
        assert np.array_equal(g.buffers[t].nbr, h.buffers[t].nbr)
        assert np.array_equal(g.buffers[t].count, h.buffers[t].count)
    assert g.cutoff() == h.cutoff()
