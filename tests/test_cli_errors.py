"""Every operator error of the real ``ebrflow`` command (a subprocess): one ``error:`` line, no traceback, and its
documented exit code (2 usage, 3 unknown user, 65 bad input file, 69 unavailable, 78 configuration)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebrflow import __version__
from ebrflow.config import load_settings
from ebrflow.preflight import CONNECT_TIMEOUT_S
from ebrflow.render import MASK
from ebrflow.stream.broker import EmbeddedBroker

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def ebrflow(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ebrflow.cli`` with no inherited ``EBRFLOW_*`` variables except those in ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("EBRFLOW_")}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "ebrflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd or ROOT,
        env={**base, **(env or {})},
    )


def one_error(out: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The single ``error:`` line, after checking the exit code, that it names ``fragments`` and no traceback."""
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == code, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(lines) == 1, out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- configuration: 78 ---------------------------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    one_error(ebrflow("run", "-c", str(tmp_path / "nope.toml")), 78, "nope.toml", "not found")


def test_missing_config_file_from_ebrflow_config(tmp_path: Path) -> None:
    out = ebrflow("config", "validate", env={"EBRFLOW_CONFIG": str(tmp_path / "gone.toml")})
    one_error(out, 78, "gone.toml", "not found")


@pytest.mark.parametrize(
    ("toml", "env", "fragments"),
    [
        ("", {"EBRFLOW_RUN__LOG_LEVEL": "verbose"}, ("run.log_level", "EBRFLOW_RUN__LOG_LEVEL", "INFO")),
        ('[run]\nlog_level = "LOUD"\n', {}, ("run.log_level", "DEBUG")),
        ("[kafka]\ntopik = 1\n", {}, ("kafka.topik",)),
        ("[modle]\ndim = 3\n", {}, ("modle: unknown section (did you mean 'model'?)",)),
        ("", {"EBRFLOW_MODLE__DIM": "3"}, ("EBRFLOW_MODLE__DIM", "unknown section 'modle' (did you mean 'model'?)")),
        ("", {"EBRFLOW_MODEL__DIM": "three"}, ("model.dim", "EBRFLOW_MODEL__DIM")),
        ("[model]\noptions = {foo = 1}\n", {}, ("model.options.foo", "SSMTLModel")),
        ('[model]\nkind = "two_tower"\noptions = {fanout = 1}\n', {}, ("model.options.fanout", "TwoTowerModel")),
        ("[model]\noptions = {fanouts = [5]}\n", {"EBRFLOW_MODEL__OPTIONS": '{"dim": 3}'}, ("model.options.dim",)),
        ("[model]\noptions = {tasks = {cca = {}}}\n", {}, ("model.options.tasks.cca", "unknown task", "cca_ssg")),
        (
            "[model]\noptions.tasks = {retrieval = {}, graphmae = {mask_ratio = 0.4}}\n",
            {},
            ("model.options.tasks.graphmae.mask_ratio", "mask_rate"),
        ),
        ("[model]\noptions.tasks.infonce = {eps = 'big'}\n", {}, ("model.options.tasks.infonce.eps", "a number")),
        (
            "[model]\noptions.tasks.retrieval = {temperature = 0.2}\n",
            {},
            ("model.options.tasks.retrieval.temperature", "model.temperature"),
        ),
        ('[model]\ndevice = "gpu0"\n', {}, ("model.device", "gpu0")),
        ("[model]\ndim = 32\n[kafka\n", {}, ("not valid TOML",)),
    ],
)
def test_bad_settings_are_one_line_and_78(tmp_path: Path, toml: str, env: dict[str, str], fragments: tuple) -> None:
    cfg = write(tmp_path / "c.toml", toml)
    for command in (["config", "validate", "-c", str(cfg)], ["run", "-c", str(cfg)]):
        one_error(ebrflow(*command, env=env, cwd=tmp_path), 78, *fragments)
    assert not (tmp_path / "ebrflow_data").exists()  # nothing was created


