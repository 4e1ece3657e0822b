"""Lag reporting: records behind the end of each held partition, measured on the consumer thread now and then."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ebrflow.stream.policy import Policy

if TYPE_CHECKING:
    from ebrflow.stream.pipeline import Pipeline


class LagReport(Policy):
    """Every ``interval_s`` asks the source for the lag per partition and hands it to ``observer.on_lag``.

    Lag from the broker's end offsets (too low on Tansu, whose end offsets are wrong; see FACTS)."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last = float("-inf")

    def on_tick(self, loop: Pipeline, now: float) -> None:
        """Request a measurement when one is due (it runs between two polls)."""
        if now - self._last >= self.interval_s:
            self._last = now
            loop.source.lag(loop.observer.on_lag)
