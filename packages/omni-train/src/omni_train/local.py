"""Running a training on this machine: N local processes (gloo on CPU, nccl on GPU), or under torchrun."""

from __future__ import annotations

import glob
import logging
import os
import subprocess
from typing import Any

from omni_train.config import ConfigError, TrainConfig

log = logging.getLogger("omni_train")


def _rank_entry(config: dict[str, Any]) -> dict[str, Any]:
    from omni_train.trainer import train

    return train(TrainConfig.model_validate(config))


def _source_paths(cfg: TrainConfig) -> list[str]:
    paths = []
    for s in [*cfg.data.sources, *cfg.data.eval_sources]:
        p = s.get("paths")
        paths += [p] if isinstance(p, str) else list(p or [])
    return paths


def prepare_data(cfg: TrainConfig) -> None:
    """Run `data.prepare` when some source pattern matches no file (e.g. the quickstart's generator)."""
    import braceexpand

    missing = [p for p in _source_paths(cfg) if not any(glob.glob(x) for x in braceexpand.braceexpand(p))]
    if not missing:
        return
    if not cfg.data.prepare:
        raise ConfigError(f"data.sources match no files: {missing} (and data.prepare is not set)")
    log.info("data missing (%s): running %s", missing[0], cfg.data.prepare)
    subprocess.run(cfg.data.prepare, shell=True, check=True)


def run_local(cfg: TrainConfig, nproc: int | None = None) -> list[dict[str, Any]]:
    """Train in `nproc` local processes (default launcher.num_workers); returns each rank's summary."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is a rank
        return [_rank_entry(cfg.model_dump(mode="json"))]
    n = nproc or cfg.launcher.num_workers
    prepare_data(cfg)
    if n == 1:
        return [_rank_entry(cfg.model_dump(mode="json"))]
    from omni_dist.spawn import run_ranks

    threads = max(1, (os.cpu_count() or 1) // n)
    return run_ranks(
        _rank_entry,
        n,
        args=(cfg.model_dump(mode="json"),),
        timeout_s=cfg.launcher.timeout_s,
        threads_per_rank=threads,
        init_process_group=False,
    )