@pytest.mark.parametrize(
    ("command", "toml", "env", "fragments"),
    [
        ("run", "", {"EBRFLOW_MODEL__LR": "inf"}, ("model.lr", "finite number", "EBRFLOW_MODEL__LR")),
        ("demo", "[model]\nlr = 0.0\n", {}, ("model.lr", "greater than 0")),
        ("run", "", {"EBRFLOW_KAFKA__TOPIC": ""}, ("kafka.topic", "not a legal Kafka topic name", "1-249")),
        ("demo", "", {"EBRFLOW_KAFKA__TOPIC": "a b/c"}, ("kafka.topic", "not a legal Kafka topic name")),
        ("backfill", "[run]\ncheckpoint_every_s = inf\n", {}, ("run.checkpoint_every_s", "finite number")),
        ("run", "", {"EBRFLOW_MODEL__DIM": "1000000000"}, ("model.dim", "at most 32768", "Milvus")),
        ("backfill", "", {"EBRFLOW_MILVUS__COLLECTION_PREFIX": "a-b c"}, ("milvus.collection_prefix", "letters")),
        ("run", "", {"EBRFLOW_RUN__DATA_DIR": "a-file"}, ("run.data_dir", "a-file is a file, not a directory")),
        ("demo", '[run]\ndata_dir = "a-file/sub"\n', {}, ("run.data_dir", "a-file is a file, not a directory")),
        ("backfill", "", {"EBRFLOW_RUN__DATA_DIR": "a-file"}, ("run.data_dir", "is a file, not a directory")),
    ],
)
def test_permanent_problems_are_78_before_anything_is_created(
    tmp_path: Path, command: str, toml: str, env: dict[str, str], fragments: tuple
) -> None:
    """What could never work is refused up front, by ``config validate`` and by the command's own preflight, before
    a broker starts, a topic or Milvus collection is created, or a data dir is made: no crash loop later."""
    write(tmp_path / "a-file", "")
    data = write(tmp_path / "u.data", "1\t2\t5\t881250949\n")
    cfg = write(tmp_path / "c.toml", toml)
    args = {"run": ["run"], "demo": ["demo"], "backfill": ["backfill", str(data)]}[command]
    env = {"EBRFLOW_METRICS__PORT": "0", **env}
    for argv in (["config", "validate"], args):
        one_error(ebrflow(*argv, "-c", str(cfg), env=env, cwd=tmp_path), 78, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "c.toml", "u.data"]  # nothing was created


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path: Path) -> None:
    out = ebrflow("run", env={"EBRFLOW_MODEL__DEVICE": "cuda", "EBRFLOW_METRICS__PORT": "0"}, cwd=tmp_path)
    one_error(out, 78, "model.device", "CUDA is not available")
    assert not (tmp_path / "ebrflow_data").exists()


def test_replay_without_a_broker_is_a_configuration_error(tmp_path: Path) -> None:
    one_error(ebrflow("replay", "--synthetic", "5", cwd=tmp_path), 78, "kafka.bootstrap_servers")


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({}, ("ranks need kafka.bootstrap_servers",)),
        ({"EBRFLOW_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9"}, ("ranks need a Milvus server", "milvus-lite server")),
        (
            {"EBRFLOW_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9", "EBRFLOW_MILVUS__URI": "http://127.0.0.1:9",
             "EBRFLOW_MODEL__KIND": "two_tower"},
            ("model.kind must be 'ssmtl'",),
        ),
    ],
)  # fmt: skip
def test_ranks_refuse_what_one_process_cannot_share(tmp_path: Path, env: dict[str, str], fragments: tuple) -> None:
    """Checked before torchrun starts anything: every rank would open its own broker or Milvus Lite directory."""
    one_error(ebrflow("run", "--ranks", "2", env=env, cwd=tmp_path), 78, *fragments)
    assert not (tmp_path / "ebrflow_data").exists()


def test_ranks_pass_new_generation_to_every_worker() -> None:
    """``--new-generation`` with ``--ranks`` reaches every rank (ranks fill a new generation and switch to it)."""
    from ebrflow.ranks import worker_argv

    assert worker_argv(None, None, None, None, new_generation=True) == ["run", "--new-generation"]


