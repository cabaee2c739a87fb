"""The preprocessing job on Ray Data.

The driver reads the manifests (text and paths only), plans shards deterministically (input order,
`shard_samples` per shard and about `shard_bytes`), skips shards a previous run finished, and maps the
rest over Ray Data tasks (`write_shard`, `cpus_per_task` / `memory_per_task` each). It then merges the
per-shard index and error parts into `index.parquet` and `errors.jsonl` and returns the summary.
Ray is an embedded local cluster unless `ray.address` or RAY_ADDRESS names one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from omni_data.preprocess.manifest import read_rows
from omni_data.preprocess.shard_writer import (
    INDEX_SCHEMA,
    errors_part,
    index_part,
    load_factory,
    shard_name,
    write_shard,
)
from omni_data.preprocess.spec import PreprocessSpec
from omni_data.ray_cluster import connect, import_ray

log = logging.getLogger("omni_data")


@dataclass
class Summary:
    shards: int = 0
    written: int = 0
    skipped: int = 0  # finished by an earlier run
    samples: int = 0
    errors: Counter = field(default_factory=Counter)
    bytes: int = 0
    write_seconds: float = 0.0  # the Ray Data map (cluster start excluded)

    def text(self) -> str:
        lines = [
            f"shards: {self.shards} ({self.written} written, {self.skipped} already done)",
            f"samples: {self.samples}",
            f"bytes: {self.bytes}",
        ]
        lines.append("errors: " + (", ".join(f"{r}={n}" for r, n in self.errors.most_common()) or "none"))
        return "\n".join(lines)


def plan_shards(spec: PreprocessSpec) -> list[list[dict[str, Any]]]:
    shards: list[list[dict[str, Any]]] = [[]]
    size = 0
    for inp in spec.inputs:
        for row in read_rows(inp):
            full = len(shards[-1]) >= spec.shard_samples or (
                spec.shard_bytes is not None and shards[-1] and size + row["size"] > spec.shard_bytes
            )
            if full:
                shards.append([])
                size = 0
            shards[-1].append(row)
            size += row["size"]
    return [s for s in shards if s]


class _ShardTask:
    """A Ray Data actor: builds the processor once (seconds: tokenizer, model processors), then shards."""

    def __init__(self, out_dir: str, factory: str | None, options: dict):
        self.out_dir = out_dir
        self.processor = load_factory(factory)(**options) if factory else None

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return write_shard(int(item["shard"]), json.loads(item["rows"]), self.out_dir, self.processor)


def run_preprocess(spec: PreprocessSpec) -> Summary:
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(spec)
    todo = [
        i
        for i in range(len(shards))
        if not (index_part(out, i).exists() and (out / f"{shard_name(i)}.tar").exists())
    ]
    summary = Summary(shards=len(shards), skipped=len(shards) - len(todo), written=len(todo))
    log.info("preprocess: %d shards planned, %d to write", len(shards), len(todo))
    if todo:
        ray = import_ray()
        started = connect(spec.ray.address, spec.ray.num_cpus)
        try:
            items = [{"shard": i, "rows": json.dumps(shards[i])} for i in todo]
            remote = {"num_cpus": spec.ray.cpus_per_task}
            if spec.ray.memory_per_task:
                remote["memory"] = spec.ray.memory_per_task
            factory = spec.processor.factory if spec.processor else None
            options = dict(spec.processor.options) if spec.processor else {}
            workers = int(ray.cluster_resources().get("CPU", 1) // spec.ray.cpus_per_task)
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
                _ShardTask,
                fn_constructor_kwargs={"out_dir": str(out), "factory": factory, "options": options},
                compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(items)))),
                **remote,
            )
            t0 = time.perf_counter()
            ds.take_all()
            summary.write_seconds = time.perf_counter() - t0
        finally:
            if started:
                ray.shutdown()
    _merge(out, len(shards), summary)
    return summary


def _merge(out: Path, n: int, summary: Summary) -> None:
    tables, errors = [], []
    for i in range(n):
        tables.append(pq.read_table(index_part(out, i)))
        errors += [json.loads(line) for line in errors_part(out, i).read_text().splitlines()]
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    pq.write_table(table, out / "index.parquet.tmp")
    os.replace(out / "index.parquet.tmp", out / "index.parquet")
    (out / "errors.jsonl").write_text("".join(json.dumps(e) + "\n" for e in errors))
    summary.samples = table.num_rows
    summary.bytes = sum(p.stat().st_size for p in out.glob("shard-*.tar"))
    summary.errors = Counter(e["reason"] for e in errors)
