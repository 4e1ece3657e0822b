"""Where results go and what they look like: machine facts, the JSON payload, Markdown tables, summary stats."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--smoke`` (tiny sizes, seconds) and ``--out`` (results directory) for every suite."""
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the suite runs, numbers mean nothing")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results directory (default {RESULTS_DIR})")


def command_line(suite: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, as typed from the repository root."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", f"bench.{suite}", *map(shlex.quote, args)])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, RAM, OS, Python and key library versions, plus the 1-minute load at the start."""
    import numpy
    import torch

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_gib": _ram_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
    }
    for mod in ("river", "pymilvus", "kafka"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is just not reported
            info[mod] = None
    try:
        info["load_avg_1m_at_start"] = os.getloadavg()[0]
    except OSError:
        info["load_avg_1m_at_start"] = None
    return info


def code_version() -> dict[str, Any]:
    """The checkout the numbers came from: HEAD commit and files that differ from it (uncommitted work)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    lines = git("status", "--porcelain", "--untracked-files=no").splitlines()
    dirty = [line[3:] for line in lines if not line[3:].startswith("bench/results/")]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None, "modified_tracked_files": dirty}


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (``n`` too)."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt(value: Any, digits: int = 3) -> str:
    """A compact cell: ints with thousands separators, floats to ``digits`` significant figures."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e12 or abs(value) < 10 ** -(digits + 1)):
            return f"{value:.{digits - 1}e}"
        if abs(value) >= 10**digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{max(digits - len(str(int(abs(value)))), 0)}f}"
    return str(value)


def fmt_range(s: dict[str, float], digits: int = 3) -> str:
    """``median (min–max)`` of a ``summary``."""
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"


def table(title: str, columns: list[str], rows: list[list[Any]], note: str = "") -> dict[str, Any]:
    """A table as stored in the JSON (cells already formatted as strings)."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    return {"title": title, "columns": columns, "rows": cells, "note": note}


def markdown_table(t: dict[str, Any]) -> str:
    """One stored table as Markdown."""
    lines = [f"**{t['title']}**", "", "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
    if t.get("note"):
        lines += ["", t["note"]]
    return "\n".join(lines)


def render_markdown(payload: dict[str, Any], heading: str = "##", link_prefix: str = "") -> str:
    """A suite's payload as a Markdown section: command, tables, notes and plot links."""
    out = [f"{heading} {payload.get('title', payload['suite'])}", ""]
    out += [f"Command: `{payload['command']}` — wall time {fmt(float(payload.get('wall_s', 0.0)))} s", ""]
    code = payload.get("code") or {}
    if code.get("commit"):
        dirty = [f for f in code.get("modified_tracked_files") or [] if not f.startswith("bench/results/")]
        extra = f" plus uncommitted changes to {', '.join(dirty)}" if dirty else ""
        out += [f"Code: commit `{code['commit']}`{extra}.", ""]
    for t in payload.get("tables", []):
        out += [markdown_table(t), ""]
    if payload.get("notes"):
        out += ["Notes:", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    for plot in payload.get("plots", []):
        out += [f"![{plot}]({link_prefix}{plot})", ""]
    return "\n".join(out)


def jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays and Paths to plain JSON types (NaN/inf become None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class Run:
    """Collects one suite run's payload and writes ``<out>/<suite>.json`` and ``<suite>.md``."""

    def __init__(self, suite: str, title: str, out: Path, argv: Sequence[str] | None, smoke: bool) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic()
        self.payload: dict[str, Any] = {
            "suite": suite,
            "title": title + (" (smoke run: sizes too small to mean anything)" if smoke else ""),
            "command": command_line(suite, argv),
            "smoke": smoke,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info(),
            "code": code_version(),
            "settings": {},
            "results": {},
            "tables": [],
            "notes": [],
            "plots": [],
        }

    def path(self, name: str) -> Path:
        """A file in the output directory."""
        return self.out / name

    def write(self) -> Path:
        """Write JSON and Markdown; returns the JSON path."""
        self.payload["wall_s"] = time.monotonic() - self._t0
        suite = self.payload["suite"]
        json_path = self.path(f"{suite}.json")
        json_path.write_text(json.dumps(jsonable(self.payload), indent=2) + "\n")
        self.path(f"{suite}.md").write_text(render_markdown(self.payload) + "\n")
        return json_path
