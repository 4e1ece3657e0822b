"""Bootstrap a model offline: several epochs over a replayable source of batches, with a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ebrflow.model.base import Batch, RetrievalModel


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
    spectral_refits: int = 0
    spectral_seconds: float = 0.0


def _spectral_model(model: object) -> object | None:
    """The model (or the one a wrapper such as ``PopularityPrior`` holds) whose spectral refits can be scheduled."""
    for m in (model, getattr(model, "model", None)):
        if m is not None and getattr(m, "spectral", False) and hasattr(m, "refit_schedule"):
            return m
    return None


def backfill(
    model: RetrievalModel,
    batches: Callable[[], Iterable[Batch]],
    epochs: int,
    progress: bool = True,
    max_seconds: float | None = None,
    total_batches: int | None = None,
    spectral_refits: Literal["epoch", "stream"] = "epoch",
) -> BackfillSummary:
    """Train ``model`` for ``epochs`` passes, calling the factory ``batches()`` once per epoch.

    ``max_seconds`` stops after the batch that crosses the time budget; ``total_batches`` (per epoch)
    only sizes the progress bar. A model with a spectral layer (SSMTL) refits it, with ``spectral_refits="epoch"``,
    only when the graph doubled during the first epoch (not at all without gradient steps) and once at each epoch's
    end (or at the stop) if the graph changed: the streaming
    schedule (every 1% of growth) costs hundreds of refits in the first pass over a large file, and one every 1%
    of its events in every later pass although the graph no longer changes (on Gowalla, 810k edges, ~13 s each).
    ``"stream"`` keeps the streaming schedule. The model's own schedule is restored afterwards.
    """
    summary, start = BackfillSummary(), time.perf_counter()
    spectral = _spectral_model(model) if spectral_refits == "epoch" else None
    timed = _spectral_model(model)
    if timed is not None:
        refit = timed.refit_spectral

        def counted() -> None:
            t0 = time.perf_counter()
            try:
                refit()
            finally:
                summary.spectral_refits += 1
                summary.spectral_seconds += time.perf_counter() - t0

        timed.refit_spectral = counted  # type: ignore[method-assign]
    saved = spectral.refit_schedule if spectral is not None else None
    try:
        _epochs(model, batches, epochs, progress, max_seconds, total_batches, spectral, summary, start)
    finally:
        if timed is not None:
            del timed.refit_spectral  # the instance attribute: back to the class's method
        if spectral is not None:
            spectral.refit_schedule = saved
    summary.seconds = time.perf_counter() - start
    return summary


def _epochs(
    model: RetrievalModel,
    batches: Callable[[], Iterable[Batch]],
    epochs: int,
    progress: bool,
    max_seconds: float | None,
    total_batches: int | None,
    spectral: object | None,
    summary: BackfillSummary,
    start: float,
) -> None:
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
            if spectral is not None:  # no gradient steps: nothing uses a fit before the epoch's end
                trains = getattr(spectral, "steps_per_batch", 1) > 0
                spectral.refit_schedule = "double" if epoch == 0 and trains else "off"
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
            if spectral is not None:
                spectral.refit_if_changed()  # the epoch's (or, stopped early, the partial) graph is complete
            if summary.stopped_early:
                break
