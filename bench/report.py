"""Collects every bench/results/*.json into one Markdown "Results" section: bench/results/RESULTS.md.

Usage: ``python -m bench.report``. ``--out DIR`` reads and writes another directory; ``--link-prefix
bench/results/`` makes image links resolve when the section is pasted into the top-level README. Suites
written by this harness carry their tables; any other JSON (another suite's own format) is summarised by
its scalar fields and linked.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.output import RESULTS_DIR, fmt, machine_info, render_markdown

ORDER = ["quality", "throughput", "freshness", "scale"]


def _machine_lines(m: dict[str, Any], source: str) -> list[str]:
    keys = [
        ("CPU", f"{m.get('cpu_model')} — {m.get('nproc')} logical CPUs"),
        ("RAM", f"{m.get('ram_gib')} GiB"),
        ("OS", m.get("os")),
        (
            "Python / torch / numpy",
            f"{m.get('python')} / {m.get('torch')} / {m.get('numpy')}",
        ),
        ("river / pymilvus / kafka-python", f"{m.get('river')} / {m.get('pymilvus')} / {m.get('kafka')}"),
    ]
    return [f"Machine ({source}):", ""] + [f"- {k}: {v}" for k, v in keys] + [""]


def _scalars(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    if isinstance(obj, dict) and depth < 3:
        out = []
        for k, v in obj.items():
            out += _scalars(v, f"{prefix}{k}.", depth + 1)
        return out
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return [(prefix.rstrip("."), obj)]
    return []


def _demote(markdown: str) -> str:
    """Shift headings one level down so another suite's document nests under ``# Results``."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def foreign_section(name: str, payload: dict[str, Any], results_dir: Path, link_prefix: str) -> str:
    """A JSON not written by bench.output: its own Markdown if it has one, else its scalar fields; plus plots."""
    md = results_dir / f"{name}.md"
    if md.exists():
        text = _demote(md.read_text().strip())
        lines = [text if text.startswith("## ") else f"## {name}\n\n{text}", ""]
        lines += [f"(From [{md.name}]({link_prefix}{md.name}) and {name}.json, written by `bench/{name}.py`.)", ""]
    else:
        lines = [f"## {name}", ""]
        scalars = [(k, v) for k, v in _scalars(payload) if not isinstance(v, str) or len(v) < 80][:40]
        if scalars:
            lines += ["| field | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in scalars] + [""]
    for png in sorted(results_dir.glob(f"{name}*.png")):
        lines += [f"![{png.name}]({link_prefix}{png.name})", ""]
    return "\n".join(lines)


def build(results_dir: Path, link_prefix: str = "") -> str:
    """The whole Results section from the JSON files in ``results_dir``."""
    payloads = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            payloads[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    names = [n for n in ORDER if n in payloads] + sorted(n for n in payloads if n not in ORDER)
    ours = [payloads[n] for n in names if "tables" in payloads[n] and "command" in payloads[n]]
    machine = ours[0]["machine"] if ours else machine_info()
    lines = ["# Results", ""]
    lines += _machine_lines(machine, "as recorded by the first suite below" if ours else "now")
    lines += [
        "Every number below was produced by the command shown with it, run from the repository root with the "
        "project's venv (`.venv/bin/python -m bench.<suite>`). Runs shared the machine with other jobs; "
        "see each suite's notes.",
        "",
    ]
    for name in names:
        p = payloads[name]
        if "tables" in p and "command" in p:
            lines.append(render_markdown(p, heading="##", link_prefix=link_prefix))
            lines.append(
                f"Run started {p.get('started_utc')}; 1-min load average at start: "
                f"{fmt(p.get('machine', {}).get('load_avg_1m_at_start'))}.\n"
            )
        else:
            lines.append(foreign_section(name, p, results_dir, link_prefix))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help=f"directory to write RESULTS.md (default {RESULTS_DIR})"
    )
    parser.add_argument("--results", type=Path, default=None, help="directory holding the suites' JSON (default --out)")
    parser.add_argument("--link-prefix", default="", help="prefix for image links, e.g. bench/results/")
    parser.add_argument("--smoke", action="store_true", help="accepted for symmetry with the suites; no effect")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "RESULTS.md"
    out.write_text(build(args.results or args.out, args.link_prefix))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
