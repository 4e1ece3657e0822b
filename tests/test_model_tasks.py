"""Generic checks run for every registered task, plus GraphMAE's masking contract."""

import numpy as np
import pytest
import torch

from ebrflow.model.base import Batch
from ebrflow.model.ssmtl import SSMTLModel
from ebrflow.model.tasks import TASKS, GraphMAETask


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    m = SSMTLModel(
        dim=16,
        fanouts=(4, 3),
        tasks={name: {"n_negatives": 8} if name == "retrieval" else {} for name in TASKS},
        device="cpu",
        seed=0,
    )
    users, items = rng.integers(0, 60, 600), rng.integers(0, 40, 600)
    m.fit_batch(Batch.of(users, items))
    return m


def rows_of(m, n=64):
    rng = np.random.default_rng(1)
    users = rng.integers(0, len(m.graph.users), n)
    items = rng.integers(0, len(m.graph.items), n)
    return users, items, np.ones(n, np.float32)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_loss_is_finite_scalar_with_gradients(model, name):
    task = model.tasks[name]
    sub = model.subgraph(*rows_of(model), seed=3)
    model.encoder.zero_grad(set_to_none=True)
    task.zero_grad(set_to_none=True)
    loss = task.loss(sub, model.encoder)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    table_grads = [t.weight.grad for t in model.encoder.tables if t.weight.grad is not None]
    assert table_grads and any(g.coalesce().values().abs().sum() > 0 for g in table_grads)
    dense = [p.grad for p in model.encoder.shared_parameters() if p.grad is not None]
    assert dense and any(g.abs().sum() > 0 for g in dense)
    model.encoder.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_loss_is_repeatable_under_a_seed(model, name):
    task = model.tasks[name]
    a = task.loss(model.subgraph(*rows_of(model), seed=7), model.encoder).item()
    b = task.loss(model.subgraph(*rows_of(model), seed=7), model.encoder).item()
    c = task.loss(model.subgraph(*rows_of(model), seed=8), model.encoder).item()
    assert a == b
    if name != "retrieval":  # retrieval samples neighbours only; the self-supervised tasks also sample views
        assert a != c


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_state_round_trip(model, name, tmp_path):
    task = model.tasks[name]
    path = tmp_path / "task.pt"
    torch.save(task.state_dict(), path)
    clone = type(task).build(task.config, model.learned_dim)
    clone.load_state_dict(torch.load(path, weights_only=True))
    for k, v in task.state_dict().items():
        assert torch.equal(v, clone.state_dict()[k])


def test_graphmae_only_masked_roots_drive_the_loss(model):
    task: GraphMAETask = model.tasks["graphmae"]
    sub = model.subgraph(*rows_of(model), seed=5)
    tree = sub.views[0] if sub.views else sub.users  # the sampled tree the self-supervised tasks see
    xs = model.encoder.inputs(tree)
    masked = torch.zeros(len(tree), dtype=torch.bool)
    masked[::3] = True
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["out"] = output

    handle = task.decoder.register_forward_hook(keep)
    try:
        task.side_loss(tree, xs, model.encoder, masked).backward()
    finally:
        handle.remove()
    grad = captured["out"].grad
    assert (grad[~masked] == 0).all()
    assert (grad[masked].abs().sum(dim=1) > 0).all()
    model.encoder.zero_grad(set_to_none=True)
    task.zero_grad(set_to_none=True)


def test_graphmae_masks_every_occurrence_of_a_masked_root(model):
    from ebrflow.model.views import mask_rows

    sub = model.subgraph(*rows_of(model), seed=5)
    tree = sub.views[0] if sub.views else sub.users  # the sampled tree the self-supervised tasks see
    xs = model.encoder.inputs(tree)
    token = torch.full((model.learned_dim,), 7.0)
    target = tree.rows[0][:1]
    out = mask_rows(xs, tree.rows, tree.types, target, tree.types[0], token)
    for x, r, t in zip(out, tree.rows, tree.types):
        if t == tree.types[0]:
            assert (x[r == target[0]] == 7.0).all()
