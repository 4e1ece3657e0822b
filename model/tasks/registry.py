"""The task registry: task names → classes, and settings tables (``{name: {weight, ...}}``) → typed configs.

The settings shape is the same in TOML (``[model] options.tasks``) and in Python (``SSMTLModel(tasks=...)``)::

    tasks = {retrieval = {}, cca_ssg = {weight = 0.1, edge_drop = 0.3}}

Each task's keys are ``weight`` (its fixed-balancing loss weight, default the task's ``default_weight``) and the
fields of its ``Config``; anything else is a one-line ``ValueError`` naming the key, with a hint.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ebrflow.model.tasks.base import Task
from ebrflow.model.tasks.cca_ssg import CCASSGTask
from ebrflow.model.tasks.graphmae import GraphMAETask
from ebrflow.model.tasks.infonce import InfoNCETask
from ebrflow.model.tasks.retrieval import RetrievalTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (RetrievalTask, CCASSGTask, GraphMAETask, InfoNCETask)}


@dataclass(frozen=True)
class TaskSpec:
    """One configured task: its class, typed settings and loss weight."""

    cls: type[Task]
    config: Any
    weight: float

    def build(self, dim: int) -> Task:
        """The task for an encoder of ``dim`` dimensions."""
        return self.cls.build(self.config, dim)


def _hint(key: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(key, accepted, n=1)
    return f"did you mean {close[0]!r}?" if close else f"accepted: {', '.join(accepted)}"


def _check_type(where: str, value: Any, default: Any) -> None:
    """``value`` must have the type of the field's ``default`` (an int is accepted for a float)."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if not ok:
        raise ValueError(f"{where}: expected {kind}")


def parse_tasks(settings: Mapping[str, Any]) -> list[TaskSpec]:
    """Task settings ``{name: {"weight": w, <config field>: value, ...}}`` → one ``TaskSpec`` each, in order.

    >>> [(s.cls.name, s.config, s.weight) for s in parse_tasks({"infonce": {"eps": 0.2}})]
    [('infonce', InfoNCEConfig(fraction=0.25, eps=0.2, temperature=0.2), 0.1)]
    >>> parse_tasks({"cca": {}})
    Traceback (most recent call last):
    ...
    ValueError: tasks.cca: unknown task (did you mean 'cca_ssg'?)
    """
    if not isinstance(settings, Mapping) or not settings:
        raise ValueError("tasks: expected a table of task name → settings, e.g. {retrieval = {}}")
    specs = []
    for name, values in settings.items():
        if name not in TASKS:
            raise ValueError(f"tasks.{name}: unknown task ({_hint(name, sorted(TASKS))})")
        if not isinstance(values, Mapping):
            raise ValueError(f"tasks.{name}: expected a table of settings, e.g. {{weight = 0.1}}")
        cls = TASKS[name]
        defaults = {f.name: f.default for f in dataclasses.fields(cls.Config)}
        for key, value in values.items():
            if key != "weight" and key not in defaults:
                raise ValueError(f"tasks.{name}.{key}: not a setting of {name} ({_hint(key, ['weight', *defaults])})")
            _check_type(f"tasks.{name}.{key}", value, defaults.get(key, 1.0))
        weight = values.get("weight", cls.default_weight)
        if weight < 0:
            raise ValueError(f"tasks.{name}.weight: must be >= 0")
        config = cls.Config(**{k: v for k, v in values.items() if k != "weight"})
        specs.append(TaskSpec(cls, config, float(weight)))
    return specs
