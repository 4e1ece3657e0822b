"""The trainer's exporter over real HTTP: ebrflow's series plus prometheus-client's process, GC and platform ones."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ebrflow.ops.metrics import PipelineMetrics


def scrape(port: int) -> dict[str, list]:
    """Every sample on ``/metrics``, by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_metrics_export_default_collectors_and_build_info() -> None:
    metrics = PipelineMetrics()
    metrics.set_build_info("1.2.3", "ssmtl", 16, 20)
    samples = scrape(metrics.serve(port=0))
    (cpu,) = samples["process_cpu_seconds_total"]
    assert cpu.value > 0
    assert samples["process_resident_memory_bytes"][0].value > 0
    assert {s.labels["generation"] for s in samples["python_gc_objects_collected_total"]} == {"0", "1", "2"}
    (info,) = samples["python_info"]
    assert info.labels["implementation"] == "CPython"
    (build,) = samples["ebrflow_build_info"]
    assert build.labels == {"version": "1.2.3", "model_kind": "ssmtl", "dim": "16", "k": "20"} and build.value == 1
    assert "ebrflow_events_trained_total" in samples


def test_each_registry_gets_its_own_collectors() -> None:
    # Two trainers in one process (tests, shadow benches) must not clash on duplicate collector registration.
    first, second = PipelineMetrics(), PipelineMetrics()
    assert first.registry.get_sample_value("process_cpu_seconds_total") > 0
    assert second.registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None
