"""Each loss pinned on constructed inputs, checked against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebrflow.model.balancing import MGDA, min_norm_weights
from ebrflow.model.losses import cca_ssg_loss, cca_ssg_terms, info_nce, sampled_softmax, scaled_cosine_error


def whitened(n: int = 64, d: int = 4, seed: int = 0) -> torch.Tensor:
    """Zero-mean columns with identity correlation (orthonormal, centred)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.linalg.qr(a - a.mean(0))[0]


def test_cca_decorrelation_zero_for_whitened_identical_views():
    z = whitened()
    inv, dec = cca_ssg_terms(z, z)
    assert inv.item() == pytest.approx(0.0, abs=1e-10)
    assert dec.item() == pytest.approx(0.0, abs=1e-6)


def test_cca_decorrelation_grows_with_correlation():
    z = whitened(n=256, d=2)
    x, y = z[:, :1], z[:, 1:]
    decs = []
    for rho in (0.0, 0.3, 0.6, 0.9):
        view = torch.cat([x, rho * x + math.sqrt(1 - rho**2) * y], dim=1)
        decs.append(cca_ssg_terms(view, view)[1].item())
    # two views, each contributing 2·rho² off-diagonal squared correlation
    assert decs == pytest.approx([4 * r**2 for r in (0.0, 0.3, 0.6, 0.9)], rel=1e-5, abs=1e-6)
    assert decs == sorted(decs)


def test_cca_invariance_and_lambda():
    z1, z2 = whitened(seed=0), whitened(seed=1)
    inv, dec = cca_ssg_terms(z1, z2)
    assert inv.item() > 0.1
    assert cca_ssg_loss(z1, z2, lam=0.5).item() == pytest.approx(inv.item() + 0.5 * dec.item())


def test_mgda_orthogonal_unit_gradients_split_evenly():
    w = min_norm_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert w.tolist() == pytest.approx([0.5, 0.5])


def test_mgda_hand_computed_min_norm_point():
    # minimise |a·(1,0) + (1-a)·(0,2)|² = a² + 4(1-a)² → a = 0.8; combination (0.8, 0.4)
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w = min_norm_weights(g)
    assert w.tolist() == pytest.approx([0.8, 0.2], abs=1e-6)
    assert (w @ g).tolist() == pytest.approx([0.8, 0.4], abs=1e-6)


def test_mgda_conflict_free_gradient_takes_smaller_vertex():
    # g2 = 3·g1: the min-norm point is g1 itself
    assert min_norm_weights(torch.tensor([[1.0, 1.0], [3.0, 3.0]])).tolist() == pytest.approx([1.0, 0.0])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(1, 6), st.integers(0, 10_000))
def test_mgda_weights_on_simplex_and_no_worse_than_grid(n_tasks, dim, seed):
    g = torch.from_numpy(np.random.default_rng(seed).normal(size=(n_tasks, dim))).float()
    w = min_norm_weights(g)
    assert (w >= -1e-7).all() and w.sum().item() == pytest.approx(1.0, abs=1e-5)
    best = float(torch.linalg.norm(w @ g))
    grid = np.random.default_rng(seed + 1).dirichlet(np.ones(n_tasks), size=2000)
    brute = torch.linalg.norm(torch.from_numpy(grid).float() @ g, dim=1).min().item()
    # Frank–Wolfe is approximate for > 2 tasks: allow 1 % of the gradient scale
    assert best <= brute + 0.01 * float(torch.linalg.norm(g, dim=1).max())


def test_mgda_balancer_normalises_and_reports_simplex_weights():
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    losses = {"a": 10.0 * p[0], "b": 0.1 * p[1]}  # gradients (10, 0) and (0, 0.1): very different scales
    mgda = MGDA()
    multipliers = mgda.combine(losses, [p])
    assert mgda.last_simplex == pytest.approx({"a": 0.5, "b": 0.5})  # unit gradients are orthogonal
    assert multipliers == pytest.approx({"a": 0.05, "b": 5.0})  # w / |g|
    # the applied combination moves p along the min-norm point of the normalised gradients
    total = sum(multipliers[k] * v for k, v in losses.items())
    (grad,) = torch.autograd.grad(total, [p])
    assert grad.tolist() == pytest.approx([0.5, 0.5])


def test_scaled_cosine_error_value():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([True, True])
    # row 0: cos 0 → (1-0)^3 = 1; row 1: cos 1 → 0; mean 0.5
    assert scaled_cosine_error(pred, target, mask, alpha=3.0).item() == pytest.approx(0.5)


def test_scaled_cosine_error_only_masked_rows_get_gradient():
    pred = torch.randn(6, 4, requires_grad=True)
    target = torch.randn(6, 4)
    mask = torch.tensor([True, False, True, False, False, True])
    scaled_cosine_error(pred, target, mask, alpha=2.0).backward()
    assert (pred.grad[~mask] == 0).all()
    assert (pred.grad[mask].abs().sum(dim=1) > 0).all()
    # changing an unmasked row changes nothing
    other = pred.detach().clone()
    other[1] += 5.0
    assert scaled_cosine_error(other, target, mask, 2.0).item() == pytest.approx(
        scaled_cosine_error(pred.detach(), target, mask, 2.0).item()
    )


def test_sampled_softmax_logq_matches_hand_computation():
    q, k = torch.eye(2), torch.eye(2)
    log_q = torch.log(torch.tensor([0.9, 0.1]))
    loss = sampled_softmax(q, k, torch.tensor([0, 1]), temperature=1.0, log_q=log_q).item()
    row0 = [1 - math.log(0.9), 0 - math.log(0.1)]
    row1 = [0 - math.log(0.9), 1 - math.log(0.1)]
    ce = [-(r[i] - math.log(sum(math.exp(x) for x in r))) for i, r in enumerate((row0, row1))]
    assert loss == pytest.approx(sum(ce) / 2, rel=1e-5)
    # the popular item (high q) is a cheaper negative after correction: row 1's loss drops
    plain = sampled_softmax(q, k, torch.tensor([0, 1]), temperature=1.0).item()
    assert ce[1] < plain


def test_sampled_softmax_masks_accidental_hits():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    ids = torch.tensor([5, 5, 9])  # rows 0 and 1 share item 5: neither is the other's negative
    masked = sampled_softmax(q, k, ids, temperature=1.0)
    logits = q @ k.T
    expect = []
    for i in range(3):
        cols = [j for j in range(3) if j == i or ids[j] != ids[i]]
        expect.append(-(logits[i, i] - torch.logsumexp(logits[i, cols], 0)))
    assert masked.item() == pytest.approx(torch.stack(expect).mean().item(), rel=1e-6)


def test_sampled_softmax_extra_negatives_raise_loss():
    q, k = torch.eye(3), torch.eye(3)
    base = sampled_softmax(q, k, torch.arange(3), 0.5)
    more = sampled_softmax(q, k, torch.arange(3), 0.5, extra_keys=torch.eye(3)[:1])
    assert more.item() > base.item()


def test_info_nce_prefers_aligned_views():
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    noisy = z + 0.01 * torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    shuffled = z[torch.randperm(16, generator=torch.Generator().manual_seed(2))]
    assert info_nce(z, noisy, 0.2).item() < info_nce(z, shuffled, 0.2).item()
