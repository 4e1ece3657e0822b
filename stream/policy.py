"""What the loop calls besides the model: the observer (metrics, evaluation, drift) and policies at named points.

A policy (the recall guard, generations and their switch, shadow variants, exclusivity, the rolling refresh, lag
reports, ...) is one small class overriding only the hooks it needs; ``Policy`` itself does nothing at every
hook (river's null objects): leaving a policy out of the loop's list switches it off, no flag or branch in the
loop. The loop calls, per run and per batch, in this order:

- ``on_start``: before the consumer subscribes (the checkpoint is restored);
- ``ready`` until all agree, then ``on_sync``: Milvus is made to equal the restored model (the loop re-publishes);
- per batch with events: ``before_train`` (the batch was scored), ``before_publish`` (trained), ``after_publish``
  (its rows are queued for Milvus);
- ``at_checkpoint``: before a checkpoint is written (everything trained is acknowledged);
- ``on_tick``: once per loop iteration (ranks: the same iteration on every rank);
- ``on_finish``: at the end of a run, before the final checkpoint;
- ``on_expire``: ids unseen for the expiry span are being forgotten (``stream.expiry``).

Ranks run the same hooks in lockstep; a policy that must act once per job (an alias switch) asks the
``Coordinator`` (``Solo`` for one trainer, ``stream.ranked.RankGroup`` for ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from ebrflow.indexer.publisher import Published
from ebrflow.model.base import Batch, TrainReport

if TYPE_CHECKING:
    from ebrflow.stream.pipeline import Pipeline

T = TypeVar("T")


@dataclass
class BatchResult:
    """One processed micro-batch, handed to observers after it was published and committed.

    ``own``: the events this process consumed (ranks: its share of the all-gathered ``batch``)."""

    batch: Batch
    record_ts_ms: np.ndarray
    report: TrainReport
    published: Published
    published_at: float
    stage_seconds: dict[str, float]
    invalid: int
    own: int = -1

    def __post_init__(self) -> None:
        if self.own < 0:
            self.own = len(self.batch)


class Observer(Protocol):
    """Hooks the loop calls; ``ops`` implements them (metrics, evaluation, drift, history). The consumer thread
    calls ``on_consumed``, ``on_invalid``, ``on_partitions``, ``on_lag`` and ``on_error`` for its operations."""

    def on_consumed(self, n: int) -> None:
        """``n`` records were read from Kafka."""

    def on_invalid(self, reason: str, detail: str) -> None:
        """A record was rejected and dead-lettered."""

    def before_train(self, batch: Batch) -> tuple[int, int] | None:
        """Test-then-train: called with the batch before the model sees it; returns (hits, evaluated) if scored."""

    def after_batch(self, result: BatchResult) -> None:
        """The batch is trained, published and committed."""

    def on_lag(self, lag: dict[int, int]) -> None:
        """Records behind the end per partition."""

    def on_error(self, op: str, exc: BaseException) -> None:
        """A retried failure of ``op`` (poll, commit, publish, dlq)."""

    def on_partitions(self, assigned: int, total: int, paused: bool) -> None:
        """How many of the topic's partitions this consumer holds, and whether consumption is paused."""

    def on_refused(self) -> None:
        """This trainer found another in its group and stops."""

    def on_generation(self, served: int | None, writing: int) -> None:
        """The Milvus generation clients read (None: none yet) and the one this trainer writes."""

    def on_guard(self, action: str, holding: bool) -> None:
        """The recall guard acted ("hold", "rollback", "resume"); ``holding``: Milvus writes are held."""

    def on_variant(self, name: str, hits: int, evaluated: int, seconds: dict[str, float]) -> None:
        """A shadow variant scored (hits of evaluated events), trained on and published one batch."""

    def on_tick(self, now: float) -> None:
        """The loop is alive at monotonic time ``now`` (every iteration, and while waiting out a retry)."""

    def on_expired(self, users: np.ndarray, items: np.ndarray, deleted: dict[str, int]) -> None:
        """Ids unseen for the expiry span were forgotten; ``deleted``: Milvus rows this process deleted."""


@dataclass
class Step:
    """One batch with events on its way through the loop; policies read and amend it at their hooks.

    ``items``/``users``: the ids whose vectors are published with the batch (its own; the rolling refresh adds).
    ``republish``: after this batch, re-publish every known id (the guard resumed or rolled back).
    """

    batch: Batch
    score: tuple[int, int] | None = None
    report: TrainReport = field(default_factory=lambda: TrainReport(loss=float("nan"), steps=0))
    items: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    users: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    republish: bool = False

    def __post_init__(self) -> None:
        self.items, self.users = np.unique(self.batch.item_ids), np.unique(self.batch.user_ids)


class Policy:
    """A policy the loop calls at named points (see the module doc); every hook here does nothing."""

    def on_start(self, loop: Pipeline) -> None:
        """The checkpoint is restored; the consumer has not subscribed yet."""

    def ready(self, loop: Pipeline, now: float) -> bool:
        """Whether the loop may sync Milvus and train (asked every iteration until every policy agrees)."""
        return True

    def on_sync(self, loop: Pipeline) -> None:
        """Milvus is about to be made equal to the restored model (choose collections, open variants)."""

    def before_train(self, loop: Pipeline, step: Step) -> None:
        """The batch was scored (``step.score``) and is about to be trained."""

    def before_publish(self, loop: Pipeline, step: Step) -> None:
        """The batch was trained (``step.report``); ``step.items``/``users`` are about to be embedded."""

    def after_publish(self, loop: Pipeline, step: Step) -> None:
        """The batch's rows are queued for Milvus."""

    def at_checkpoint(self, loop: Pipeline) -> None:
        """A checkpoint is about to be written; every trained batch is acknowledged."""

    def on_tick(self, loop: Pipeline, now: float) -> None:
        """Once per loop iteration."""

    def on_finish(self, loop: Pipeline) -> None:
        """The run ends; the final checkpoint follows."""

    def on_expire(self, loop: Pipeline, users: np.ndarray, items: np.ndarray) -> None:
        """Ids unseen for the expiry span are being forgotten (``stream.expiry``): forget them too."""


class Coordinator(Protocol):
    """What policies that act once per job need from the ranks: who acts, what it decided, a rendezvous."""

    leader: bool

    def share(self, value: T) -> T:
        """The leader's ``value`` on every rank."""

    def barrier(self) -> None:
        """Wait until every rank arrived here."""


class Solo:
    """The coordinator of a single trainer: it leads, its decisions are everyone's, nobody to wait for.

    >>> Solo().share(3), Solo().leader
    (3, True)
    """

    leader = True

    def share(self, value: T) -> T:
        """``value`` itself."""
        return value

    def barrier(self) -> None:
        """Nothing to wait for."""
