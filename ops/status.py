"""A periodic status line from the running trainer, read from its metrics (their one owner), never recomputed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ebrflow.ops.metrics import PipelineMetrics

log = logging.getLogger(__name__)


class StatusLine:
    """Logs one INFO line every ``interval_s`` when the loop calls ``maybe_log``: events/s since the previous
    line, consumer lag (all partitions), the last micro-batch's prequential Recall@K, seconds since the last
    publish and events trained so far; the same figures are the record's ``extra`` fields (JSON logs)."""

    def __init__(
        self, metrics: PipelineMetrics, interval_s: float, k: int, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.k = k
        self._wall_clock = wall_clock
        self._last_at: float | None = None
        self._last_consumed = 0.0

    def maybe_log(self, now: float) -> None:
        """Log a line if ``interval_s`` (monotonic seconds) passed since the last; the first call only starts."""
        if self._last_at is None:
            self._last_at, self._last_consumed = now, self._sample("ebrflow_events_consumed_total") or 0.0
            return
        if now - self._last_at < self.interval_s:
            return
        fields = self.fields(now)
        log.info(
            "status: %.1f events/s, lag %s, Recall@%d %s, last publish %s s ago, %d events trained",
            fields["events_per_s"],
            _or_dash(fields["consumer_lag"], "{:.0f}"),
            self.k,
            _or_dash(fields["recall"], "{:.3f}"),
            _or_dash(fields["seconds_since_publish"], "{:.1f}"),
            fields["events_trained"],
            extra=fields,
        )

    def fields(self, now: float) -> dict[str, float | int | None]:
        """The status figures (None: not known yet) and, as a side effect, the start of the next rate window."""
        consumed = self._sample("ebrflow_events_consumed_total") or 0.0
        elapsed = now - self._last_at if self._last_at is not None else 0.0
        rate = (consumed - self._last_consumed) / elapsed if elapsed > 0 else 0.0
        self._last_at, self._last_consumed = now, consumed
        lags = [s.value for family in self.metrics.consumer_lag.collect() for s in family.samples]
        published = self._sample("ebrflow_last_publish_timestamp_seconds") or 0.0
        return {
            "events_per_s": round(rate, 2),
            "consumer_lag": int(sum(lags)) if lags else None,
            "recall": self._sample("ebrflow_prequential_recall", {"segment": "all"}),
            "k": self.k,
            "seconds_since_publish": round(self._wall_clock() - published, 3) if published else None,
            "events_trained": int(self._sample("ebrflow_events_trained_total") or 0),
        }

    def _sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels or {})


def _or_dash(value: float | None, fmt: str) -> str:
    """``value`` formatted, or ``-`` when it is not known yet."""
    return "-" if value is None else fmt.format(value)
