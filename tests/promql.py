"""PromQL helpers for tests: the dashboard's queries, the metric names in a query, and a real Prometheus.

``dashboard_queries`` pulls every PromQL expression out of the Grafana dashboard JSON (Grafana's
``$__rate_interval``-style macros and the dashboard's ``$job``/``$instance`` variables replaced, so each is plain
PromQL), ``metric_names`` lists the series a query reads (parsed by ``promql-parser``, the Python binding of
the Rust PromQL parser), and ``PrometheusServer`` runs the real ``prometheus`` binary against one scrape target so the
queries can be checked against live series::

    with PrometheusServer("127.0.0.1:9464") as prom:
        prom.wait_for_scrapes(2)
        for title, expr in dashboard_queries(DASHBOARD):
            assert prom.query(expr), title
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import promql_parser
from prometheus_client.registry import Collector

OPS_DIR = Path(__file__).resolve().parents[1] / "ops"
DASHBOARD = OPS_DIR / "grafana" / "dashboards" / "ebrflow.json"
ALERT_RULES = OPS_DIR / "prometheus" / "alerts.yml"
# The dashboard's own template variables, at their "All" value (every job and instance).
DASHBOARD_VARIABLES = {"$job": ".*", "${job}": ".*", "$instance": ".*", "${instance}": ".*"}


def grafana_macros(rate_interval: str = "1m", interval: str = "15s", range_: str = "1h") -> dict[str, str]:
    """Grafana's template macros mapped to concrete durations, longest name first.

    >>> grafana_macros()["$__rate_interval"]
    '1m'
    """
    seconds = str(_duration_ms(range_) // 1000)
    macros = {
        "$__rate_interval": rate_interval,
        "${__rate_interval}": rate_interval,
        "$__interval_ms": str(_duration_ms(interval)),
        "$__interval": interval,
        "${__interval}": interval,
        "$__range_s": seconds,
        "$__range": range_,
        "${__range}": range_,
    }
    return dict(sorted(macros.items(), key=lambda kv: -len(kv[0])))


def _duration_ms(duration: str) -> int:
    """A single-unit Prometheus duration such as ``15s`` or ``1m`` in milliseconds."""
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", duration)
    if not match:
        raise ValueError(f"unsupported duration {duration!r}")
    return int(match.group(1)) * units[match.group(2)]


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def dashboard_queries(
    path: str | Path = DASHBOARD, *, rate_interval: str = "1m", variables: bool = True
) -> list[tuple[str, str]]:
    """Every PromQL expression in a Grafana dashboard as ``(panel title, expr)``, in panel order.

    Grafana macros (``$__rate_interval``, ``$__interval``, ``$__range``) are replaced by concrete durations
    (``rate_interval`` for the first) and ``$job``/``$instance`` by ``.*`` (their "All" value), so each
    returned expression is plain PromQL that Prometheus accepts (``variables=False`` keeps ``$job``/``$instance``:
    they sit in label matcher strings, so the expression still parses).
    Hidden targets are included; targets without an ``expr`` (other datasources) are skipped.
    """
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    macros = {**grafana_macros(rate_interval=rate_interval), **(DASHBOARD_VARIABLES if variables else {})}
    macros = dict(sorted(macros.items(), key=lambda kv: -len(kv[0])))
    queries: list[tuple[str, str]] = []
    for panel in _walk_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr:
                continue
            for macro, value in macros.items():
                expr = expr.replace(macro, value)
            queries.append((panel.get("title", ""), expr))
    return queries


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects, from its syntax tree (``promql-parser``).

    Selectors by ``{__name__=...}`` alone have no name and are not listed; invalid PromQL raises ``ValueError``.

    >>> sorted(metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{job="x"}[5m]))) / b offset 1h'))
    ['a_bucket', 'b']
    >>> sorted(metric_names('time() - max(ebrflow_last_publish_timestamp_seconds) > 1e3 and on (job) up == bool 1'))
    ['ebrflow_last_publish_timestamp_seconds', 'up']
    """
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """Each series selector of a PromQL expression: its metric name and its label matchers as ``label op value``.

    >>> selectors('rate(a_total{job=~"$job"}[5m]) / b')
    [('a_total', {'job =~ $job'}), ('b', set())]
    """
    ops = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}
    found: list[tuple[str, set[str]]] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {f"{m.name} {ops[str(m.op)]} {m.value}" for m in node.matchers.matchers}
            found.append((node.name or "", matchers))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


# Series names each metric type exposes, by suffix (prometheus_client with _created samples disabled).
_TYPE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


