"""Bootstrap a model offline: several epochs over a replayable source of batches, with a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from ebrflow.model.base import Batch, RetrievalModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@dataclass
class BackfillSummary:
    """What a backfill did: epochs started, batches and steps trained, mean loss per epoch, wall seconds."""

    epochs: int = 0
    batches: int = 0
    steps: int = 0
    skipped_steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def backfill(
    model: RetrievalModel,
    batches: Callable[[], Iterable[Batch]],
    epochs: int,
    progress: bool = True,
    max_seconds: float | None = None,
    total_batches: int | None = None,
) -> BackfillSummary:
    """Train ``model`` for ``epochs`` passes, calling the factory ``batches()`` once per epoch.

    ``max_seconds`` stops after the batch that crosses the time budget; ``total_batches`` (per epoch)
    only sizes the progress bar.
    """
    summary, start = BackfillSummary(), time.perf_counter()
    with Progress(
        TextColumn("[bold]backfill[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task("backfill", total=total_batches, epoch=0, loss=float("nan"))
        for epoch in range(epochs):
            summary.epochs = epoch + 1
            bar.reset(task, total=total_batches, epoch=epoch + 1)
            losses = []
            for batch in batches():
                report = model.fit_batch(batch)
                summary.batches += 1
                summary.steps += report.steps
                summary.skipped_steps += report.skipped_steps
                if report.steps:
                    losses.append(report.loss)
                bar.update(task, advance=1, loss=report.loss)
                if max_seconds is not None and time.perf_counter() - start > max_seconds:
                    summary.stopped_early = True
                    break
            summary.epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
            if summary.stopped_early:
                break
    summary.seconds = time.perf_counter() - start
    return summary
