"""The run report: PNG plots and a short ``summary.md`` drawn from a run's ``history.jsonl``.

Every plot's x axis is stream time: the running maximum of each batch's latest event time (a watermark),
so batches consumed out of event-time order across partitions do not zig-zag the lines. Per-batch figures
are drawn faintly, a trailing rolling mean over ``window`` batches boldly; batches where a drift detector
fired are marked with vertical lines.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402 - the backend must be chosen first
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ebrflow.ops.history import BatchRecord, read_history  # noqa: E402

SIGNAL_COLOURS = {
    "recall": "tab:red",
    "item_shift": "tab:purple",
    "neighbour_churn": "tab:brown",
    "centroid": "tab:olive",
}
SEGMENT_COLOURS = {"all": "tab:blue", "cold": "tab:orange", "warm": "tab:green"}


def make_report(history_path: Path | str, out_dir: Path | str, window: int = 10) -> list[Path]:
    """Write ``recall.png``, ``drift.png``, ``throughput.png``, ``loss.png`` and ``summary.md`` to ``out_dir``.

    ``window`` is the rolling-mean width in batches. Returns the written paths (plots first). Figures that
    are None in every record are drawn as an empty panel saying so; a history without records raises
    ``ValueError``.
    """
    records = read_history(history_path)
    if not records:
        raise ValueError(f"no batch records in {history_path}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    when = stream_clock(records)
    paths = []
    for name, draw in (
        ("recall.png", _recall_figure),
        ("drift.png", _drift_figure),
        ("throughput.png", _throughput_figure),
        ("loss.png", _loss_figure),
    ):
        fig = draw(records, when, window)
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / name)
    summary = out / "summary.md"
    summary.write_text(summary_markdown(records, Path(history_path), [p.name for p in paths], window))
    return [*paths, summary]


def stream_clock(records: Sequence[BatchRecord]) -> np.ndarray:
    """Per-batch stream time as UTC datetimes: the running max of ``stream_time_ms`` (a watermark)."""
    ms = np.maximum.accumulate(np.array([r.stream_time_ms for r in records], dtype=np.int64))
    return np.array([datetime.fromtimestamp(t / 1000.0, tz=timezone.utc) for t in ms.tolist()])


def column(records: Sequence[BatchRecord], get: Callable[[BatchRecord], float | None]) -> np.ndarray:
    """One figure per record as floats, None → NaN."""
    return np.array([np.nan if (v := get(r)) is None else float(v) for r in records], dtype=np.float64)


def rolling_mean(values: np.ndarray, window: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Trailing (weighted) mean over ``window`` entries, ignoring NaN; NaN where nothing counts.

    >>> rolling_mean(np.array([1.0, np.nan, 3.0, 5.0]), 2).tolist()
    [1.0, 1.0, 3.0, 4.0]
    >>> rolling_mean(np.array([0.0, 1.0]), 2, weights=np.array([3.0, 1.0])).tolist()
    [0.0, 0.25]
    """
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    w = np.where(np.isnan(values), 0.0, w)
    sums = np.cumsum(np.where(w > 0, values * w, 0.0))
    counts = np.cumsum(w)
    total, weight = sums - _shifted(sums, window), counts - _shifted(counts, window)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), np.nan)


def _shifted(a: np.ndarray, by: int) -> np.ndarray:
    """``a`` delayed by ``by`` entries, zeros in front (cumulative sums minus this = trailing window sums)."""
    return np.concatenate([np.zeros(by), a[:-by]]) if len(a) > by else np.zeros_like(a)


def _style(ax: Axes, title: str, ylabel: str, when: np.ndarray) -> None:
    if when[0] < when[-1]:
        ax.set_xlim(when[0], when[-1])
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def _series(
    ax: Axes,
    when: np.ndarray,
    values: np.ndarray,
    window: int,
    label: str,
    colour: str | tuple[float, ...],
    weights: np.ndarray | None = None,
) -> float:
    """Faint per-batch line plus a bold (weighted) rolling mean; returns the mean's peak (nan if not recorded).

    An all-missing series leaves a note instead.
    """
    if np.isnan(values).all():
        ax.text(0.5, 0.5, "not recorded in this history", transform=ax.transAxes, ha="center", color="grey")
        return float("nan")
    smooth = rolling_mean(values, window, weights)
    ax.plot(when, values, color=colour, alpha=0.25, linewidth=0.8)
    ax.plot(when, smooth, color=colour, linewidth=2.0, label=label)
    return float(np.nanmax(smooth)) if not np.isnan(smooth).all() else float("nan")


