"""The multi-process harness every distributed test uses.

`run_ranks(fn, n, ...)` spawns n CPU ranks joined by gloo, runs the module-level function `fn` in each
(one intra-op thread per rank), and returns the per-rank results in rank order. A rank that raises,
dies or hangs fails the test within `timeout_s` with that rank's traceback or Python stacks.
Spawning costs ~5-9 s: put several checks into one spawned function.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from omni_dist.spawn import RankFailedError
from omni_dist.spawn import run_ranks as _run_ranks

__all__ = ["RankFailedError", "run_ranks"]

DEFAULT_TIMEOUT_S = float(os.environ.get("OMNI_TEST_RANK_TIMEOUT", "240"))


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
    )