# --- usage: 2 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["replay", "--format", "parquet", "x.csv"], ("--format", "parquet", "movielens")),
        (["backfill", "--format", "parquet", "x.csv"], ("--format",)),
        (["replay", "--synthetic", "-5"], ("--synthetic",)),
        (["replay", "--limit", "-1", "--synthetic", "5"], ("--limit",)),
        (["replay"], ("PATH or --synthetic",)),
        (["replay", "no-such-file.csv", "--format", "csv"], ("no-such-file.csv", "does not exist")),
        (["query", "--user", "1", "-k", "0"], ("-k",)),
        (["query", "-k", "3"], ("--user",)),
        (["run", "--max-events", "0"], ("--max-events",)),
        (["run", "--bogus"], ("--bogus",)),
        (["frobnicate"], ("frobnicate",)),
        (["config", "show", "--format", "yaml"], ("--format",)),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], fragments: tuple) -> None:
    line = one_error(ebrflow(*args, cwd=tmp_path), 2, *fragments)
    assert "--help" in line  # points at the command's help


def test_no_arguments_prints_help_and_exits_2() -> None:
    out = ebrflow()
    assert out.returncode == 2 and "Usage" in out.stdout + out.stderr and "Traceback" not in out.stderr


# --- unavailable: 69, before any side effect -------------------------------------------------------------------


def test_metrics_port_in_use_before_any_side_effect(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"EBRFLOW_METRICS__PORT": str(port), "EBRFLOW_RUN__DATA_DIR": str(tmp_path / "data"),
               "EBRFLOW_MILVUS__URI": str(tmp_path / "data" / "milvus.db"), "EBRFLOW_MODEL__DEVICE": "cpu"}  # fmt: skip
        out = ebrflow("run", env=env, cwd=tmp_path)
    one_error(out, 69, f"metrics port {port}", "already in use")
    assert not (tmp_path / "data").exists()  # no broker started, no Milvus opened, no checkpoint dir