def _mark_drift(ax: Axes, records: Sequence[BatchRecord], when: np.ndarray, legend: bool = True) -> None:
    """A dashed vertical line per batch where a detector fired, coloured by signal."""
    shown: set[str] = set()
    for rec, t in zip(records, when):
        for signal in rec.drift_signals:
            label = f"drift: {signal}" if legend and signal not in shown else None
            ax.axvline(t, color=SIGNAL_COLOURS.get(signal, "black"), linestyle="--", linewidth=1.0, label=label)
            shown.add(signal)


def _finish(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=9, loc="best")


def _recall_figure(records: Sequence[BatchRecord], when: np.ndarray, window: int) -> Figure:
    fig, ax = plt.subplots(figsize=(11, 4.5))
    evaluated = column(records, lambda r: r.evaluated)
    cold = column(records, lambda r: r.evaluated_cold)
    peaks = [
        _series(ax, when, column(records, get), window, f"{seg} users", SEGMENT_COLOURS[seg], weights=n)
        for seg, get, n in (
            ("all", lambda r: r.recall, evaluated),
            ("cold", lambda r: r.recall_cold, cold),
            ("warm", lambda r: r.recall_warm, evaluated - cold),
        )
    ]
    _mark_drift(ax, records, when)
    _style(ax, f"Prequential Recall@K (test-then-train), rolling mean over {window} batches", "Recall@K", when)
    ax.set_xlabel("stream time (UTC)")
    finite = [p for p in peaks if np.isfinite(p) and p > 0]
    # single-event batches spike to 0 or 1: scale to the rolling means, not the spikes
    ax.set_ylim(bottom=0, top=min(1.0, 1.4 * max(finite)) if finite else None)
    _finish(ax)
    return fig


def _drift_figure(records: Sequence[BatchRecord], when: np.ndarray, window: int) -> Figure:
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    panels = (
        ("Refreshed items: mean cosine shift per batch", "cosine distance", lambda r: r.item_shift_mean, "tab:purple"),
        ("Probe items' top-K neighbours: Jaccard@K vs last", "Jaccard@K", lambda r: r.neighbour_jaccard, "tab:brown"),
        ("Item centroid: cosine distance from reference", "cosine distance", lambda r: r.centroid_shift, "tab:olive"),
    )
    for i, (ax, (title, ylabel, get, colour)) in enumerate(zip(axes, panels)):
        _series(ax, when, column(records, get), window, f"rolling mean ({window} batches)", colour)
        _mark_drift(ax, records, when, legend=i == 0)
        _style(ax, title, ylabel, when)
        _finish(ax)
    axes[-1].set_xlabel("stream time (UTC)")
    fig.suptitle("Embedding drift of the published items", fontsize=13, fontweight="bold")
    fig.tight_layout()
    return fig


def _throughput_figure(records: Sequence[BatchRecord], when: np.ndarray, window: int) -> Figure:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    events = column(records, lambda r: r.events)
    seconds = column(records, lambda r: r.seconds if r.seconds > 0 else None)
    rate = events / seconds
    # rolling events / rolling seconds = a time-weighted rate, not a mean of ratios
    _series(top, when, rate, window, f"events/s, rolling over {window} batches", "tab:blue", weights=seconds)
    _style(top, "Processing throughput (valid events per second of batch wall time)", "events / s", when)
    top.set_ylim(bottom=0)
    _finish(top)
    fresh = column(records, lambda r: r.freshness_p50_s)
    _series(bottom, when, fresh, window, f"p50, rolling over {window} batches", "tab:green")
    _style(bottom, "Freshness: event record time → embedding visible in Milvus (batch median)", "seconds", when)
    if np.nanmin(fresh, initial=np.inf) > 0 and np.nanmax(fresh, initial=0) / np.nanmin(fresh, initial=np.inf) > 50:
        bottom.set_yscale("log")
    bottom.set_xlabel("stream time (UTC)")
    _finish(bottom)
    fig.tight_layout()
    return fig


