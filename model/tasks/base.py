"""What a training task sees (the sampled batch subgraph) and the tiny base every task implements."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ebrflow.model.encoder import GraphEncoder, Tree


@dataclass
class Subgraph:
    """One training step's sampled subgraph: a tree per event's user and item, plus what the losses need.

    ``gen`` (CPU torch generator) and ``rng`` drive every random choice of the tasks, so a seeded
    subgraph gives a repeatable loss.
    """

    users: Tree
    items: Tree
    item_rows: torch.Tensor  # positive item rows, for accidental-hit masking
    log_q: torch.Tensor  # log sampling share of each positive item (logQ correction)
    weights: torch.Tensor  # per-event weight
    gen: torch.Generator
    rng: np.random.Generator
    negatives: Tree | None = None  # extra random negative items
    negative_log_q: torch.Tensor | None = None
    views: tuple[Tree, Tree] | None = None  # sampled (user, item) trees for SSL tasks (None: users, items)
    _inputs: list[list[torch.Tensor]] | None = field(default=None, repr=False)
    _subsets: dict[float, list[tuple[Tree, list[torch.Tensor]]]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.users)

    def root_sample(self, fraction: float) -> torch.Tensor:
        """Positions of a random ``fraction`` of the roots (at least two), for the self-supervised tasks."""
        n = len(self)
        k = min(n, max(2, int(round(fraction * n))))
        return torch.from_numpy(self.rng.choice(n, size=k, replace=False)).to(self.item_rows.device)

    def trees(self) -> list[Tree]:
        """Users, items and (if any) negatives trees."""
        return [self.users, self.items] + ([self.negatives] if self.negatives is not None else [])

    def prepare(self, encoder: GraphEncoder, fractions: Iterable[float] = ()) -> None:
        """Draw the root subsets for each ``fraction`` and look up all inputs in one batched call.

        One lookup per step means one sparse gradient per table, whatever the number of tasks.
        """
        fractions = sorted({f for f in fractions if f not in self._subsets})
        sides = self.views or (self.users, self.items)
        subsets = {f: [tree.select(self.root_sample(f)) for tree in sides] for f in fractions}
        main = [] if self._inputs is not None else self.trees()
        extra = [tree for f in fractions for tree in subsets[f]]
        xs = encoder.batched_inputs(main + extra)
        if main:
            self._inputs = xs[: len(main)]
        sub_xs = iter(xs[len(main) :])
        for f in fractions:
            self._subsets[f] = [(tree, next(sub_xs)) for tree in subsets[f]]

    def inputs(self, encoder: GraphEncoder) -> list[list[torch.Tensor]]:
        """Layer-0 inputs of every tree (``trees()`` order), shared by all tasks of the step."""
        if self._inputs is None:
            self.prepare(encoder)
        return self._inputs  # type: ignore[return-value]

    def sides(self, encoder: GraphEncoder, fraction: float) -> list[tuple[Tree, list[torch.Tensor]]]:
        """For users and items each: a random ``fraction`` of the roots as a sub-tree (of ``views`` when set), with
        its inputs."""
        if fraction not in self._subsets:
            self.prepare(encoder, [fraction])
        return self._subsets[fraction]

    def reset(self) -> None:
        """Drop the looked-up inputs and subsets, e.g. before a second backward over the same subgraph."""
        self._inputs = None
        self._subsets = {}


class Task(torch.nn.Module):
    """A training objective: ``loss(subgraph, encoder)`` → scalar tensor. Task-specific heads live on the task.

    ``Config`` is the frozen dataclass of the task's settings (``self.config``); ``fraction`` and ``negatives``
    say what the step's subgraph must hold for it.
    """

    name: ClassVar[str] = "task"
    Config: ClassVar[type] = object
    default_weight: ClassVar[float] = 1.0  # loss weight under fixed balancing when none is given
    fraction: float | None = None  # share of roots a self-supervised task looks at (None: the whole batch)
    negatives: int = 0  # extra random negative items the subgraph must sample

    @classmethod
    def build(cls, config: Any, dim: int) -> Task:
        """The task with settings ``config`` for an encoder of ``dim`` dimensions (only heads need ``dim``)."""
        return cls(config)

    def loss(self, subgraph: Subgraph, encoder: GraphEncoder) -> torch.Tensor:
        """The task's scalar loss on one step's subgraph."""
        raise NotImplementedError