def test_unreachable_kafka_is_69_within_the_bound_and_creates_nothing(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    env = {
        "EBRFLOW_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "EBRFLOW_METRICS__PORT": "0",
        "EBRFLOW_RUN__DATA_DIR": str(tmp_path / "data"),
        "EBRFLOW_MILVUS__URI": str(tmp_path / "data" / "m.db"),
    }
    for command in (["run"], ["replay", "--synthetic", "5"]):
        out = ebrflow(*command, env=env, cwd=tmp_path)
        # bounded by ebrflow's own connect check (preflight.CONNECT_TIMEOUT_S), not kafka-python's 30 s timeouts
        one_error(out, 69, bootstrap, "kafka.bootstrap_servers", f"did not answer within {CONNECT_TIMEOUT_S:g} s")
    assert not (tmp_path / "data").exists()


def test_unreachable_milvus_server_is_69(tmp_path: Path) -> None:
    out = ebrflow("query", "--user", "1", env={"EBRFLOW_MILVUS__URI": f"http://127.0.0.1:{free_port()}"})
    one_error(out, 69, "Milvus at 127.0.0.1", "milvus.uri")


def test_query_on_a_missing_lite_db_is_69_and_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "none" / "milvus.db"
    one_error(ebrflow("query", "--user", "1", env={"EBRFLOW_MILVUS__URI": str(db)}), 69, str(db))
    assert not db.parent.exists()


# --- unknown user: 3 ------------------------------------------------------------------------------------------


def serve_generation(db: Path, dim: int) -> None:
    """Serve generation 1 (50 items, 5 users of ``dim``) from a Milvus Lite directory, in another process (Lite
    allows one process per directory, and it is closed again when this returns)."""
    fill = f"""
import numpy as np
from ebrflow.indexer.generations import Generations
from ebrflow.indexer.milvus_store import MilvusStore, connect
client = connect({str(db)!r})
store = MilvusStore(client, {dim})
store.use_generation(1)
rng = np.random.default_rng(0)
store.upsert(store.items, np.arange(50), rng.standard_normal((50, {dim})), 1)
store.upsert(store.users, np.arange(5), rng.standard_normal((5, {dim})), 1, seen=[np.zeros(0)] * 5)
client.flush(store.items)
client.flush(store.users)
Generations(client, "ebrflow").switch(1)
"""
    subprocess.run([sys.executable, "-c", fill], check=True, cwd=ROOT, timeout=120)


def test_unknown_user_exits_3(tmp_path: Path) -> None:
    db = tmp_path / "served.db"
    serve_generation(db, 8)
    env = {"EBRFLOW_MILVUS__URI": str(db), "EBRFLOW_MODEL__DIM": "8", "EBRFLOW_MODEL__POPULARITY_HALF_LIFE": "0"}
    known = ebrflow("query", "--user", "2", "-k", "3", env=env)
    assert known.returncode == 0 and len(known.stdout.strip().splitlines()) == 3, known.stderr[-2000:]
    one_error(ebrflow("query", "--user", "777", env=env), 3, "user 777", "no published embedding")


# --- another process holds it: 75; what is not there: 69 -----------------------------------------------------


def test_a_milvus_lite_dir_another_process_holds_is_75_in_one_line(tmp_path: Path) -> None:
    """milvus_lite logs its own traceback when it cannot take its directory's lock; the operator sees one line."""
    db = tmp_path / "held.db"
    hold = "import sys; from ebrflow.indexer.milvus_store import connect; c = connect(sys.argv[1]); print('held', "
    hold += "flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        trainer_env = {"EBRFLOW_MILVUS__URI": str(db), "EBRFLOW_METRICS__PORT": "0", "EBRFLOW_MODEL__DEVICE": "cpu"}
        for out in (
            ebrflow("query", "--user", "1", env={"EBRFLOW_MILVUS__URI": str(db)}, cwd=tmp_path),
            ebrflow("run", "--idle-exit", "5", env=trainer_env, cwd=tmp_path),
        ):
            one_error(out, 75, str(db), "another process holds the lock", "milvus-lite server --data-dir")
            assert "milvus_lite.server_manager" not in out.stderr, out.stderr[-2000:]  # nor its log lines
    finally:
        holder.kill()
        holder.wait()


def test_the_client_without_milvus_lite_names_the_extra_to_install(tmp_path: Path) -> None:
    """``pip install 'ebrflow[client]'`` has no milvus-lite: a local path says what to install, not "stop the
    trainer" (simulated here by hiding the installed milvus_lite package from the interpreter)."""
    (tmp_path / "m.db").mkdir()
    hidden = "import sys; sys.modules['milvus_lite'] = None; from ebrflow.cli import main; main(sys.argv[1:])"
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("EBRFLOW_")}
    out = subprocess.run(
        [sys.executable, "-c", hidden, "query", "--user", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**base, "EBRFLOW_MILVUS__URI": str(tmp_path / "m.db")},
    )
    one_error(out, 69, "milvus-lite is not installed", "pip install 'ebrflow[client,lite]'")


