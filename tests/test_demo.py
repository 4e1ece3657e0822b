"""A new user's first commands, as the README's quickstart gives them: ``ebrflow demo`` on embedded defaults, the
query it suggests, then ``ebrflow run`` on the embedded broker fed by the ``replay`` command it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from tests.conftest import dataset

VENV_BIN = str(Path(sys.executable).parent)


def newcomer_env() -> dict[str, str]:
    """The environment of a shell where the venv is not activated (not on PATH) and no EBRFLOW_* is set."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EBRFLOW_") and k != "COLUMNS"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != VENV_BIN)
    return {**env, "EBRFLOW_METRICS__PORT": "0"}


def ebrflow(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ebrflow", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_demo_then_the_suggested_query_works_as_printed(tmp_path: Path) -> None:
    env = newcomer_env()
    demo = ebrflow("demo", "--events", "4000", cwd=tmp_path, env=env)
    assert demo.returncode == 0, demo.stderr[-2000:]
    said = demo.stdout + demo.stderr  # result lines go to the console's stream, logs to stderr
    assert "demo done: 4,000 events (4,000 trained, 0 invalid)" in said
    # not a terminal here: the suggestion is still one line, and it runs in a shell exactly as printed
    suggested = re.search(r"^try: (EBRFLOW_MILVUS__URI=\S+ \S+ query --user \d+ -k 10)$", said, re.MULTILINE)
    assert suggested, said[-2000:]
    query = subprocess.run(suggested.group(1), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert query.returncode == 0, query.stderr[-2000:]
    rows = [line.split("\t") for line in query.stdout.strip().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(1, 11))  # rank, item id, score
    assert len({r[1] for r in rows}) == 10


def test_run_on_the_embedded_broker_trains_what_its_printed_replay_command_sends(tmp_path: Path) -> None:
    """The README's recipe: ``ebrflow run`` prints where its embedded broker listens and the replay command that
    feeds it; that command, with a public dataset in place of ``--synthetic N``, is trained."""
    movielens = dataset("movielens-100k", "u.data.gz")
    env = newcomer_env()
    trainer = subprocess.Popen(
        [sys.executable, "-m", "ebrflow", "run", "--max-events", "3000"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    printed = threading.Event()

    def read() -> None:
        for line in trainer.stdout:
            lines.append(line)
            if "send it events with: " in line:
                printed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert printed.wait(120), "".join(lines)[-2000:]
        command = next(line for line in lines if "send it events with: " in line).split("send it events with: ")[1]
        command = command.strip().replace("--synthetic 10000", f"{movielens} --format movielens --limit 3000")
        replay = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert replay.returncode == 0 and "sent 3,000 events" in replay.stderr, replay.stderr[-2000:]
        assert trainer.wait(timeout=300) == 0, "".join(lines)[-2000:]
    finally:
        trainer.kill()
        trainer.wait()
    reader.join(timeout=10)
    assert re.search(r"^consumed 3,000 \(0 invalid\)", "".join(lines), re.MULTILINE), "".join(lines)[-2000:]
