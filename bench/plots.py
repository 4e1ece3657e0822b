"""Matplotlib helpers (Agg backend, PNG files) shared by the suites."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402


def lines_over_time(path: Path, series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, ylabel: str) -> Path:
    """One line per series; x is Unix milliseconds shown as dates."""
    fig, ax = plt.subplots(figsize=(11, 4.5))
    colours = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    for n, (label, (ts_ms, values)) in enumerate(series.items()):
        dates = [datetime.fromtimestamp(t / 1000, tz=timezone.utc) for t in ts_ms.tolist()]
        style = "-" if label.startswith("ebrflow") else "--"
        ax.plot(dates, values, style, label=label, linewidth=1.3, color=colours(n))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("stream time (UTC)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


Panel = tuple[str, str, str, dict[str, tuple[Sequence[float], Sequence[float]]]]


def xy_panels(path: Path, panels: list[Panel]) -> Path:
    """Side-by-side panels (title, x label, y label, series), lines with markers over a log-scaled x axis."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (title, xlabel, ylabel, series) in zip(axes[0], panels):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o", label=label)
        ax.set_xscale("log")
        ticks = sorted({float(v) for x, _ in series.values() for v in x})
        ax.set_xticks(ticks, [f"{v:,.0f}" for v in ticks], fontsize=8)
        ax.minorticks_off()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cdfs(path: Path, series: dict[str, Sequence[float]], title: str, xlabel: str) -> Path:
    """Empirical CDF per series (x log-scaled)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in series.items():
        x = np.sort(np.asarray(values, dtype=np.float64))
        if len(x):
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label)
    ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of sampled events")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def hbars(path: Path, stats: dict[str, dict[str, float]], title: str, xlabel: str, log: bool = True) -> Path:
    """Horizontal bars at each ``median`` with ``min``–``max`` whiskers, one row per label (top to bottom)."""
    labels = list(stats)[::-1]
    med = np.array([stats[k]["median"] for k in labels])
    err = np.array([[med[i] - stats[k]["min"], stats[k]["max"] - med[i]] for i, k in enumerate(labels)]).T
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    ax.barh(np.arange(len(labels)), med, xerr=err, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
    if log:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
