"""Before any worker starts: can the shards of each source be read at all?

Only `os.stat` and `os.access` are used, never `open`: a FIFO or a file on a hung mount must not block
the rank here (its loader workers open the shards; those die with the rank). A source none of whose
shards can be read, or with more bad shards than `data.max_bad_shards` allows, stops every rank with
one error naming the source, the first paths (resolved) and why; fewer bad shards are reported and
counted by the samples they would have held when an `index.parquet` from the preprocessing job lies
beside them.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("omni_data")


@dataclass
class SourceHealth:
    name: str
    index: int  # position in data.sources
    shards: int
    bad: dict[str, str] = field(default_factory=dict)  # resolved path -> why it cannot be read
    lost_samples: int | None = None  # samples the bad shards held, per index.parquet (None: unknown)

    def report(self) -> dict:
        return {"shards": self.shards, "bad_shards": self.bad, "lost_samples": self.lost_samples}


def shard_problem(path: str) -> str | None:
    """Why `path` cannot be a readable shard, or None. Only metadata is read."""
    try:
        st = os.stat(path)
    except OSError as e:
        return e.strerror or type(e).__name__
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def check_sources(sources) -> list[SourceHealth]:
    """The health of each source's local shards (shards named by URL are not checked here)."""
    out = []
    for i, src in enumerate(sources):
        shards = src.shards()
        health = SourceHealth(src.name, i, len(shards))
        for shard in shards:
            if "://" in shard:
                continue
            problem = shard_problem(shard)
            if problem is not None:
                health.bad[os.path.abspath(shard)] = problem
        if health.bad:
            health.lost_samples = _indexed_samples(list(health.bad))
        out.append(health)
    return out


def judge(health: list[SourceHealth], max_bad_shards: float) -> str | None:
    """The error for sources that cannot train, or None."""
    for h in health:
        if not h.bad:
            continue
        where = f"data source {h.name!r} (data.sources[{h.index}])"
        if len(h.bad) == h.shards:
            return f"{where}: none of its {h.shards} shards can be read: {_first(h.bad)}"
        if len(h.bad) > max_bad_shards * h.shards:
            return (
                f"{where}: {len(h.bad)} of its {h.shards} shards cannot be read "
                f"(more than data.max_bad_shards={max_bad_shards:g} of them): {_first(h.bad)}"
            )
    return None


def warn(health: list[SourceHealth]) -> None:
    for h in health:
        if h.bad:
            lost = f", ~{h.lost_samples} samples per index.parquet" if h.lost_samples else ""
            log.warning(
                "data source %r: %d of %d shards cannot be read and are skipped%s: %s",
                h.name, len(h.bad), h.shards, lost, _first(h.bad),
            )  # fmt: skip


def _first(bad: dict[str, str], n: int = 3) -> str:
    items = [f"{path} ({why})" for path, why in list(bad.items())[:n]]
    more = f" and {len(bad) - n} more" if len(bad) > n else ""
    return ", ".join(items) + more + f" (relative paths resolve against {os.getcwd()})"


def _indexed_samples(paths: list[str]) -> int | None:
    """Samples of these shards per the `index.parquet` of their directories (None if there is none)."""
    import pyarrow.parquet as pq

    total, known = 0, False
    by_dir: dict[Path, list[str]] = {}
    for p in paths:
        by_dir.setdefault(Path(p).parent, []).append(Path(p).name)
    for directory, names in by_dir.items():
        index = directory / "index.parquet"
        if not index.is_file():
            continue
        try:
            counts = Counter(pq.read_table(index, columns=["shard"]).column("shard").to_pylist())
        except Exception as e:  # an unreadable index only loses the estimate
            log.warning("cannot read %s: %s", index, e)
            continue
        known = True
        total += sum(counts.get(name, 0) for name in names)
    return total if known else None


def merge_reports(reports: list[dict]) -> dict:
    """One account from every data-parallel rank's `OmniLoader.report()` (bad shards are a union; the
    samples they held are re-counted from index.parquet for the union)."""
    out = {"sources": [], "records_seen": 0, "skipped": Counter(), "dropped": 0, "truncated": 0}
    for r in reports:
        out["records_seen"] += r["records_seen"]
        out["skipped"].update(r["skipped"])
        out["dropped"] += r["dropped"]
        out["truncated"] += r["truncated"]
    for i, first in enumerate(reports[0]["sources"]):
        bad: dict[str, str] = {}
        for r in reports:
            bad.update(r["sources"][i]["bad_shards"])
        lost = _indexed_samples(list(bad)) if bad else None
        out["sources"].append({"shards": first["shards"], "bad_shards": bad, "lost_samples": lost})
    out["skipped"] = dict(out["skipped"])
    return out


def summary(report: dict) -> str:
    """One line for the end of a run."""
    bad = sum(len(s["bad_shards"]) for s in report["sources"])
    shards = sum(s["shards"] for s in report["sources"])
    lost = sum(s["lost_samples"] or 0 for s in report["sources"])
    skipped = sum(report["skipped"].values())
    parts = [f"{report['records_seen']} records read", f"{bad} of {shards} shards unreadable"]
    if lost:
        parts[-1] += f" (~{lost} samples per index.parquet)"
    parts.append(f"{skipped} samples skipped" + (f" ({report['skipped']})" if skipped else ""))
    parts.append(f"{report['dropped']} dropped and {report['truncated']} truncated for the budget")
    return "data: " + ", ".join(parts)
