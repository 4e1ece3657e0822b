"""The task registry (names ↔ classes, typed configs, one-line setting errors) and tasks injected with add_task."""

import dataclasses

import numpy as np
import pytest
import torch

from ebrflow.model.base import Batch
from ebrflow.model.ssmtl import SSMTLModel
from ebrflow.model.tasks import (
    TASKS,
    CCASSGConfig,
    GraphMAEConfig,
    InfoNCEConfig,
    InfoNCETask,
    RetrievalConfig,
    Subgraph,
    Task,
    parse_tasks,
)


def test_names_map_to_their_classes_with_frozen_configs():
    assert list(TASKS) == ["retrieval", "cca_ssg", "graphmae", "infonce"]
    for name, cls in TASKS.items():
        task = cls.build(cls.Config(), 8)
        assert task.name == name and isinstance(task, cls) and task.config == cls.Config()
        with pytest.raises(dataclasses.FrozenInstanceError):
            task.config.fraction = 0.5  # type: ignore[misc]
    assert {n: c.default_weight for n, c in TASKS.items()} == {
        "retrieval": 1.0,
        "cca_ssg": 0.05,
        "graphmae": 0.1,
        "infonce": 0.1,
    }


def test_config_defaults_are_the_documented_defaults():
    assert RetrievalConfig() == RetrievalConfig(temperature=0.12, logq=False, n_negatives=0)
    assert CCASSGConfig() == CCASSGConfig(fraction=0.25, lam=1e-3, edge_drop=0.2, feature_drop=0.2)
    assert GraphMAEConfig() == GraphMAEConfig(fraction=0.25, mask_rate=0.5, alpha=2.0)
    assert InfoNCEConfig() == InfoNCEConfig(fraction=0.25, eps=0.1, temperature=0.2)


