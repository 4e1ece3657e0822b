"""Bootstrap a model offline: several epochs over a replayable source of batches, with a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ebrflow.model.base import Batch, RetrievalModel


@dataclass
class BackfillSummary:
    """What a backfill did: epochs started, batches and steps trained, mean loss per epoch, wall seconds, the
    spectral refits and the served blend chosen on the held-out slice."""

    epochs: int = 0
    batches: int = 0
    steps: int = 0
    skipped_steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False
    spectral_refits: int = 0
    spectral_seconds: float = 0.0
    held_out: int = 0
    blend: dict[str, Any] = field(default_factory=dict)


def backfill(
    model: RetrievalModel,
    batches: Callable[[], Iterable[Batch]],
    epochs: int,
    progress: bool = True,
    max_seconds: float | None = None,
    total_batches: int | None = None,
    spectral_refits: Literal["epoch", "stream"] = "epoch",
    held_out: list[Batch] | None = None,
) -> BackfillSummary:
    """Train ``model`` for ``epochs`` passes, calling the factory ``batches()`` once per epoch.

    ``max_seconds`` stops after the batch that crosses the time budget; ``total_batches`` (per epoch) only sizes
    the progress bar. For SSMTL (its ``spectral`` block and blend ``selector``):
    - ``spectral_refits="epoch"`` refits only while the graph doubles in the first epoch (not at all without
      gradient steps) and once at each epoch's end if the graph changed; the streaming schedule (every few % of
      growth) would cost hundreds of refits in a first pass over a large file and more in every later pass
      although the graph no longer changes. ``"stream"`` replays every epoch exactly as a stream (schedule and all).
    - later epochs only take gradient steps (``train_on``): the first one built the graph, the spectral block and
      the popularity counts, and replaying the file must not churn them;
    - blends are scored on each batch before it is ingested in the first epoch only (later epochs have seen the
      events); ``held_out`` batches (a slice of the file, e.g. its latest events) are scored after the last epoch
      with fresh evidence, which picks the served blend, and then trained on like any stream batch.
    """
    summary, start = BackfillSummary(), time.perf_counter()
    spectral = getattr(model, "spectral", None)
    scheduled = spectral if spectral_refits == "epoch" and spectral is not None else None
    if spectral is not None:
        refit = spectral.refit

        def counted() -> None:
            t0 = time.perf_counter()
            try:
                refit()
            finally:
                summary.spectral_refits += 1
                summary.spectral_seconds += time.perf_counter() - t0

        spectral.refit = counted
    saved = scheduled.schedule if scheduled is not None else None
    try:
        as_stream = spectral_refits == "stream"
        _epochs(model, batches, epochs, progress, max_seconds, total_batches, scheduled, summary, start, as_stream)
        if held_out:
            _score_held_out(model, held_out, summary)
    finally:
        if spectral is not None:
            del spectral.refit  # the instance attribute: back to the class's method
        if scheduled is not None:
            scheduled.schedule = saved
        if hasattr(model, "selecting"):
            model.selecting = True
    summary.seconds = time.perf_counter() - start
    return summary


def _score_held_out(model: RetrievalModel, held_out: list[Batch], summary: BackfillSummary) -> None:
    """Choose the blend on the held-out batches with fresh evidence, then train on them as a stream would."""
    selector = getattr(model, "selector", None)
    if selector is not None:
        selector.reset()
        for batch in held_out:
            model.select(batch)  # type: ignore[attr-defined]
        summary.blend = selector.report()
    for batch in held_out:
        report = model.fit_batch(batch)
        summary.batches += 1
        summary.steps += report.steps
        summary.skipped_steps += report.skipped_steps
        summary.held_out += len(batch)


def _epochs(
    model: RetrievalModel,
    batches: Callable[[], Iterable[Batch]],
    epochs: int,
    progress: bool,
    max_seconds: float | None,
    total_batches: int | None,
    spectral: Any,
    summary: BackfillSummary,
    start: float,
    as_stream: bool,
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
            if hasattr(model, "selecting"):
                model.selecting = epoch == 0
            if spectral is not None:  # no gradient steps: nothing uses a fit before the epoch's end
                trains = getattr(model, "steps_per_batch", 1) > 0
                spectral.schedule = "double" if epoch == 0 and trains else "off"
            bar.reset(task, total=total_batches, epoch=epoch + 1)
            losses = []
            # later epochs replay what the graph holds: only the gradient steps (``SSMTLModel.train_on``)
            learn = getattr(model, "train_on", model.fit_batch) if epoch and not as_stream else model.fit_batch
            for batch in batches():
                report = learn(batch)
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
