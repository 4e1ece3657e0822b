"""Benchmark suites for ebrflow: ``python -m bench.<suite>`` writes bench/results/<suite>.{json,md,png}."""
