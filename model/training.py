"""The guarded, chunked training loop every model runs per micro-batch, and the guard itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ebrflow.model.base import TrainReport


class StepResult(NamedTuple):
    """What one applied optimiser step reports: total loss, and each task's loss and weight."""

    loss: float
    task_losses: dict[str, float]
    task_weights: dict[str, float]


def finite_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
    """Backpropagate ``loss`` and step only if the loss and every gradient are finite, squares included.

    Returns False (weights untouched, gradients cleared) when anything is NaN or inf, or a gradient's square
    overflows (|g| > ~1.8e19 in float32): Adam would store an infinite second moment and turn the row's weights
    into NaN at its next update (seen on Gowalla: SimGCL views of zero-initialised rows gave |g| ≈ 4e19 on the
    first step, and every later step was skipped).
    """
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            values = g.coalesce().values() if g.is_sparse else g
            if not torch.isfinite(values.square()).all():  # NaN/inf, or a square Adam cannot hold
                optimizer.zero_grad(set_to_none=True)
                return False
    optimizer.step()
    return True


def train_chunks(
    step: Callable[[np.ndarray], StepResult | None],
    n_events: int,
    rng: np.random.Generator,
    steps_per_batch: int,
    max_step_size: int,
    min_step_size: int = 1,
) -> TrainReport:
    """``steps_per_batch`` passes over ``n_events`` in a fresh random order each, in chunks of ``max_step_size``.

    ``step(positions)`` trains on one chunk and returns its figures, or None when the guard skipped it (counted in
    ``skipped_steps``); chunks shorter than ``min_step_size`` are left out. The report averages the applied steps.

    >>> rep = train_chunks(lambda idx: StepResult(float(len(idx)), {}, {}), 5, np.random.default_rng(0), 2, 2)
    >>> rep.steps, rep.loss, rep.skipped_steps
    (6, 1.6666666666666667, 0)
    """
    losses: list[float] = []
    task_losses: dict[str, list[float]] = {}
    task_weights: dict[str, list[float]] = {}
    skipped = 0
    for _ in range(steps_per_batch):
        order = rng.permutation(n_events)
        for start in range(0, n_events, max_step_size):
            idx = order[start : start + max_step_size]
            if len(idx) < min_step_size:
                continue
            result = step(idx)
            if result is None:
                skipped += 1
                continue
            losses.append(result.loss)
            for name, value in result.task_losses.items():
                task_losses.setdefault(name, []).append(value)
                task_weights.setdefault(name, []).append(result.task_weights[name])
    return TrainReport(
        loss=float(np.mean(losses)) if losses else float("nan"),
        steps=len(losses),
        task_losses={k: float(np.mean(v)) for k, v in task_losses.items()},
        task_weights={k: float(np.mean(v)) for k, v in task_weights.items()},
        skipped_steps=skipped,
    )


class JointOptimizer:
    """SparseAdam (id tables) and Adam (task heads) stepped as one, so ``finite_step`` guards both."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        """All parameter groups of both optimisers."""
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every gradient."""
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """Step both optimisers."""
        for o in self.optimizers:
            o.step()
