"""Recall guard: stop serving a model whose prequential recall fell well below its recent baseline.

A continually trained model can get worse while it runs (a poisoned or shifted stretch of the stream, a bad
learning rate, a bug). The guard watches Recall@K measured test-then-train on every batch: when the rolling
recall of the last ``window`` batches stays below ``(1 - margin)`` × the baseline (recall over the last
``baseline`` healthy batches) for ``patience`` batches in a row, it either **holds** (keep training, stop writing
to Milvus: clients keep the last good embeddings) or asks for a **rollback** (restore the last healthy snapshot
of the model and re-publish it). A hold ends once the rolling recall is back above ``(1 - margin / 2)`` × the
baseline for ``patience`` batches (the baseline is frozen meanwhile). A training loss that is not finite or above
``loss_factor`` × the median loss of the healthy batches counts as bad too (the previous batch's loss, known when
the next batch arrives).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from collections import deque
from typing import TYPE_CHECKING, Literal

from ebrflow.stream.policy import Policy, Step

if TYPE_CHECKING:
    from ebrflow.stream.pipeline import Pipeline

log = logging.getLogger(__name__)
Action = Literal["hold", "rollback", "resume"]


class RecallGuard:
    """The guard's state machine, fed one batch's (hits, evaluated) at a time.

    >>> g = RecallGuard(margin=0.5, window=2, baseline=10, patience=2, min_events=10)
    >>> [g.observe(3, 10) for _ in range(6)]  # arms after 2 windows of healthy batches
    [None, None, None, None, None, None]
    >>> [g.observe(0, 10) for _ in range(3)], g.holding  # bad once the window is all bad, twice in a row
    ([None, None, 'hold'], True)
    >>> [g.observe(3, 10) for _ in range(3)], g.holding
    ([None, None, 'resume'], False)
    >>> for _ in range(5):
    ...     _ = g.observe(3, 10, loss=1.0)
    >>> [g.observe(3, 10, loss=float("nan")) for _ in range(2)]  # a diverging loss counts as bad as well
    [None, 'hold']
    """

    def __init__(
        self,
        mode: Literal["hold", "rollback"] = "hold",
        margin: float = 0.5,
        window: int = 10,
        baseline: int = 100,
        patience: int = 3,
        min_events: int = 50,
        loss_factor: float = 10.0,
    ) -> None:
        if not 0 < margin < 1:
            raise ValueError("margin must be in (0, 1)")
        self.mode = mode
        self.margin = margin
        self.patience = patience
        self.min_events = min_events
        self.loss_factor = loss_factor
        self._losses: deque[float] = deque(maxlen=baseline)
        self.holding = False
        self._recent: deque[tuple[int, int]] = deque(maxlen=window)
        self._baseline: deque[tuple[int, int]] = deque(maxlen=baseline)
        self._streak = 0

    @staticmethod
    def _rate(scores: deque[tuple[int, int]]) -> float | None:
        n = sum(s[1] for s in scores)
        return sum(s[0] for s in scores) / n if n else None

    def baseline(self) -> float | None:
        """Recall over the recent healthy batches (None until armed)."""
        armed = len(self._baseline) >= 2 * (self._recent.maxlen or 1)
        return self._rate(self._baseline) if armed else None

    def rolling(self) -> float | None:
        """Recall over the last ``window`` batches (None with too few evaluated events)."""
        if sum(s[1] for s in self._recent) < self.min_events:
            return None
        return self._rate(self._recent)

    def diverged(self, loss: float | None) -> bool:
        """Whether ``loss`` is non-finite or far above the healthy batches' median loss."""
        if loss is None:
            return False
        if not math.isfinite(loss):
            return True
        return len(self._losses) >= 5 and loss > self.loss_factor * max(statistics.median(self._losses), 1e-12)

    def observe(self, hits: int, evaluated: int, loss: float | None = None) -> Action | None:
        """Account one batch's prequential score (and the previous batch's training loss); returns what the
        trainer must do now, if anything."""
        self._recent.append((hits, evaluated))
        rolling, base = self.rolling(), self.baseline()
        diverged = self.diverged(loss)
        if self.holding:
            recovered = (
                not diverged and rolling is not None and base is not None and rolling >= (1 - self.margin / 2) * base
            )
            self._streak = self._streak + 1 if recovered else 0
            if self._streak >= self.patience:
                self.holding, self._streak = False, 0
                return "resume"
            return None
        bad = diverged or (rolling is not None and base is not None and rolling < (1 - self.margin) * base)
        if not bad:
            self._streak = 0
            self._baseline.append((hits, evaluated))
            if loss is not None:
                self._losses.append(loss)
            return None
        self._streak += 1
        if self._streak < self.patience:
            return None
        self._streak = 0
        if self.mode == "hold":
            self.holding = True
            return "hold"
        self._recent.clear()  # the restored model is judged afresh
        return "rollback"


class GuardPolicy(Policy):
    """The loop's recall guard: feeds it each batch's prequential score (and the previous batch's loss), holds
    Milvus writes while it says so, and in rollback mode keeps a snapshot of the model every ``snapshot_every``
    healthy batches to restore. After a resume or a rollback every known id is re-published.

    Ranks run it in lockstep: every rank scores the same all-gathered batch against the same mirrors, so every
    rank takes the same action at the same batch (their replicas stay identical through a rollback).
    """

    def __init__(self, guard: RecallGuard, snapshot_every: int = 20) -> None:
        self.guard = guard
        self.snapshot_every = snapshot_every
        self._snapshot: dict | None = None  # the model before a batch it scored healthily on
        self._since_snapshot = 0
        self._last_loss: float | None = None  # the previous batch's training loss (the divergence signal)

    def before_train(self, loop: Pipeline, step: Step) -> None:
        """Act on the guard's verdict of this batch's score: snapshot, roll back, hold or resume."""
        if step.score is None:
            return
        guard = self.guard
        action = guard.observe(*step.score, loss=self._last_loss)
        if action is None and guard.mode == "rollback" and not guard.holding:
            self._since_snapshot += 1
            if self._snapshot is None or self._since_snapshot >= self.snapshot_every:
                self._snapshot = copy.deepcopy(loop.model.state_dict())  # it just scored healthily: a good state
                self._since_snapshot = 0
        if action == "rollback" and self._snapshot is not None:
            loop.model.load_state_dict(copy.deepcopy(self._snapshot))
            log.warning("recall guard: rolled the model back to its last healthy snapshot (v%d)", loop.model.version)
        elif action is not None:
            log.warning("recall guard: %s", "holding Milvus writes" if action == "hold" else "publishing again")
        loop.publishing.held = guard.holding
        if action is not None:
            loop.observer.on_guard(action, guard.holding)
        step.republish = step.republish or action in ("resume", "rollback")

    def before_publish(self, loop: Pipeline, step: Step) -> None:
        """Remember the batch's loss for the next verdict."""
        self._last_loss = step.report.loss
