"""Seeds on demand: at which numbers of seeds a study looks at its comparisons, and at which confidence level.

A study that adds seeds while a comparison is undetermined and stops once it is decided looks at the data several
times; a 95% interval at every look would claim a difference that is not there far more often than 5% of the time
(`tests/test_comparisons.py` measures it). `SequentialDesign` keeps the stated error rate with *alpha spending and
a union bound*:

- The looks are fixed in advance: n_1 < n_2 < ... < n_K seeds per cell (default 3, 5, 8; n_K is the cap).
- A spending function alpha(t), t = n_k / n_K the information fraction, says how much of the total error rate
  `alpha` may have been spent by look k. Look k uses a two-sided interval at level 1 - (alpha(t_k) -
  alpha(t_{k-1})), so the levels' error rates add up to alpha(1) = alpha.
- Union bound: whatever the dependence between looks, P(some look's interval misses the true difference) <= the
  sum of the looks' error rates = alpha. A wrong `better`/`worse` (true difference 0) or a wrong `equivalent`
  (true difference outside the tolerance) needs an interval that misses the truth, so either happens with
  probability <= alpha over the whole sequence, however early it stops. (Bonferroni is conservative: the looks are
  correlated, so the real rate is lower; the simulation test shows how much.)

Why this rather than exact group-sequential boundaries or anytime-valid confidence sequences: exact boundaries
for t statistics with a few seeds need the joint law of correlated t's with 2..7 degrees of freedom (numerical
integration, and the look sizes must be known exactly); confidence sequences are valid at any n but are built
for large n and are much wider at n <= 8. The union bound needs only that each look's t-interval is valid, and
O'Brien-Fleming-like spending (Lan and DeMets 1983: alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t))) keeps almost
all of alpha for the cap: with looks 3, 5, 8 the levels are 99.86%, 98.8% and 96.3%, so a comparison that runs
to the cap pays little against a fixed 95% study, and early looks decide only large effects. `pocock` spending
(alpha log(1 + (e - 1) t)) spends more early (97.5%, 98.8%, 98.6%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import stats

__all__ = ["SequentialDesign", "FIXED_LEVEL"]

FIXED_LEVEL = 0.95
"""The level of a study whose number of seeds is fixed in advance (`--seeds N`): one look, the plain 95%."""


def _obrien_fleming(t: float, alpha: float) -> float:
    return 2.0 - 2.0 * float(stats.norm.cdf(stats.norm.ppf(1 - alpha / 2) / math.sqrt(t)))


def _pocock(t: float, alpha: float) -> float:
    return alpha * math.log(1 + (math.e - 1) * t)


SPENDING = {"obrien_fleming": _obrien_fleming, "pocock": _pocock}


@dataclass(frozen=True)
class SequentialDesign:
    """When a study looks at its comparisons (seeds per cell) and the confidence level of each look."""

    looks: tuple[int, ...] = (3, 5, 8)
    """Seeds per cell at each look, increasing; the last is the cap (no cell gets more)."""
    alpha: float = 0.05
    """The error rate over all looks: P(a wrong `better`/`worse`/`equivalent`) <= alpha per comparison."""
    spending: str = "obrien_fleming"
    """How alpha is spent over the looks: 'obrien_fleming' (little early) or 'pocock' (more early)."""

    def __post_init__(self):
        looks = tuple(self.looks)
        if not looks or any(not isinstance(n, int) or isinstance(n, bool) for n in looks):
            raise ValueError(f"Invalid looks: {self.looks!r} (a non-empty tuple of ints)")
        if looks[0] < (2 if len(looks) > 1 else 1) or any(b <= a for a, b in zip(looks, looks[1:])):
            raise ValueError(f"Invalid looks: {looks} (increasing, the first at least 2 seeds; one look: at least 1)")
        if not 0 < self.alpha < 1:
            raise ValueError(f"Invalid alpha value: {self.alpha} (in (0, 1))")
        if self.spending not in SPENDING:
            raise ValueError(f"Invalid spending value: {self.spending!r} (one of {sorted(SPENDING)})")
        object.__setattr__(self, "looks", looks)

    @classmethod
    def fixed(cls, seeds: int) -> SequentialDesign:
        """One look at `seeds` seeds: the plain 95% interval of a fixed-n study (`--seeds N`)."""
        return cls(looks=(seeds,))

    @property
    def cap(self) -> int:
        return self.looks[-1]

    @cached_property
    def levels(self) -> tuple[float, ...]:
        """The two-sided confidence level of each look; their error rates sum to alpha."""
        spend = SPENDING[self.spending]
        spent = [0.0, *(spend(n / self.cap, self.alpha) for n in self.looks[:-1]), self.alpha]
        return tuple(1 - (b - a) for a, b in zip(spent, spent[1:]))

    def level_at(self, n):
        """The level of the look that `n` seeds (an int or an array) fall in: the first look at or after n, the cap's
        beyond it."""
        k = np.minimum(np.searchsorted(self.looks, n), len(self.looks) - 1)
        return np.asarray(self.levels)[k]

    def next_look(self, n: int) -> int | None:
        """The number of seeds per cell of the next look after `n` seeds, None at (or past) the cap."""
        return next((look for look in self.looks if look > n), None)

    def describe(self) -> str:
        """'looks at 3, 5, 8 seeds per cell at levels 99.9%, 98.8%, 96.3% (O'Brien-Fleming alpha spending, 5% error
        rate overall)'; a one-look design: '3 seeds per cell, 95% intervals'."""
        if len(self.looks) == 1:
            return f"{self.looks[0]} seeds per cell, {100 * self.levels[0]:g}% intervals"
        levels = ", ".join(f"{100 * v:.3g}%" for v in self.levels)
        name = {"obrien_fleming": "O'Brien-Fleming", "pocock": "Pocock"}[self.spending]
        return (
            f"looks at {', '.join(map(str, self.looks))} seeds per cell at levels {levels} ({name} alpha spending, "
            f"{100 * self.alpha:g}% error rate overall)"
        )