def _loss_figure(records: Sequence[BatchRecord], when: np.ndarray, window: int) -> Figure:
    tasks = sorted({t for r in records for t in r.task_losses})
    weighted = sorted({t for r in records for t in r.task_weights})
    rows = 2 if weighted else 1
    fig, axes = plt.subplots(rows, 1, figsize=(11, 4 + 3 * (rows - 1)), sharex=True, squeeze=False)
    ax = axes[0, 0]
    _series(ax, when, column(records, lambda r: r.loss), window, "total", "black")
    cmap = plt.get_cmap("tab10")
    colour = {task: cmap(i % 10) for i, task in enumerate(sorted({*tasks, *weighted}))}
    if len(tasks) > 1 or (tasks and not _same_as_total(records)):
        for task in tasks:
            _series(ax, when, column(records, lambda r, t=task: r.task_losses.get(t)), window, task, colour[task])
    _mark_drift(ax, records, when)
    _style(ax, f"Training loss per batch (rolling mean over {window} batches)", "loss", when)
    _finish(ax)
    if weighted:
        wax = axes[1, 0]
        for task in weighted:
            values = column(records, lambda r, t=task: r.task_weights.get(t))
            wax.plot(when, values, color=colour[task], linewidth=1.5, label=task)
        _style(wax, "Task weights", "weight", when)
        _finish(wax)
    axes[-1, 0].set_xlabel("stream time (UTC)")
    fig.tight_layout()
    return fig


def _same_as_total(records: Sequence[BatchRecord]) -> bool:
    """True when the single task's loss equals the total loss (nothing to add to the plot)."""
    pairs = [(r.loss, next(iter(r.task_losses.values()))) for r in records if r.loss is not None and r.task_losses]
    return all(abs(a - b) < 1e-9 for a, b in pairs)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _weighted(
    records: Sequence[BatchRecord], get: Callable[[BatchRecord], float | None], n: Callable[[BatchRecord], int]
) -> float | None:
    """Mean of a per-batch rate weighted by its count (None when nothing was counted)."""
    pairs = [(v, n(r)) for r in records if (v := get(r)) is not None and n(r) > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _recall(records: Sequence[BatchRecord]) -> float | None:
    """Recall@K over ``records``, weighted by scored events."""
    return _weighted(records, lambda r: r.recall, lambda r: r.evaluated)


def _mean_loss(records: Sequence[BatchRecord]) -> float | None:
    losses = [r.loss for r in records if r.loss is not None]
    return float(np.mean(losses)) if losses else None


def summary_markdown(records: Sequence[BatchRecord], history_path: Path, figures: list[str], window: int) -> str:
    """The ``summary.md`` text: volume, speed, quality at start/end, freshness, drift alarms, figure links."""
    when = stream_clock(records)
    events = sum(r.events for r in records)
    seconds = sum(r.seconds for r in records)
    head, tail = records[:window], records[-window:]
    fresh = [r.freshness_p50_s for r in records if r.freshness_p50_s is not None]
    lines = [
        "# ebrflow run report",
        "",
        f"History `{history_path}`: {len(records):,} batches, {events:,} events trained "
        f"({sum(r.invalid for r in records):,} invalid), stream time {when[0]:%Y-%m-%d %H:%M} → "
        f"{when[-1]:%Y-%m-%d %H:%M} UTC.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| processing throughput | {_fmt(events / seconds if seconds else None, ',.0f')} events/s "
        f"({seconds:,.1f} s of batch time) |",
        f"| Recall@K overall (all / cold / warm) | {_fmt(_recall(records))} / "
        f"{_fmt(_weighted(records, lambda r: r.recall_cold, lambda r: r.evaluated_cold))} / "
        f"{_fmt(_weighted(records, lambda r: r.recall_warm, lambda r: r.evaluated - r.evaluated_cold))} |",
        f"| Recall@K first / last {window} batches | {_fmt(_recall(head))} / {_fmt(_recall(tail))} |",
        f"| loss first / last {window} batches | {_fmt(_mean_loss(head))} / {_fmt(_mean_loss(tail))} |",
        f"| freshness p50 (median over batches) | {_fmt(float(np.median(fresh)) if fresh else None, '.2f')} s |",
        f"| items indexed, model version at the end | {records[-1].items_indexed:,}, {records[-1].model_version:,} |",
        "",
        "## Drift alarms",
        "",
        *_drift_lines(records, when),
        "",
        "## Figures",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
    ]
    return "\n".join(lines)


def _drift_lines(records: Sequence[BatchRecord], when: np.ndarray) -> list[str]:
    fired: dict[str, list[tuple[int, datetime]]] = defaultdict(list)
    for rec, t in zip(records, when):
        for signal in rec.drift_signals:
            fired[signal].append((rec.batch, t))
    if not fired:
        return ["No detector fired."]
    lines = ["| signal | alarms | batches (stream time) |", "|---|---|---|"]
    for signal, hits in sorted(fired.items()):
        shown = ", ".join(f"{b} ({t:%Y-%m-%d %H:%M})" for b, t in hits[:8]) + (" …" if len(hits) > 8 else "")
        lines.append(f"| {signal} | {len(hits)} | {shown} |")
    return lines
