"""Bad-data accounting: skip, count by reason, log with shard and key, stop past a maximum rate."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger("omni_data")


class DataErrorRateExceeded(RuntimeError):
    """More bad samples than the configured maximum rate: the data (or its config) needs fixing."""


@dataclass
class ErrorCounts:
    """Records seen and skipped (by reason); JSON-able for the loader state and for metrics."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)

    def record_bad(self, reason: str, shard: str, key: str, detail: str) -> None:
        self.skipped[reason] += 1
        log.warning("skipping sample: %s (shard %s, key %r): %s", reason, shard, key, detail)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def state(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped)}

    @classmethod
    def from_state(cls, state: Mapping) -> ErrorCounts:
        return cls(int(state["seen"]), Counter({k: int(v) for k, v in state["skipped"].items()}))

    @classmethod
    def merged(cls, parts: Iterable[ErrorCounts]) -> ErrorCounts:
        out = cls()
        for p in parts:
            out.seen += p.seen
            out.skipped.update(p.skipped)
        return out

    def check(self, max_rate: float, min_seen: int) -> str | None:
        """The error message if the skip rate is over max_rate (judged after min_seen records)."""
        if self.seen < min_seen or self.total_skipped <= max_rate * self.seen:
            return None
        reasons = ", ".join(f"{r}={n}" for r, n in self.skipped.most_common())
        return (
            f"{self.total_skipped} of {self.seen} samples were unusable "
            f"({self.total_skipped / self.seen:.1%} > max_error_rate {max_rate:.1%}): {reasons}. "
            "The warnings above name each shard and key; fix the data or raise data.max_error_rate."
        )