def test_settings_parse_in_order_with_weights_and_typed_configs():
    specs = parse_tasks({"cca_ssg": {"weight": 0.3, "lam": 0.01}, "retrieval": {"n_negatives": 4}})
    assert [(s.cls.name, s.weight) for s in specs] == [("cca_ssg", 0.3), ("retrieval", 1.0)]
    assert specs[0].config == CCASSGConfig(lam=0.01) and specs[1].config == RetrievalConfig(n_negatives=4)
    assert parse_tasks({"graphmae": {"weight": 1}})[0].weight == 1.0  # an integer is a number


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cca": {}}, "tasks.cca: unknown task (did you mean 'cca_ssg'?)"),
        ({"zzz": {}}, "tasks.zzz: unknown task (accepted: cca_ssg, graphmae, infonce, retrieval)"),
        (
            {"graphmae": {"mask_ratio": 0.4}},
            "tasks.graphmae.mask_ratio: not a setting of graphmae (did you mean 'mask_rate'?)",
        ),
        ({"retrieval": {"logq": 1}}, "tasks.retrieval.logq: expected true or false"),
        ({"retrieval": {"n_negatives": 2.5}}, "tasks.retrieval.n_negatives: expected an integer"),
        ({"infonce": {"eps": "big"}}, "tasks.infonce.eps: expected a number"),
        ({"infonce": {"weight": -1}}, "tasks.infonce.weight: must be >= 0"),
        ({"infonce": 0.1}, "tasks.infonce: expected a table of settings"),
        ({}, "tasks: expected a table"),
        (["retrieval"], "tasks: expected a table"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(settings, message):
    with pytest.raises(ValueError) as err:
        parse_tasks(settings)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


class Spread(Task):
    """A toy task with a head of its own: pushes the batch's item encodings apart by a learnt scale."""

    name = "spread"

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def loss(self, subgraph: Subgraph, encoder) -> torch.Tensor:
        items = subgraph.items
        v = encoder.propagate(subgraph.inputs(encoder)[1], items.masks, coefs=items.coefs, served=True)[0]
        return self.scale * (v @ v.T).mean() + self.scale**2


def batch(n: int = 128, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    return Batch.of(rng.integers(0, 40, n), rng.integers(0, 30, n))


def test_added_tasks_weights_reach_the_balancer_and_the_report():
    m = SSMTLModel(dim=8, fanouts=(3, 2), device="cpu")
    m.add_task(InfoNCETask(InfoNCEConfig(eps=0.2)), 0.7)
    m.add_task(Spread())  # no weight: the task's default_weight
    assert list(m.tasks) == ["retrieval", "infonce", "spread"]
    assert m.balancer.weights == {"retrieval": 1.0, "infonce": 0.7, "spread": 1.0}
    report = m.fit_batch(batch())
    assert report.steps == 1 and report.task_weights == {"retrieval": 1.0, "infonce": 0.7, "spread": 1.0}


def test_an_added_tasks_head_is_trained_and_adding_is_closed_once_training_started():
    m = SSMTLModel(dim=8, fanouts=(3, 2), tasks={"retrieval": {}}, device="cpu")
    spread = Spread()
    m.add_task(spread, 0.5)
    with pytest.raises(ValueError, match="already added"):
        m.add_task(Spread())
    m.fit_batch(batch())
    assert spread.scale.item() != 1.0  # the rebuilt optimiser holds the injected head
    with pytest.raises(RuntimeError, match="before the first training step"):
        m.add_task(InfoNCETask())


def test_retrieval_negatives_setting_makes_the_subgraph_sample_them():
    m = SSMTLModel(dim=8, fanouts=(3, 2), tasks={"retrieval": {"n_negatives": 5}}, device="cpu")
    m.fit_batch(batch())
    users, items = np.arange(4), np.arange(4)
    sub = m.subgraph(users, items, np.ones(4, np.float32), seed=1)
    assert sub.negatives is not None and len(sub.negatives) == 5 and sub.negative_log_q.shape == (5,)
    plain = SSMTLModel(dim=8, fanouts=(3, 2), device="cpu")
    plain.fit_batch(batch())
    assert plain.subgraph(users, items, np.ones(4, np.float32), seed=1).negatives is None


def test_config_tasks_reach_the_model_with_model_temperature():
    from ebrflow.app import build_model
    from ebrflow.config import ModelConfig

    tasks = {"retrieval": {"n_negatives": 2}, "infonce": {"weight": 0.2}}
    cfg = ModelConfig(dim=8, temperature=0.3, popularity_half_life=0, device="cpu", options={"tasks": tasks})
    m = build_model(cfg)
    assert m.tasks["retrieval"].config == RetrievalConfig(temperature=0.3, n_negatives=2)
    assert m.task_weights == {"retrieval": 1.0, "infonce": 0.2}
    assert cfg.options["tasks"] == tasks  # not mutated
    assert build_model(ModelConfig(dim=8, temperature=0.3, device="cpu")).tasks["retrieval"].config == (
        RetrievalConfig(temperature=0.3)
    )
    assert build_model(ModelConfig(dim=8, device="cpu")).tasks["retrieval"].config == RetrievalConfig()


def test_a_checkpoint_restores_only_into_the_same_task_settings(tmp_path):
    from ebrflow.app import build_model, model_fingerprint
    from ebrflow.config import ModelConfig
    from ebrflow.indexer.seen import SeenItems
    from ebrflow.model.checkpoint import CheckpointStore
    from ebrflow.stream.checkpointer import Checkpointer, CheckpointMismatch

    tasks = {"retrieval": {}, "infonce": {"weight": 0.2}}
    cfg = ModelConfig(dim=8, device="cpu", options={"tasks": tasks})
    other = cfg.model_copy(update={"options": {"tasks": {**tasks, "infonce": {"weight": 0.2, "eps": 0.3}}}})
    store = CheckpointStore(tmp_path / "ckpt", keep=1)
    model = build_model(cfg)
    model.fit_batch(batch())
    Checkpointer(store, model, SeenItems(), fingerprint=model_fingerprint(cfg)).batch_done({("t", 0): 1}, force=True)
    restored = Checkpointer(store, build_model(cfg), SeenItems(), fingerprint=model_fingerprint(cfg)).restore()
    assert restored is not None and restored.version == model.version
    with pytest.raises(CheckpointMismatch, match="options"):
        Checkpointer(store, build_model(other), SeenItems(), fingerprint=model_fingerprint(other)).restore()


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ({"x": {"options": {"tasks": {"infonse": {}}}}}, "model.variants.x.options.tasks.infonse: unknown task"),
        (
            {"x": {"options": {"tasks": {"retrieval": {"temperature": 0.2}}}}},
            "model.variants.x.options.tasks.retrieval.temperature: set model.variants.x.temperature instead",
        ),
        ({"x": {"kind": "two_tower", "options": {"tasks": {}}}}, "model.variants.x.options.tasks: not a parameter"),
        ({"x": {"dimm": 3}}, "model.variants.x: dimm: unknown key (did you mean 'dim'?)"),
    ],
)
def test_preflight_checks_the_variants_task_settings_too(variants, message):
    from ebrflow.config import ConfigError, ModelConfig
    from ebrflow.preflight import check_model

    check_model(ModelConfig(variants={"ok": {"options": {"tasks": {"retrieval": {}, "cca_ssg": {"weight": 0.1}}}}}))
    with pytest.raises(ConfigError) as err:
        check_model(ModelConfig(variants=variants))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
