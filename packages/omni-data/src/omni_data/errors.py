"""Bad-data accounting: skip, count by reason, log with shard and key, stop past a maximum rate.

Samples and shards are counted apart: a record that does not parse is a skipped sample; a shard that
cannot be opened or read on is a bad shard (path -> reason), judged against `data.max_bad_shards`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger("omni_data")


class DataErrorRateExceeded(RuntimeError):
    """More bad samples than the configured maximum rate: the data (or its config) needs fixing."""


class DataUnreadable(RuntimeError):
    """A source yields nothing usable (every shard missing or unreadable, or no sample parses), or more
    of its shards are bad than data.max_bad_shards allows."""


# Reasons of the error record that ends a shard (nothing follows it in that read): a bad shard, not a
# bad sample.
SHARD_REASONS = frozenset({"shard_open", "shard_read"})


@dataclass
class ErrorCounts:
    """Records seen and skipped (by reason); JSON-able for the loader state and for metrics."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    bad_shards: dict[str, str] = field(default_factory=dict)  # shard -> "reason: detail"

    def record_bad(self, reason: str, shard: str, key: str, detail: str) -> None:
        if reason in SHARD_REASONS:
            self.bad_shards.setdefault(shard, f"{reason}: {detail}")
            log.warning("skipping shard %s: %s: %s", shard, reason, detail)
            return
        self.skipped[reason] += 1
        log.warning("skipping sample: %s (shard %s, key %r): %s", reason, shard, key, detail)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def state(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped), "bad_shards": dict(self.bad_shards)}

    @classmethod
    def from_state(cls, state: Mapping) -> ErrorCounts:
        skipped = Counter({k: int(v) for k, v in state["skipped"].items()})
        return cls(int(state["seen"]), skipped, dict(state.get("bad_shards", {})))

    @classmethod
    def merged(cls, parts: Iterable[ErrorCounts]) -> ErrorCounts:
        out = cls()
        for p in parts:
            out.seen += p.seen
            out.skipped.update(p.skipped)
            out.bad_shards.update(p.bad_shards)
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
