"""Which evaluations a trial reports to Tune (or to Ray Train, which forwards rank 0's reports to Tune).

Every evaluation is saved (the trial's state) and recorded (its metrics history, `gradalign.ray_adapter.records`)
whether or not it is reported: the record, not Tune's result stream, is what the results table reads. Reports are
what Tune's scheduler and progress output need, and each costs a round trip: a few milliseconds in process, and up
to Ray Train's controller poll interval (2 s) for a Train run, whose report queue holds one result. So a trial reports
the last evaluation, the first evaluation at or past each of ASHA's rungs (the scheduler decides there, on the same
evaluation it would see with a report at every evaluation), and otherwise at most one evaluation every
`interval_s` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence


class ReportSchedule:
    """Decides, evaluation by evaluation, whether to report it. `interval_s=0` reports every evaluation."""

    def __init__(self, interval_s: float, rungs: Sequence[float] = (), clock: Callable[[], float] = time.monotonic):
        if not interval_s >= 0:
            raise ValueError(f"report interval must be >= 0 seconds, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._rungs = sorted(float(r) for r in rungs)
        self._clock = clock
        self._last = clock()
        self._passed = 0

    def restored(self, metrics: Mapping) -> None:
        """The trial resumed at `metrics` (and reports it again): the rungs up to it count as reported."""
        self._pass_rungs(float(metrics["epochs"]))
        self._last = self._clock()

    def due(self, metrics: Mapping, last: bool) -> bool:
        """Whether to report `metrics`; `last`: the trial ends after this evaluation (budget spent, or diverged)."""
        now = self._clock()
        at_rung = self._pass_rungs(float(metrics["epochs"]))
        if last or at_rung or now - self._last >= self.interval_s:
            self._last = now
            return True
        return False

    def _pass_rungs(self, epochs: float) -> bool:
        passed = self._passed
        while self._passed < len(self._rungs) and epochs >= self._rungs[self._passed]:
            self._passed += 1
        return self._passed > passed