def test_a_dim_mismatch_without_checkpoints_is_78_naming_both_dims(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """With ``run.checkpoints = false`` the trainer writes the served collections: collections of dim 16 and
    ``model.dim = 32`` can never publish, so the start is refused (it used to retry the publish forever) before a
    topic is created."""
    from kafka.admin import KafkaAdminClient

    db = tmp_path / "served.db"
    serve_generation(db, 16)
    env = {
        "EBRFLOW_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "EBRFLOW_KAFKA__TOPIC": "dim.mismatch",
        "EBRFLOW_MILVUS__URI": str(db),
        "EBRFLOW_MODEL__DIM": "32",
        "EBRFLOW_MODEL__DEVICE": "cpu",
        "EBRFLOW_RUN__CHECKPOINTS": "false",
        "EBRFLOW_METRICS__PORT": "0",
    }
    out = ebrflow("run", "--idle-exit", "5", env=env, cwd=tmp_path)
    one_error(out, 78, "ebrflow_items_g1 has dim 16", "model.dim is 32", "--new-generation")
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        assert "dim.mismatch" not in admin.list_topics()
    finally:
        admin.close()


# --- bad input files: 65, naming the file and line -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "text", "fragments"),
    [
        ("e.jsonl", "jsonl", '{"user_id":1,"item_id":2,"ts":3}\n\n{"user_id":1,"item_id":"x","ts":4}\n',
         (":3:", "item_id")),
        ("e.csv", "csv", "user_id,item_id,ts\n1,2,3\n1,two,4\n", (":3:", "two")),
        ("e.csv", "csv", "user_id,item_id,ts\n1,2,3\n1,2\n", (":3:", "too few fields")),
        ("e.csv", "csv", "user_id,item_id,time\n1,2,3\n", ("missing CSV column ts",)),
        ("u.data", "movielens", "1\t2\t5\t881250949\n1\t3\t4\tsoon\n", (":2:", "column 4", "soon")),
        ("edges.txt", "snap", "# comment\n1 2 100\n3 4\n", (":3:", "at least 3 columns")),
    ],
)  # fmt: skip
def test_bad_replay_file_names_file_and_line(tmp_path: Path, name: str, fmt: str, text: str, fragments: tuple) -> None:
    """The file is checked offline, before Kafka is contacted: the broker here does not exist."""
    path = write(tmp_path / name, text)
    env = {"EBRFLOW_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "EBRFLOW_KAFKA__TOPIC": f"bad.{fmt}"}
    one_error(ebrflow("replay", str(path), "--format", fmt, env=env), 65, str(path), *fragments)


def test_replay_limit_0_checks_offline_and_sends_nothing(broker: EmbeddedBroker, tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t5\t881250949\n1\t3\t4\t881250950\n")
    out = ebrflow("replay", str(path), "--limit", "0", cwd=tmp_path)  # no broker configured at all
    assert out.returncode == 0 and "2 events read and checked" in out.stderr, out.stderr[-2000:]
    assert "Kafka not contacted" in out.stderr
    env = {"EBRFLOW_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers, "EBRFLOW_KAFKA__TOPIC": "limit7"}
    out = ebrflow("replay", "--synthetic", "50", "--limit", "7", env=env, cwd=tmp_path)
    assert out.returncode == 0 and "sent 7 events" in out.stderr, out.stderr[-2000:]


# --- --version, config show / validate ------------------------------------------------------------------------


def test_version() -> None:
    out = ebrflow("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"ebrflow {__version__}"


def test_config_show_masks_secrets_and_round_trips(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", '[kafka]\ntopic = "from-file"\nsasl_password = "hunter2"\n[model]\ndim = 32\n')
    env = {"EBRFLOW_CONFIG": str(cfg), "EBRFLOW_MILVUS__TOKEN": "root:s3cret", "EBRFLOW_MODEL__DIM": "48"}
    toml = ebrflow("config", "show", env=env)
    js = ebrflow("config", "show", "--format", "json", env=env)
    assert toml.returncode == 0 and js.returncode == 0, toml.stderr + js.stderr
    for text in (toml.stdout, js.stdout):
        assert "hunter2" not in text and "s3cret" not in text
    shown = tomllib.loads(toml.stdout)
    assert shown == {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in json.loads(js.stdout).items()}
    assert (shown["kafka"]["topic"], shown["model"]["dim"]) == ("from-file", 48)  # file, then environment on top
    assert shown["kafka"]["sasl_password"] == MASK and shown["milvus"]["token"] == MASK
    assert shown["kafka"]["sasl_username"] == ""  # unset values stay visible as unset
    # the TOML is a config file that loads back to the same settings (secrets aside)
    again = load_settings(write(tmp_path / "shown.toml", toml.stdout))
    expected = load_settings(cfg, model={"dim": 48})
    assert again.model_dump(exclude={"kafka": {"sasl_password"}, "milvus": {"token"}}) == expected.model_dump(
        exclude={"kafka": {"sasl_password"}, "milvus": {"token"}}
    )


def test_config_validate_ok(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", '[model]\nkind = "two_tower"\ndevice = "cpu"\n[run]\nlog_level = "debug"\n')
    out = ebrflow("config", "validate", "-c", str(cfg))
    assert out.returncode == 0 and "config ok" in out.stdout, out.stderr[-2000:]
