"""Turning per-task losses into one objective: fixed weights, or MGDA's min-norm point of the task gradients."""

from __future__ import annotations

import torch


def _best_pair(gram: torch.Tensor) -> torch.Tensor:
    """Exact min-norm weights over every pair of tasks (closed form); the best pair starts Frank–Wolfe."""
    n = len(gram)
    best, w = float("inf"), torch.zeros(n, dtype=gram.dtype, device=gram.device)
    for i in range(n):
        for j in range(i + 1, n):
            denom = gram[i, i] - 2 * gram[i, j] + gram[j, j]
            a = float(((gram[j, j] - gram[i, j]) / denom).clamp(0, 1)) if denom > 0 else 0.5
            norm = a * a * gram[i, i] + 2 * a * (1 - a) * gram[i, j] + (1 - a) ** 2 * gram[j, j]
            if norm < best:
                best = float(norm)
                w.zero_()
                w[i], w[j] = a, 1 - a
    return w


def min_norm_weights(grads: torch.Tensor, max_iter: int = 250, tol: float = 1e-10) -> torch.Tensor:
    """Weights w on the simplex minimising ‖Σ wᵢ gᵢ‖ for the rows gᵢ of ``grads``, by Frank–Wolfe.

    Starts from the best pair (exact for two tasks), then each iteration moves towards the task whose
    gradient has the smallest inner product with the current combination (or away from the worst task in
    the support, which makes convergence linear), with an exact line search (Sener & Koltun 2018).

    >>> min_norm_weights(torch.tensor([[1.0, 0.0], [0.0, 2.0]])).tolist()
    [0.800000011920929, 0.20000000298023224]
    """
    gram = grads.double() @ grads.double().T
    n = len(gram)
    if n == 1:
        return torch.ones(1, dtype=grads.dtype, device=grads.device)
    w = _best_pair(gram)
    for _ in range(max_iter):
        mw = gram @ w
        vv = w @ mw
        t = int(torch.argmin(mw))
        support = torch.nonzero(w > 0).flatten()
        a = int(support[torch.argmax(mw[support])])
        if vv - mw[t] >= mw[a] - vv:  # Frank–Wolfe step towards vertex t
            d = -w.clone()
            d[t] += 1.0
            gamma_max = 1.0
        else:  # away step from vertex a (what makes the convergence linear on the simplex)
            d = w.clone()
            d[a] -= 1.0
            gamma_max = float(w[a] / (1.0 - w[a])) if w[a] < 1 else 0.0
        curvature = d @ gram @ d
        slope = w @ gram @ d
        if curvature <= tol or -slope <= tol:
            break
        w = (w + min(float(-slope / curvature), gamma_max) * d).clamp_min(0.0)
        w = w / w.sum()
    return w.to(grads.dtype)


class FixedWeights:
    """Constant task weights: total = Σ wₜ · lossₜ."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = dict(weights)

    def combine(self, losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> dict[str, float]:
        """The weight of each task in ``losses``."""
        return {name: self.weights.get(name, 1.0) for name in losses}


class MGDA:
    """Per step: gradients of each task w.r.t. the shared dense parameters, normalised, then the min-norm weights.

    ``normalise`` is "l2" (unit gradients, as in ParetoGNN) or "none". The simplex weights wₜ (kept in
    ``last_simplex``) are turned into loss multipliers wₜ/‖gₜ‖ under "l2", so the one backward of
    Σ multiplierₜ·lossₜ moves the shared parameters along the min-norm point of the *normalised* gradients;
    applying wₜ to the raw losses instead lets the task with the largest gradient scale dominate
    (on Gowalla that cost most of the recall: see bench/results/gowalla.md).
    """

    def __init__(self, normalise: str = "l2") -> None:
        if normalise not in ("l2", "none"):
            raise ValueError(f"unknown normalisation {normalise!r}")
        self.normalise = normalise
        self.last_simplex: dict[str, float] = {}

    def task_gradients(self, losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> torch.Tensor:
        """(n_tasks, n_shared_params) flattened gradients, graph retained for the final backward."""
        rows = []
        for loss in losses.values():
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (
                            g.to_dense()
                            if g is not None and g.is_sparse
                            else g
                            if g is not None
                            else torch.zeros_like(p)
                        ).reshape(-1)
                        for g, p in zip(grads, shared)
                    ]
                )
            )
        return torch.stack(rows)

    def combine(self, losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> dict[str, float]:
        """Loss multipliers for the tasks in ``losses`` (uniform simplex weights if any gradient is not finite)."""
        names = list(losses)
        if len(names) == 1:
            self.last_simplex = {names[0]: 1.0}
            return {names[0]: 1.0}
        grads = self.task_gradients(losses, shared)
        if not torch.isfinite(grads).all():
            self.last_simplex = {name: 1.0 / len(names) for name in names}
            return dict(self.last_simplex)
        norms = grads.norm(dim=1).clamp_min(1e-12) if self.normalise == "l2" else torch.ones(len(names))
        w = min_norm_weights(grads / norms.unsqueeze(1))
        self.last_simplex = {name: float(x) for name, x in zip(names, w)}
        return {name: float(x / n) for name, x, n in zip(names, w, norms)}


def make_balancer(kind: str, weights: dict[str, float]) -> FixedWeights | MGDA:
    """``"fixed"`` → FixedWeights(weights); ``"mgda"`` → MGDA()."""
    if kind == "fixed":
        return FixedWeights(weights)
    if kind == "mgda":
        return MGDA()
    raise ValueError(f"unknown balancing {kind!r}")
