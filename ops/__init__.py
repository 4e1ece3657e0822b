"""Observation of the pipeline: Prometheus metrics, prequential recall, drift, dashboards and alert rules."""
