"""Running a training on this machine: N local processes (gloo on CPU, nccl on GPU), or under torchrun."""

from __future__ import annotations

import glob
import logging
import os
import subprocess
from collections.abc import Sequence
from typing import Any

from omni_train.config import ConfigError, TrainConfig

log = logging.getLogger("omni_train")


def _rank_entry(config: dict[str, Any]) -> dict[str, Any]:
    from omni_train.plugins import load_plugins
    from omni_train.trainer import train

    load_plugins(config["plugins"])  # a spawned rank is a fresh process: register the recipe's parts
    return train(TrainConfig.model_validate(config))


def _source_paths(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(recipe key, path pattern) of every train and eval source."""
    out = []
    for key in ("sources", "eval_sources"):
        for i, s in enumerate(getattr(cfg.data, key)):
            p = s.get("paths")
            out += [(f"data.{key}[{i}].paths", x) for x in ([p] if isinstance(p, str) else list(p or []))]
    return out


def _first_unmatched(cfg: TrainConfig) -> str | None:
    """'<key>: <pattern> (resolved <absolute path>)' of the first pattern matching no file, if any."""
    import braceexpand  # a dependency of webdataset

    missing = [
        (key, p)
        for key, p in _source_paths(cfg)
        if not any(glob.glob(x) for x in braceexpand.braceexpand(os.path.expanduser(p)))
    ]
    if not missing:
        return None
    key, p = missing[0]
    more = f" (and {len(missing) - 1} more pattern(s))" if len(missing) > 1 else ""
    return f"{key}: {p} (resolved {os.path.abspath(os.path.expanduser(p))}){more}"


def prepare_data(cfg: TrainConfig) -> None:
    """Run `data.prepare` when some source pattern matches no file (e.g. the quickstart's generator).

    Relative paths in `data` resolve against the working directory, and the command runs there too.
    A failing command, or sources that still match nothing afterwards, is a ConfigError of one line.
    """
    missing = _first_unmatched(cfg)
    if missing is None:
        return
    if not cfg.data.prepare:
        raise ConfigError(
            f"data sources match no files: {missing}; fix the paths or set data.prepare "
            "to a command that makes the data"
        )
    cwd = os.getcwd()
    log.info("data missing (%s): running data.prepare %r in %s", missing, cfg.data.prepare, cwd)
    rc = subprocess.run(cfg.data.prepare, shell=True, cwd=cwd).returncode
    if rc != 0:
        how = f"exit status {rc}" if rc > 0 else f"killed by signal {-rc}"
        raise ConfigError(
            f"data.prepare failed ({how}): {cfg.data.prepare!r}, run in {cwd}; its output is above"
        )
    missing = _first_unmatched(cfg)
    if missing is not None:
        raise ConfigError(
            f"data.prepare ({cfg.data.prepare!r}, run in {cwd}) succeeded but the data sources still "
            f"match no files: {missing}"
        )


def run_local(
    cfg: TrainConfig, nproc: int | None = None, preload: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Train in `nproc` local processes (default launcher.num_workers); returns each rank's summary.
    `preload`: fork the ranks from a server that imported these modules once (omni_dist.spawn.run_ranks;
    for callers that train many times in one process, e.g. tests)."""
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
        preload=preload,
    )
