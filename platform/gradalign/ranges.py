"""A search range of one hyperparameter (pure: no Ray, no Optuna)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import ConfigError


@dataclass(frozen=True)
class Range:
    """A search range [low, high]; `log` samples log-uniformly (then low must be > 0)."""

    low: float
    high: float
    log: bool = False

    def check(self, name: str, integer: bool = False) -> None:
        """Raise `ConfigError` naming `name` unless this is a usable range."""
        if not (_finite(self.low) and _finite(self.high)):
            raise ConfigError(name, (self.low, self.high), "search range must be finite")
        if not self.low < self.high:
            raise ConfigError(name, (self.low, self.high), "empty search range: low must be < high")
        if self.log and self.low <= 0:
            raise ConfigError(name, self.low, "a log-uniform range needs low > 0")
        if integer and (self.low != int(self.low) or self.high != int(self.high)):
            raise ConfigError(name, (self.low, self.high), "integer parameter needs integer bounds")

    def to_json(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "log": self.log}

    @classmethod
    def from_json(cls, value: Any) -> Range:
        if isinstance(value, Range):
            return value
        if isinstance(value, dict):
            return cls(float(value["low"]), float(value["high"]), bool(value.get("log", False)))
        low, high, *log = value
        return cls(float(low), float(high), bool(log[0]) if log else False)

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "")


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
