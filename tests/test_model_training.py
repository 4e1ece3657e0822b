"""The shared guarded, chunked training loop on constructed steps: chunking, passes, skipped steps, averages."""

import math

import numpy as np
import torch

from ebrflow.model.training import StepResult, finite_step, train_chunks


def test_chunks_cover_every_event_once_per_pass():
    seen: list[np.ndarray] = []

    def step(idx):
        seen.append(idx.copy())
        return StepResult(1.0, {}, {})

    rep = train_chunks(step, 10, np.random.default_rng(0), steps_per_batch=2, max_step_size=4)
    assert [len(s) for s in seen] == [4, 4, 2, 4, 4, 2]
    for first in (0, 3):
        assert sorted(np.concatenate(seen[first : first + 3])) == list(range(10))
    assert (rep.steps, rep.skipped_steps, rep.loss) == (6, 0, 1.0)


def test_short_tail_chunk_is_left_out_uncounted():
    sizes = []
    rep = train_chunks(
        lambda idx: sizes.append(len(idx)) or StepResult(0.0, {}, {}), 9, np.random.default_rng(0), 1, 4, 2
    )
    assert sizes == [4, 4] and rep.steps == 2 and rep.skipped_steps == 0


def test_skipped_steps_are_counted_and_left_out_of_the_averages():
    calls = iter(range(100))

    def step(idx):
        k = next(calls)
        if k % 2:
            return None  # what a guarded step returns for a non-finite loss or gradient
        return StepResult(float(k), {"a": float(k), "b": 1.0}, {"a": 0.5, "b": float(k)})

    rep = train_chunks(step, 8, np.random.default_rng(0), steps_per_batch=1, max_step_size=2)
    assert (rep.steps, rep.skipped_steps) == (2, 2)  # calls 0 and 2 applied, 1 and 3 skipped
    assert rep.loss == 1.0
    assert rep.task_losses == {"a": 1.0, "b": 1.0} and rep.task_weights == {"a": 0.5, "b": 1.0}


def test_no_applied_step_reports_nan_and_no_task_figures():
    rep = train_chunks(lambda idx: None, 5, np.random.default_rng(0), 1, 2)
    assert rep.steps == 0 and rep.skipped_steps == 3 and math.isnan(rep.loss)
    assert rep.task_losses == {} and rep.task_weights == {}
    assert train_chunks(lambda idx: None, 5, np.random.default_rng(0), 0, 2).skipped_steps == 0


def test_finite_step_skips_a_nan_gradient_and_leaves_weights_alone():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    assert not finite_step(opt, (w * torch.tensor([float("nan"), 1.0])).sum())
    assert w.grad is None and w.tolist() == [1.0, 2.0]
    assert not finite_step(opt, torch.tensor(float("inf")))
    assert finite_step(opt, (w * w).sum())
    assert torch.allclose(w.detach(), torch.tensor([0.8, 1.6]))
