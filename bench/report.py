"""Renders every bench/results/*.json as Markdown: each suite's own page (bench/results/<suite>.md), all of them on
one page (bench/results/RESULTS.md), and the generated blocks of the docs that show results (docs/benchmarks.md,
docs/scaling.md, the README's targets): whatever sits between ``<!-- results:start SUITE[,SUITE...] -->`` and
``<!-- results:end -->`` (the pseudo-suite ``targets`` is ``bench.targets``' table).

Usage: ``python -m bench.report`` (the last step of ``make bench``), so no number in the docs is typed by hand.
``--out DIR`` reads and writes another results directory; ``--docs DIR`` is the docs directory to update
(default: the repository's docs/ when the results are the repository's bench/results/, else none). Suites written
by ``bench.output.Run`` carry their tables; any other JSON (another suite's own format) is summarised by its own
Markdown, or by its scalar fields.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import targets
from bench.output import RESULTS_DIR, fmt, machine_info, markdown_table, render_markdown

ORDER = ["quality", "throughput", "freshness", "scale"]
DOCS_DIR = Path(__file__).resolve().parents[1] / "docs"
README = DOCS_DIR.parent / "README.md"  # its targets block
BLOCK = re.compile(r"(<!-- results:start ([\w/,]+) -->\n)(.*?)(<!-- results:end -->)", re.DOTALL)


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


def _ours(payload: dict[str, Any]) -> bool:
    """Whether a payload was written by ``bench.output.Run`` (it carries its tables and command)."""
    return "tables" in payload and "command" in payload


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


def _payloads(results_dir: Path) -> dict[str, dict[str, Any]]:
    payloads = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            payloads[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return payloads


def build(results_dir: Path, link_prefix: str = "") -> str:
    """The whole Results page from the JSON files in ``results_dir``."""
    payloads = _payloads(results_dir)
    names = [n for n in ORDER if n in payloads] + sorted(n for n in payloads if n not in ORDER)
    ours = [payloads[n] for n in names if _ours(payloads[n])]
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
        if _ours(p):
            lines.append(render_markdown(p, heading="##", link_prefix=link_prefix))
            lines.append(
                f"Run started {p.get('started_utc')}; 1-min load average at start: "
                f"{fmt(p.get('machine', {}).get('load_avg_1m_at_start'))}.\n"
            )
        else:
            lines.append(foreign_section(name, p, results_dir, link_prefix))
    return "\n".join(lines) + "\n"


def suite_summary(name: str, results_dir: Path, link_prefix: str) -> str:
    """One suite for a docs page: command, main tables (no tuning grids), notes and first plot; another suite's own
    Markdown for foreign formats. Empty when the suite has no results file."""
    path = results_dir / f"{name}.json"
    if not path.exists():
        return ""
    payload = json.loads(path.read_text())
    source = f"[{name}.json]({link_prefix}{name}.json)"
    if not _ours(payload):
        own = results_dir / f"{name}.md"
        return f"{_demote(own.read_text().strip())}\n\n(Rendered from {source}.)\n" if own.exists() else ""
    lines = [
        f"## {payload.get('title', name)}",
        "",
        f"`{payload['command']}` (wall {fmt(float(payload.get('wall_s', 0.0)))} s), rendered from {source}.",
        "",
    ]
    for t in payload["tables"]:
        if not t["title"].lower().startswith("tuning grid"):
            lines += [markdown_table(t), ""]
    if payload.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    if payload.get("plots"):
        lines += [f"![{payload['plots'][0]}]({link_prefix}{Path(name).parent / payload['plots'][0]})", ""]
    return "\n".join(lines)


def spliced(text: str, results_dir: Path, link_prefix: str) -> str:
    """``text`` with every results block regenerated from ``results_dir`` (links to it start with ``link_prefix``)."""

    def section(name: str) -> str:
        if name == "targets":
            return targets.render(results_dir, link_prefix)
        return suite_summary(name, results_dir, link_prefix)

    def block(match: re.Match[str]) -> str:
        sections = [section(name) for name in match.group(2).split(",")]
        body = "\n".join(s for s in sections if s)
        return f"{match.group(1)}\n{body}\n{match.group(4)}"

    return BLOCK.sub(block, text)


def splice_doc(doc: Path, results_dir: Path) -> bool:
    """Regenerate every results block of ``doc`` from ``results_dir``; True when it has any."""
    text = doc.read_text()
    if not BLOCK.search(text):
        return False
    doc.write_text(spliced(text, results_dir, Path(os.path.relpath(results_dir, doc.parent)).as_posix() + "/"))
    return True


def rerender_suites(results_dir: Path) -> None:
    """Each suite's own Markdown again from its JSON, so a corrected JSON and its page never disagree."""
    for name, payload in _payloads(results_dir).items():
        if _ours(payload):
            (results_dir / f"{name}.md").write_text(render_markdown(payload) + "\n")
        elif name == "gowalla" and "meta" in payload:
            from bench.gowalla import render

            render(results_dir / name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help=f"directory to write RESULTS.md (default {RESULTS_DIR})"
    )
    parser.add_argument("--results", type=Path, default=None, help="directory holding the suites' JSON (default --out)")
    parser.add_argument("--link-prefix", default="", help="prefix for image links in RESULTS.md")
    parser.add_argument("--docs", type=Path, default=None, help="docs to update (default: docs/ for bench/results/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.results or args.out
    for directory in (results, *(p for p in results.iterdir() if p.is_dir())):
        rerender_suites(directory)
    out = args.out / "RESULTS.md"
    out.write_text(build(results, args.link_prefix))
    print(out)
    docs = args.docs or (DOCS_DIR if results.resolve() == RESULTS_DIR.resolve() else None)
    if docs is not None:
        readme = [README] if docs.resolve() == DOCS_DIR.resolve() else []  # the repository's README with its docs
        for doc in [*sorted(docs.glob("*.md")), *readme]:
            if doc.exists() and splice_doc(doc, results):
                print(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
