"""The first model's behaviour: learning, cold start through history, the popularity prior, guards, state."""

from __future__ import annotations

import io

import numpy as np
import torch

from ebrflow.model.base import Batch
from ebrflow.model.prior import PopularityPrior
from ebrflow.model.training import finite_step
from ebrflow.model.two_tower import TwoTowerModel


def community_batches(n_batches: int, seed: int = 0) -> list[Batch]:
    """Users 0..199 in 4 communities pick items of their community (items c*50 .. c*50+49)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        users = rng.integers(0, 200, 512)
        items = (users % 4) * 50 + rng.integers(0, 50, 512)
        out.append(Batch.of(users, items))
    return out


def hit_rate(model: TwoTowerModel, batch: Batch, k: int = 20) -> float:
    known = np.isin(batch.user_ids, model.known_users())
    scores = model.user_embeddings(batch.user_ids[known]) @ model.item_embeddings(model.known_items()).T
    top = model.known_items()[np.argsort(-scores, axis=1)[:, :k]]
    return float((top == batch.item_ids[known, None]).any(axis=1).mean())


def test_recall_rises_on_a_community_stream() -> None:
    model = TwoTowerModel(dim=16, device="cpu")
    batches = community_batches(40)
    model.fit_batch(batches[0])
    before = hit_rate(model, batches[1])
    for b in batches[1:-1]:
        model.fit_batch(b)
    after = hit_rate(model, batches[-1])
    assert after > 2 * before and after > 0.3  # 20 of 200 items is 0.1 by chance, 0.4 within the community


def test_a_cold_user_is_placed_by_its_history() -> None:
    model = TwoTowerModel(dim=16, device="cpu")
    for b in community_batches(30):
        model.fit_batch(b)
    newcomer = 10_000
    model.fit_batch(Batch.of([newcomer, newcomer], [0, 1]))  # two items of community 0
    scores = model.user_embeddings(np.array([newcomer])) @ model.item_embeddings(np.arange(200)).T
    own, other = scores[0, :50].mean(), scores[0, 50:].mean()
    assert own > other + 0.1


def test_popularity_prior_lifts_recently_popular_items() -> None:
    model = PopularityPrior(TwoTowerModel(dim=8, device="cpu"), half_life=500, scale=0.1)
    model.fit_batch(Batch.of(np.arange(100), np.r_[np.zeros(90, int), np.arange(1, 11)]))
    vecs = model.item_embeddings(np.array([0, 5]))
    assert vecs.shape == (2, 9) and vecs[0, -1] > vecs[1, -1]  # the last coordinate: 0.1·log q_recent
    np.testing.assert_allclose(vecs[0, -1], 0.1 * np.log(0.9), rtol=1e-5)
    assert model.user_embeddings(np.array([3]))[0, -1] == 1.0


def test_lifetime_share_backs_off_items_absent_from_recent_events() -> None:
    """``lifetime`` mixes each item's lifetime share into its recent one: an item popular long ago but absent
    lately keeps ``log(lifetime × its lifetime share)`` instead of the floor; 0 is the recent share alone."""
    models = {
        w: PopularityPrior(TwoTowerModel(dim=4, device="cpu"), half_life=10, scale=1.0, lifetime=w) for w in (0.0, 0.2)
    }
    for model in models.values():
        model.fit_batch(Batch.of(np.arange(100), np.zeros(100, int)))  # item 0: every early event
        for _ in range(30):  # then 30 × 100 events of item 1 (item 0's recent count decays to nothing)
            model.fit_batch(Batch.of(np.arange(100), np.ones(100, int)))
    old = {w: float(m.item_embeddings(np.array([0]))[0, -1]) for w, m in models.items()}
    np.testing.assert_allclose(old[0.0], np.log(1e-9), rtol=1e-4)
    np.testing.assert_allclose(old[0.2], np.log(0.2 * 100 / 3100), rtol=1e-3)
    new = float(models[0.2].item_embeddings(np.array([1]))[0, -1])
    np.testing.assert_allclose(new, np.log(0.8 * 1.0 + 0.2 * 3000 / 3100), rtol=1e-3)


def test_non_finite_loss_skips_the_step_and_keeps_weights() -> None:
    model = TwoTowerModel(dim=8, device="cpu")
    model.fit_batch(Batch.of([1, 2], [3, 4]))
    before = model.item_table.weight.detach().clone()
    version = model.version
    loss = model.item_table(torch.tensor([0])).sum() * float("nan")
    assert not finite_step(model._optimizer, loss)
    assert torch.equal(before, model.item_table.weight.detach()) and model.version == version
    huge = model.item_table(torch.tensor([0])).sum() * 1e20  # finite, but its square overflows Adam's state
    assert not finite_step(model._optimizer, huge)
    assert torch.equal(before, model.item_table.weight.detach())


def test_state_round_trips_through_weights_only_load() -> None:
    model = TwoTowerModel(dim=8, device="cpu")
    for b in community_batches(3):
        model.fit_batch(b)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    clone = TwoTowerModel(dim=8, device="cpu", seed=99)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    users, items = model.known_users(), model.known_items()
    np.testing.assert_array_equal(clone.user_embeddings(users), model.user_embeddings(users))
    np.testing.assert_array_equal(clone.item_embeddings(items), model.item_embeddings(items))
    assert clone.version == model.version
    clone.fit_batch(community_batches(1, seed=5)[0])  # the optimiser state was restored too
