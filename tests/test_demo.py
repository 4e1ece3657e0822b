"""A new user's first two commands: ``ebrflow demo`` on embedded defaults, then the query it suggests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def ebrflow(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ebrflow", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_demo_then_the_suggested_query_works(tmp_path: Path) -> None:
    env = {**os.environ, "EBRFLOW_METRICS__PORT": "0", "COLUMNS": "200"}
    demo = ebrflow("demo", "--events", "4000", cwd=tmp_path, env=env)
    assert demo.returncode == 0, demo.stderr[-2000:]
    said = demo.stdout + demo.stderr  # result lines go to the console's stream, logs to stderr
    assert "demo done: 4,000 events (4,000 trained, 0 invalid)" in said
    suggested = re.search(r"try: EBRFLOW_MILVUS__URI=(\S+) ebrflow query --user (\d+) -k 10", said)
    assert suggested, said[-2000:]
    uri, user = suggested.groups()
    query = ebrflow("query", "--user", user, "-k", "10", cwd=tmp_path, env={**env, "EBRFLOW_MILVUS__URI": uri})
    assert query.returncode == 0, query.stderr[-2000:]
    rows = [line.split("\t") for line in query.stdout.strip().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(1, 11))  # rank, item id, score
    assert len({r[1] for r in rows}) == 10