def exported_series(registry: Collector) -> dict[str, str]:
    """Every series name a registry exposes, mapped to its metric family name.

    Works from the families' types, so labelled metrics count even before any label value is used:
    a counter ``x`` exposes ``x_total``; a histogram ``h`` exposes ``h_bucket``, ``h_sum`` and ``h_count``.

    >>> from prometheus_client import CollectorRegistry, Counter, Histogram
    >>> r = CollectorRegistry()
    >>> _ = Counter("jobs", "Jobs.", ["queue"], registry=r)
    >>> _ = Histogram("wait_seconds", "Wait.", registry=r)
    >>> sorted(exported_series(r))
    ['jobs_total', 'wait_seconds_bucket', 'wait_seconds_count', 'wait_seconds_sum']
    """
    series: dict[str, str] = {}
    for family in registry.collect():
        for suffix in _TYPE_SUFFIXES.get(family.type, ("",)):
            series[family.name + suffix] = family.name
    return series


class PrometheusQueryError(RuntimeError):
    """Prometheus rejected a query (bad PromQL) or answered with an error status."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """The real ``prometheus`` binary on a free loopback port, scraping one target; a context manager.

    It writes a config (job ``job`` scraping ``target`` every ``scrape_interval``, rules from ``rule_files``
    evaluated at the same interval) and a storage dir into a temporary directory, starts the binary, and
    waits for ``/-/ready``. ``stop()`` (or leaving the ``with`` block) kills the process by its PID and
    removes the directory, whatever happened in between.
    """

    def __init__(
        self,
        target: str,
        *,
        job: str = "ebrflow",
        scrape_interval: str = "1s",
        rule_files: Sequence[str | Path] = (),
        binary: str | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.target = target
        self.job = job
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.binary = binary
        self.ready_timeout = ready_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:40123``."""
        if self.port is None:
            raise RuntimeError("PrometheusServer is not started")
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The Prometheus configuration this server runs with."""
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "scrape_interval": self.scrape_interval,
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [{"targets": [self.target]}],
                }
            ],
        }

    def start(self) -> PrometheusServer:
        """Start the binary and block until it answers ``/-/ready`` (raises, after cleaning up, if it can't)."""
        binary = self.binary or shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus binary not found (apt-get install prometheus)")
        self._workdir = Path(tempfile.mkdtemp(prefix="ebrflow-prometheus-"))
        config_path = self._workdir / "prometheus.yml"
        # JSON is valid YAML: no YAML dependency needed here.
        config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        try:
            for _attempt in range(3):  # the port could be taken between free_port() and bind
                self.port = free_port()
                self._log = open(self._workdir / "prometheus.log", "wb")  # closed by _terminate()
                self._proc = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={self._workdir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--log.level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                )
                if self._wait_ready():
                    return self
                self._terminate()
            raise RuntimeError(f"prometheus did not become ready:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> bool:
        """Poll ``/-/ready`` until it answers 200 (True), the process exits or the timeout passes (False)."""
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        return False

    def _terminate(self) -> None:
        """End the process by PID: SIGTERM, then SIGKILL after 10 s; close its log."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the process and delete its config and storage (safe to call twice)."""
        try:
            self._terminate()
        finally:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            self.port = None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log (empty once stopped)."""
        if self._workdir is None:
            return ""
        log = self._workdir / "prometheus.log"
        return log.read_text(encoding="utf-8", errors="replace")[-chars:] if log.exists() else ""

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET an API path and return its ``data``, raising ``PrometheusQueryError`` on an error status."""
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as err:  # 400/422/503 carry a JSON error body
            try:
                body = json.loads(err.read())
            except ValueError:
                raise PrometheusQueryError(f"{path}: HTTP {err.code}") from err
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{params or path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Evaluate an instant query (``/api/v1/query``) now or at unix time ``at``.

        Returns the result list: ``{"metric": {labels}, "value": [ts, "value"]}`` per series for a vector;
        a scalar or string result comes back as one such item with empty labels. Raises
        ``PrometheusQueryError`` if Prometheus rejects the expression.
        """
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        """The values of ``label`` on series matching ``match`` (what Grafana's ``label_values()`` asks)."""
        return list(self._get(f"/api/v1/label/{label}/values", {"match[]": match}))

    def scrapes(self) -> int:
        """How many scrapes of the target Prometheus has recorded (successful or not)."""
        result = self.query(f'count_over_time(up{{job="{self.job}"}}[1h])')
        return int(sum(float(item["value"][1]) for item in result))

    def wait_for_scrapes(self, count: int = 2, timeout: float = 30.0) -> None:
        """Block until at least ``count`` scrapes succeeded (``up == 1``); raise ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        expr = f'sum_over_time(up{{job="{self.job}"}}[1h])'
        while True:
            done = int(sum(float(item["value"][1]) for item in self.query(expr)))
            if done >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done}/{count} successful scrapes of {self.target} in {timeout} s")
            time.sleep(0.2)

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its state, health and last error (``/api/v1/rules``)."""
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]
