"""Prometheus config and alert rules pass promtool, every alert is unit-tested both ways, and every series
named by an alert, a dashboard panel or the catalogue exists in ops/metrics.py."""

from __future__ import annotations

import doctest
import itertools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import tests.promql
from ebrflow.ops.metrics import PipelineMetrics
from tests.markdown import github_anchors
from tests.promql import dashboard_queries, exported_series, metric_names, selectors

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "ops" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERT_TESTS = PROM_DIR / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "ebrflow.json"
CATALOGUE = ROOT / "docs" / "metrics.md"
RUNBOOKS = ROOT / "docs" / "operations.md"  # the alerts' runbook_url target

EXPECTED_ALERTS = {
    "RecallDropped", "DriftDetected", "ConsumerLagGrowing", "NoPublish", "DLQRateHigh", "TrainerDown",
    "NonFiniteSteps", "PublishingHeld",
}  # fmt: skip
SEVERITIES = {"critical", "warning", "info"}
# Series Prometheus itself attaches to every scrape target.
SCRAPE_SERIES = {"up"}
# Panels the dashboard must keep (the brief's list), matched case-insensitively as substrings of titles.
REQUIRED_PANELS = [
    "throughput", "batch latency", "stage latency", "training loss", "per-task loss", "per-task weights",
    "recall@k", "ndcg@k", "consumer lag by partition", "freshness", "seconds since last publish", "model version",
    "indexed entities", "upsert latency", "dlq rate", "embedding shift", "neighbour jaccard", "centroid shift",
    "drift alarms", "non-finite steps",
]  # fmt: skip


