"""The multi-process harness every distributed test uses.

`run_ranks(fn, n, ...)` spawns n CPU ranks joined by gloo, runs the module-level function `fn` in each
(one intra-op thread per rank), and returns the per-rank results in rank order. A rank that raises,
dies or hangs fails the test within `timeout_s` with that rank's traceback or Python stacks.
Ranks fork from a forkserver that imported torch and transformers once (PRELOAD); a spawn still costs a
rendezvous and the test module's imports: put several checks into one spawn. `run_checks(n, {name:
(fn, args)})` runs each named check in turn on the same n ranks and returns a `Checks`; a check that
raised re-raises (with its ranks' tracebacks) only where a test reads its result, so the other checks of
the spawn still pass.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from omni_dist.spawn import RankFailedError
from omni_dist.spawn import run_ranks as _run_ranks

__all__ = ["Checks", "RankFailedError", "run_checks", "run_ranks"]

DEFAULT_TIMEOUT_S = float(os.environ.get("OMNI_TEST_RANK_TIMEOUT", "240"))
# What every rank imports, imported once by a forkserver for the whole session (omni_dist.spawn): a spawn
# then costs well under a second instead of ~5 s of imports per rank. Calls with `env` spawn fresh ranks.
PRELOAD = ("torch", "torch.distributed.tensor", "transformers", "omni_dist.parallelize", "omni_models.config")


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    init_process_group: bool = True,
    kwargs: Mapping[str, Any] | None = None,
) -> list[Any]:
    return _run_ranks(
        fn,
        world_size,
        args=tuple(args),
        kwargs=kwargs,
        timeout_s=timeout_s,
        env=env,
        init_process_group=init_process_group,
        preload=() if env else PRELOAD,
    )


Call = tuple[Callable[..., Any], tuple[Any, ...]]


class Checks:
    """The per-rank results of the checks of one `run_checks` spawn, by name."""

    def __init__(self, per_rank: list[dict[str, tuple[bool, Any]]]):
        self._per_rank = per_rank

    def __getitem__(self, name: str) -> list[Any]:
        """Check `name`'s result on each rank, in rank order; raises if it raised on any rank."""
        outcomes = [results[name] for results in self._per_rank]
        failed = [f"rank {rank}:\n{text}" for rank, (ok, text) in enumerate(outcomes) if not ok]
        if failed:
            raise RankFailedError(f"check {name!r} raised:\n" + "\n".join(failed))
        return [value for _, value in outcomes]


def run_checks(world_size: int, checks: Mapping[str, Call], **options: Any) -> Checks:
    """Run each check `name: (fn, args)` in turn on the same `world_size` ranks (one spawn); each check
    adds the default timeout to the spawn's, as if it had its own."""
    options.setdefault("timeout_s", DEFAULT_TIMEOUT_S * len(checks))
    return Checks(run_ranks(_each, world_size, dict(checks), **options))


def _each(checks: dict[str, Call]) -> dict[str, tuple[bool, Any]]:
    out = {}
    for name, (fn, args) in checks.items():
        try:
            out[name] = (True, fn(*args))
        except Exception:  # reported by the test that reads it; peers of a collective fail there too
            out[name] = (False, traceback.format_exc())
    return out
