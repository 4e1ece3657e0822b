"""docker-compose.yml is valid Compose and agrees with deploy/ebrflow.toml, Prometheus and Grafana provisioning.

No Docker is needed (there is no container engine here): the file is validated against the Compose Specification
by ``compose-spec`` (bindings of the Rust ``compose_spec`` crate: unknown keys, wrong types, bad durations, ports
and enum values are errors) and cross-checked here (service names, ports, mounts, volumes, dependencies), which
that validator does not do. Not Debian's ``docker-compose`` 1.29 (``config -q``): unmaintained since 2021, an apt
package for CI, and it rejects the top-level ``name:`` that gives the stack's volumes their ``ebrflow_`` prefix.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import compose_spec
import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser under its PyPI name
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
TOML = ROOT / "deploy" / "ebrflow.toml"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "ops" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "ops" / "grafana" / "provisioning" / "dashboards" / "ebrflow.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "ebrflow.json"
DOCKERFILE = ROOT / "Dockerfile"

REQUIRED_SERVICES = {"kafka", "etcd", "minio", "milvus", "prometheus", "grafana", "trainer", "producer"}
LONG_RUNNING = {"kafka", "etcd", "minio", "milvus", "prometheus", "grafana", "trainer"}
CONFIG_IN_CONTAINER = "/etc/ebrflow/ebrflow.toml"
# The config sections and keys the trainer reads (ebrflow/config.py); the TOML must set at least these.
CONFIG_KEYS = {
    "kafka": {"bootstrap_servers", "topic", "group_id", "partitions", "security_protocol", "session_timeout_ms",
              "max_event_bytes"},
    "batch": {"max_events", "max_wait_ms"},
    "model": {"kind", "dim", "lr", "temperature", "steps_per_batch", "device"},
    "milvus": {"uri", "token", "collection_prefix", "flush_interval_s"},
    "metrics": {"host", "port", "recall_k", "cold_start_max_events"},
    "run": {"data_dir", "checkpoint_every_batches"},
}  # fmt: skip
OPTIONAL_KAFKA_KEYS = {"sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return tomllib.loads(TOML.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whether written as a mapping or a list of KEY=VALUE."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def container_ports(service: dict[str, Any]) -> set[int]:
    """Container-side ports a service publishes ("host:container", "container", or long syntax)."""
    ports = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, container target) of each volume entry, short or long syntax."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append((str(entry.get("source", "")), str(entry["target"])))
        else:
            source, target = str(entry).split(":")[:2]
            out.append((source, target))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~", "$"))


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def mount_source(service: dict[str, Any], target: str) -> Path:
    """The repo path bind-mounted at ``target`` in ``service`` (fails the test when none is)."""
    for source, mounted in mounts(service):
        if mounted == target and is_bind(source):
            return (ROOT / source).resolve()
    pytest.fail(f"nothing is bind-mounted at {target}")


def compose_errors(text: str) -> str | None:
    """Why ``compose-spec`` rejects a Compose file (None when it validates against the whole specification)."""
    try:
        compose_spec.PyCompose.from_yaml(text).to_spec()
    except ValueError as exc:
        return str(exc)
    return None


def test_compose_file_is_valid_compose(services: dict[str, Any]) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert compose_errors(text) is None
    parsed = compose_spec.PyCompose.from_yaml(text)
    assert parsed.name == "ebrflow" and sorted(parsed.services) == sorted(services)


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("    restart: on-failure\n", "    restart: on-failure\n    colour: red\n", "`colour`"),
        ("restart: on-failure", "restart: sometimes", "services.producer.restart"),
        ("condition: service_healthy", "condition: service_sleepy", "service_sleepy"),
        ("      interval: 10s", "      interval: soon", "healthcheck.interval"),
        ('"127.0.0.1:9090:9090"', '"127.0.0.1:ninety:9090"', "services.prometheus.ports"),
    ],
    ids=["unknown-service-key", "bad-restart", "bad-condition", "bad-duration", "bad-port"],
)
def test_the_validator_rejects_a_broken_copy(old: str, new: str, error: str) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert old in text
    reason = compose_errors(text.replace(old, new, 1))
    assert reason is not None and error in reason, reason


def test_required_services_exist(services: dict[str, Any]) -> None:
    missing = REQUIRED_SERVICES - services.keys()
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(LONG_RUNNING))
def test_long_running_services_have_healthchecks(services: dict[str, Any], name: str) -> None:
    check = services[name].get("healthcheck")
    assert check, f"{name} has no healthcheck"
    assert not check.get("disable", False)
    test = check["test"]
    assert test and (test if isinstance(test, str) else test[0]) not in ("NONE",), f"{name}: empty healthcheck"


def test_every_dependency_condition_is_valid(services: dict[str, Any]) -> None:
    valid = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec["condition"] in valid, f"{name} → {dep}: {spec}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy but it has no check"


def test_trainer_waits_for_healthy_kafka_and_milvus(services: dict[str, Any]) -> None:
    deps = services["trainer"]["depends_on"]
    assert deps["kafka"]["condition"] == "service_healthy"
    assert deps["milvus"]["condition"] == "service_healthy"
    milvus_deps = services["milvus"]["depends_on"]
    assert {d: milvus_deps[d]["condition"] for d in ("etcd", "minio")} == {
        "etcd": "service_healthy",
        "minio": "service_healthy",
    }
    assert services["producer"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_trainer_runs_with_the_mounted_config(services: dict[str, Any]) -> None:
    trainer = services["trainer"]
    assert trainer["command"] == ["ebrflow", "run", "--config", CONFIG_IN_CONTAINER]
    assert mount_source(trainer, CONFIG_IN_CONTAINER) == TOML.resolve()
    assert trainer["build"]["context"] == "."
    assert (ROOT / trainer["build"].get("dockerfile", "Dockerfile")).is_file()


def test_scaled_trainer_runs_two_ranks_apart_from_the_trainer(services: dict[str, Any]) -> None:
    ranks = services["trainer-ranks"]
    assert ranks["command"][-2:] == ["--ranks", "2"] and CONFIG_IN_CONTAINER in ranks["command"]
    assert ranks["profiles"] == ["ranks"]  # opt-in: never a second model in the default stack
    env = environment(ranks)
    assert env["EBRFLOW_KAFKA__GROUP_ID"] != "ebrflow-trainer" and env["EBRFLOW_MILVUS__COLLECTION_PREFIX"] != "ebrflow"
    assert {d: c["condition"] for d, c in ranks["depends_on"].items()} == {
        "kafka": "service_healthy",
        "milvus": "service_healthy",
    }


def test_producer_replays_synthetic_events_into_the_same_kafka(services: dict[str, Any]) -> None:
    producer = services["producer"]
    command = producer["command"]
    assert command[:2] == ["ebrflow", "replay"]
    assert "--synthetic" in command
    assert command[command.index("--rate") + 1] == "500"
    assert command[command.index("--config") + 1] == CONFIG_IN_CONTAINER
    assert mount_source(producer, CONFIG_IN_CONTAINER) == TOML.resolve()
    assert producer["image"] == services["trainer"]["image"]


def test_toml_has_every_config_section_and_key(config: dict[str, Any]) -> None:
    for section, keys in CONFIG_KEYS.items():
        assert section in config, f"[{section}] missing from {TOML.name}"
        assert keys <= config[section].keys(), f"[{section}] lacks {sorted(keys - config[section].keys())}"
        allowed = keys | (OPTIONAL_KAFKA_KEYS if section == "kafka" else set())
        assert config[section].keys() <= allowed, f"[{section}] has unknown {sorted(config[section].keys() - allowed)}"
    assert config["metrics"]["host"] == "0.0.0.0", "inside a container the exporter must bind all interfaces"


def test_environment_overrides_name_real_keys(services: dict[str, Any]) -> None:
    pattern = re.compile(r"EBRFLOW_([A-Z]+)__([A-Z_]+)")
    for name, service in services.items():
        for var in environment(service):
            if not var.startswith("EBRFLOW_"):
                continue
            match = pattern.fullmatch(var)
            assert match, f"{name}: {var} is not EBRFLOW_<SECTION>__<KEY>"
            section, key = match.group(1).lower(), match.group(2).lower()
            known = CONFIG_KEYS.get(section, set()) | (OPTIONAL_KAFKA_KEYS if section == "kafka" else set())
            assert key in known, f"{name}: {var} names no config key"


def test_metrics_port_agrees_everywhere(
    services: dict[str, Any], config: dict[str, Any], prometheus: dict[str, Any]
) -> None:
    port = config["metrics"]["port"]
    job = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "ebrflow")
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"trainer:{port}"], "Prometheus must scrape the trainer service on [metrics] port"
    assert port in container_ports(services["trainer"])
    assert f"127.0.0.1:{port}/metrics" in json.dumps(services["trainer"]["healthcheck"]["test"])
    assert re.search(rf"^EXPOSE\s+{port}\b", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)


def test_prometheus_scrapes_milvus_metrics(services: dict[str, Any], prometheus: dict[str, Any]) -> None:
    # Milvus standalone serves /healthz and its own /metrics on 9091 (the port its healthcheck probes).
    job = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "milvus")
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["milvus:9091"] and job.get("metrics_path", "/metrics") == "/metrics"
    assert "localhost:9091/healthz" in json.dumps(services["milvus"]["healthcheck"]["test"])
    assert 9091 in container_ports(services["milvus"])


def test_kafka_bootstrap_matches_the_kafka_listener(services: dict[str, Any], config: dict[str, Any]) -> None:
    host, port = host_port(config["kafka"]["bootstrap_servers"])
    assert host == "kafka" and host in services
    env = environment(services["kafka"])
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert f"{host}:{port}" in advertised.values(), "the bootstrap address must be an advertised listener"
    listener = next(name for name, address in advertised.items() if address == f"{host}:{port}")
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    assert host_port(listeners[listener])[1] == port, "the advertised port must be the port the broker listens on"
    assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"], "KRaft combined"
    assert int(env["KAFKA_NUM_PARTITIONS"]) == config["kafka"]["partitions"]
    assert services["kafka"]["image"].startswith("apache/kafka:")


def test_milvus_uri_matches_the_milvus_service(services: dict[str, Any], config: dict[str, Any]) -> None:
    uri = urlparse(config["milvus"]["uri"])
    assert uri.scheme in ("http", "https")
    assert uri.hostname == "milvus" and uri.hostname in services
    assert uri.port == 19530 and uri.port in container_ports(services["milvus"])
    env = environment(services["milvus"])
    assert host_port(env["ETCD_ENDPOINTS"])[0] == "etcd"
    assert host_port(env["MINIO_ADDRESS"])[0] == "minio"


def test_prometheus_rule_files_are_mounted_beside_its_config(
    services: dict[str, Any], prometheus: dict[str, Any]
) -> None:
    service = services["prometheus"]
    config_target = next(target for source, target in mounts(service) if source.endswith("prometheus.yml"))
    assert f"--config.file={config_target}" in service["command"]
    assert mount_source(service, config_target) == PROMETHEUS.resolve()
    for rule_file in prometheus["rule_files"]:
        in_container = str(Path(config_target).parent / rule_file)
        assert mount_source(service, in_container) == (PROMETHEUS.parent / rule_file).resolve()


def test_every_bind_mount_exists_in_the_repo(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for source, _target in mounts(service):
            if is_bind(source):
                assert source.startswith("./"), f"{name}: mount {source} should be relative to the repo"
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_named_volumes_are_declared_and_used(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = {source for service in services.values() for source, _ in mounts(service) if not is_bind(source)}
    assert used <= declared, f"undeclared volumes: {sorted(used - declared)}"
    assert declared <= used, f"declared but unused volumes: {sorted(declared - used)}"


def test_grafana_provisioning_points_at_the_mounted_dashboards(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    assert mount_source(grafana, "/etc/grafana/provisioning") == (ROOT / "ops/grafana/provisioning").resolve()
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text(encoding="utf-8"))["providers"]
    assert providers, "no dashboard provider"
    for provider in providers:
        assert provider["type"] == "file"
        path = provider["options"]["path"]
        assert mount_source(grafana, path) == DASHBOARD.parent.resolve()
    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        folder = providers[0]["options"]["path"]
        assert home.startswith(folder + "/") and (DASHBOARD.parent / home[len(folder) + 1 :]).is_file()


def test_grafana_datasource_is_the_stack_prometheus(services: dict[str, Any], prometheus: dict[str, Any]) -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    (source,) = [d for d in datasources if d["type"] == "prometheus"]
    url = urlparse(source["url"])
    assert url.hostname == "prometheus" and url.hostname in services
    assert url.port in container_ports(services["prometheus"])
    assert source["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]

    # The dashboard's ${datasource} variable (type datasource, query prometheus) defaults to the default datasource
    # of that type: the provisioned one must be it, and the only Prometheus, so the file needs no uid.
    assert source["isDefault"] is True
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == source["type"] and variable["name"] == "datasource"
    assert source["uid"] not in DASHBOARD.read_text(encoding="utf-8"), "the dashboard must not hard-code the uid"


def test_dockerfile_builds_the_package_on_cpu_torch() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"^ARG TORCH_SPEC=torch==2\.13\.0$", text, re.MULTILINE)
    assert "download.pytorch.org/whl/cpu" in text
    runs = re.findall(r"^RUN\s+(.+)$", text, re.MULTILINE)
    torch_at = next(i for i, run in enumerate(runs) if "${TORCH_SPEC}" in run and "--index-url" in run)
    package_at = next(i for i, run in enumerate(runs) if re.search(r'pip install "\.\[train\]"(\s|$)', run))
    assert torch_at < package_at, "torch must be installed (CPU index) before the package"
    for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE):
        *sources, _dest = line.split()
        for source in sources:
            if not any(ch in source for ch in "*?["):
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_published_ports_bind_loopback_and_no_default_credentials(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for entry in service.get("ports", []):
            assert str(entry).startswith("127.0.0.1:"), f"{name} publishes {entry} on every interface"
        for key, value in environment(service).items():
            value = str(value)
            assert value not in {"admin", "minioadmin"}, f"{name}: {key} has a default credential"
            if any(word in key for word in ("PASSWORD", "SECRET", "ROOT_USER")):
                assert value.startswith("${") and ":?" in value, f"{name}: {key} must come from a required variable"
    assert environment(services["grafana"]).get("GF_AUTH_ANONYMOUS_ENABLED") == "false"