@pytest.fixture(scope="module")
def promtool() -> str:
    """The promtool binary; skipped locally when absent, a failure in CI (which installs it)."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed; CI must `apt-get install prometheus`")
        pytest.skip("promtool not installed (apt-get install prometheus); CI runs these checks")
    return path


def run_promtool(promtool: str, *args: str | Path, cwd: Path | None = None) -> str:
    """Run promtool, fail the test with its output on a non-zero exit, return that output."""
    result = subprocess.run(
        [promtool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def known_series() -> dict[str, str]:
    return exported_series(PipelineMetrics().registry)


def test_promtool_check_config_resolves_rules_beside_the_config(promtool: str, tmp_path: Path) -> None:
    # Run from an unrelated directory: rule_files must resolve relative to prometheus.yml, not the cwd.
    output = run_promtool(promtool, "check", "config", CONFIG, cwd=tmp_path)
    assert "1 rule files found" in output
    assert f"{len(EXPECTED_ALERTS)} rules found" in output


def test_promtool_check_rules(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", ALERTS)
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in output


def test_promtool_unit_tests_pass(promtool: str, tmp_path: Path) -> None:
    output = run_promtool(promtool, "test", "rules", ALERT_TESTS, cwd=tmp_path)
    assert "SUCCESS" in output


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool parses recording rules offline: one rule per dashboard query.
    queries = dashboard_queries(DASHBOARD)
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_title, expr) in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    output = run_promtool(promtool, "check", "rules", path)
    assert f"{len(rules)} rules found" in output


def test_the_expected_alerts_are_defined() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) == EXPECTED_ALERTS


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_has_severity_and_text(rule: dict) -> None:
    assert rule["labels"]["severity"] in SEVERITIES
    assert rule["annotations"]["summary"].strip()
    assert len(rule["annotations"]["description"].strip()) > 40


def test_github_anchors_follow_githubs_rules() -> None:
    text = "# A Title\n## Runbook: TrainerDown\n```\n# not a heading\n```\n## Runbook: TrainerDown\n### `x_y` (z)!\n"
    assert github_anchors(text) == {"a-title", "runbook-trainerdown", "runbook-trainerdown-1", "x_y-z"}


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_links_its_runbook_section(rule: dict) -> None:
    url = rule["annotations"]["runbook_url"]
    assert url == f"{RUNBOOKS.relative_to(ROOT).as_posix()}#runbook-{rule['alert'].lower()}"
    path, anchor = url.split("#")
    assert anchor in github_anchors((ROOT / path).read_text(encoding="utf-8")), f"no heading in {path} for #{anchor}"


def test_runbook_sections_are_only_for_alerts_that_exist() -> None:
    runbooks = {a for a in github_anchors(RUNBOOKS.read_text(encoding="utf-8")) if a.startswith("runbook-")}
    assert runbooks == {f"runbook-{name.lower()}" for name in EXPECTED_ALERTS}


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert EXPECTED_ALERTS - fires == set(), "alerts without a firing case"
    assert EXPECTED_ALERTS - silent == set(), "alerts without a silent case"
    assert (fires | silent) <= EXPECTED_ALERTS, "tests for alerts that do not exist"


def test_promql_support_examples() -> None:
    # tests/promql.py is test support, outside the installed package that tests/test_doctests.py walks.
    result = doctest.testmod(tests.promql)
    assert result.attempted >= 4 and result.failed == 0


def test_metric_names_come_from_a_parse_tree() -> None:
    # Names inside strings, label matchers, grouping clauses and subqueries are not series; bad PromQL is an error.
    expr = 'sum by (job) (rate(a_total{job=~"b|c"}[5m:1m])) / on (job) group_left count(up{le="d"} @ 10) unless e'
    assert metric_names(expr) == {"a_total", "up", "e"}
    with pytest.raises(ValueError):
        metric_names("rate(a_total[5m]")


def test_known_series_account_for_type_suffixes() -> None:
    series = known_series()
    assert series["ebrflow_events_consumed_total"] == "ebrflow_events_consumed"
    assert "ebrflow_events_consumed" not in series  # a counter is only exposed as _total
    assert {"ebrflow_batch_duration_seconds_bucket", "ebrflow_batch_duration_seconds_sum",
            "ebrflow_batch_duration_seconds_count"} <= series.keys()  # fmt: skip
    assert "ebrflow_batch_duration_seconds" not in series
    assert "ebrflow_consumer_lag" in series  # labelled gauge, no label values used yet


def test_alert_expressions_only_use_catalogued_series() -> None:
    known = known_series().keys() | SCRAPE_SERIES
    unknown = {
        rule["alert"]: sorted(metric_names(rule["expr"]) - known)
        for rule in alert_rules()
        if metric_names(rule["expr"]) - known
    }
    assert not unknown, f"alert expressions use series not in ops/metrics.py: {unknown}"
    assert all(metric_names(rule["expr"]) for rule in alert_rules())


def test_dashboard_queries_only_use_catalogued_series() -> None:
    known = known_series().keys() | SCRAPE_SERIES
    queries = dashboard_queries(DASHBOARD)
    assert len(queries) >= len(REQUIRED_PANELS)
    unknown = {
        f"{title}: {expr}": sorted(metric_names(expr) - known) for title, expr in queries if metric_names(expr) - known
    }
    assert not unknown, f"dashboard queries use series not in ops/metrics.py: {unknown}"
    assert all(metric_names(expr) for _title, expr in queries), "a query that reads no series"


def test_dashboard_is_well_formed_and_has_the_required_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    data_panels = [panel for panel in panels if panel["type"] != "row"]
    assert {panel["type"] for panel in data_panels} <= {"timeseries", "stat"}
    for panel in data_panels:
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{panel['title']}: duplicate refIds"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the grid"
    titles = [panel["title"].lower() for panel in data_panels]
    assert len(titles) == len(set(titles)), "panel titles must be unique (tests report failures by title)"
    boxes = [(p["title"], p["gridPos"]) for p in panels]
    for (a, ga), (b, gb) in itertools.combinations(boxes, 2):
        overlap_x = ga["x"] < gb["x"] + gb["w"] and gb["x"] < ga["x"] + ga["w"]
        overlap_y = ga["y"] < gb["y"] + gb["h"] and gb["y"] < ga["y"] + ga["h"]
        assert not (overlap_x and overlap_y), f"panels {a!r} and {b!r} overlap"
    missing = [want for want in REQUIRED_PANELS if not any(want in title for title in titles)]
    assert not missing, f"dashboard lacks panels: {missing}"


def test_dashboard_takes_its_datasource_job_and_instance_from_variables() -> None:
    # File provisioning does not substitute __inputs, so the datasource is a `datasource` variable (the default
    # Prometheus); job and instance list what runs ebrflow (ebrflow_build_info), "All" by default.
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert "__inputs" not in dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name, query in (("job", "label_values(ebrflow_build_info, job)"),
                        ("instance", 'label_values(ebrflow_build_info{job=~"$job"}, instance)')):  # fmt: skip
        variable = variables[name]
        assert variable["type"] == "query" and variable["query"] == variable["definition"] == query
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        for source in [panel["datasource"], *(target["datasource"] for target in panel["targets"])]:
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_every_dashboard_selector_filters_job_and_instance() -> None:
    queries = dashboard_queries(DASHBOARD, variables=False)
    unfiltered = [
        f"{title}: {name}"
        for title, expr in queries
        for name, matchers in selectors(expr)
        if not {"job =~ $job", "instance =~ $instance"} <= matchers or any(m.startswith("job = ") for m in matchers)
    ]
    assert not unfiltered, f'selectors without job=~"$job", instance=~"$instance": {unfiltered}'
    assert len(queries) >= len(REQUIRED_PANELS)


def test_histogram_quantiles_read_bucket_series() -> None:
    # histogram_quantile over anything but a _bucket rate (grouped by le) is a silent mistake.
    for title, expr in dashboard_queries(DASHBOARD):
        for call in re.findall(r"histogram_quantile\((.*?)\)\)\)", expr, re.DOTALL):
            assert re.search(r"_bucket(\{[^}]*\})?\[", call), f"{title}: {expr}"
            assert re.search(r"by \((le|le, \w+)\)", call), f"{title}: {expr}"


def test_catalogue_documents_every_metric_and_no_other() -> None:
    text = CATALOGUE.read_text(encoding="utf-8")
    series = known_series()
    families = {family for family in series.values() if family.startswith("ebrflow_")}  # not process_*, python_*
    documented = set(re.findall(r"`(ebrflow_\w+)`", text))
    # A family is documented by its own name or by one of its series (e.g. `x_total`).
    missing = sorted(families - {series.get(name, name) for name in documented})
    assert not missing, f"docs/metrics.md does not document: {missing}"
    stale = sorted(documented - families - series.keys())
    assert not stale, f"docs/metrics.md documents series ops/metrics.py does not export: {stale}"
    for alert in EXPECTED_ALERTS:
        assert alert in text, f"docs/metrics.md does not mention alert {alert}"
