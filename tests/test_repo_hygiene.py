"""The repository travels: no machine-specific absolute paths, a Makefile whose targets name what exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.markdown import github_anchors, relative_links

ROOT = Path(__file__).resolve().parents[1]
# home/work/scratch directories and temporary files of one machine; container paths (/opt/kafka in the compose
# file, /etc, /proc in code) are not machine-specific
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|Users|root|mnt|scratch|tmp)/[\w.+-]+")


def tracked_files() -> list[Path]:
    """Files git tracks (every file but caches and virtualenvs when this is not a git checkout)."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        return [ROOT / name for name in out.stdout.decode().split("\0") if name]
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "ebrflow_data", ".hypothesis"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def test_no_machine_specific_absolute_paths() -> None:
    found = []
    for path in tracked_files():
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (PNG plots)
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            for match in MACHINE_PATH.finditer(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {match.group()}")
    assert len(tracked_files()) > 50  # the scan saw the repository
    assert not found, "machine-specific paths:\n" + "\n".join(found)


def test_the_pattern_catches_what_it_should() -> None:
    machine_data = "/".join(("", "work", "shared", "data"))  # built, so this file itself holds no machine path
    hits = [bool(MACHINE_PATH.search(s)) for s in (machine_data, "'/home/ann/x'", "/tmp/run.log", "a/tmp/b")]
    assert hits == [True, True, True, False]
    assert not MACHINE_PATH.search("/opt/kafka/bin/kafka.sh") and not MACHINE_PATH.search("https://x.org/home/a")


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    """Files exist, and ``#anchors`` name a heading of the file they point into (the README's sections moved to
    docs/: links, alert runbook URLs and the docs' cross-references must follow)."""
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for target in relative_links(text):
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in github_anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_stays_a_five_minute_read() -> None:
    """What a newcomer needs, and nothing that belongs in docs/ (benchmarks, runbooks, the model's details)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) < 10_000, f"{len(text)} characters"
    for needed in ("make demo", "make test", "ebrflow query", "ebrflow replay", "docker compose", "QueryClient"):
        assert needed in text, needed
    assert "Runbook" not in text
    # one generated block at most: the targets table (bench/targets.py); the suites' tables live in docs/
    assert re.findall(r"<!-- results:start ([\w/,]+) -->", text) in ([], ["targets"])


def test_build_and_install_output_is_ignored() -> None:
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["build/lib/ebrflow/cli.py", "ebrflow.egg-info/PKG-INFO", ".venv/bin/ebrflow", "ebrflow_data/ebrflow.lock"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == paths


def _make(*args: str) -> str:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_bench_runs_every_suite_that_exists() -> None:
    dry = _make("bench", "VENV=.venv-dry-run", "GOWALLA_DATA=.", "TORCH_INDEX=")
    suites = re.search(r"for suite in ([\w ]+); do", dry).group(1).split()
    mains = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
    assert sorted([*suites, "report"]) == mains
    assert "-m bench.report" in dry


def test_make_venv_takes_torch_from_the_cpu_index_unless_overridden() -> None:
    default = [line for line in _make("venv", "VENV=.venv-dry-run").splitlines() if "torch" in line]
    assert len(default) == 1 and "--extra-index-url https://download.pytorch.org/whl/cpu" in default[0]
    custom = [
        line
        for line in _make("venv", "VENV=.venv-dry-run", "TORCH_SPEC=torch>=2.2", "TORCH_INDEX=").splitlines()
        if "torch" in line
    ]
    assert len(custom) == 1 and '"torch>=2.2"' in custom[0] and "index-url" not in custom[0]


def test_the_product_imports_no_test_support() -> None:
    # tests/ (e.g. tests/promql.py) is not installed: an import of it from the package would fail in a deployment.
    pattern = re.compile(r"^\s*(?:from|import)\s+tests\b", re.MULTILINE)
    product = [p for folder in ("ebrflow", "stream", "model", "indexer", "ops") for p in (ROOT / folder).rglob("*.py")]
    assert len(product) > 30
    offenders = [str(p.relative_to(ROOT)) for p in product if pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"product modules import test support: {offenders}"
