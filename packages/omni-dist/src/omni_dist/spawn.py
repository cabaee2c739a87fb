"""Run a function on N local processes joined in one process group, and collect what each returns.

Used by the test suite and by single-node local runs. Fails fast: the first rank that raises or dies
stops the whole group, and a group that does not finish within `timeout_s` is stopped after each live
rank has dumped its Python stacks (the usual cause is a deadlocked collective), so a broken rank never
turns into a hung job.

The parent hosts the rendezvous store (on a port the OS picks, so concurrent runs never race for a
port) and the ranks join it as torchrun workers join their agent's store.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from omni_dist.lifecycle import die_with_parent

_POLL_S = 0.05
_STACK_DUMP_WAIT_S = 2.0
_RESULT_GRACE_S = 1.0
_FAILURE_WINDOW_S = 2.0


class RankFailedError(RuntimeError):
    """A rank raised, died, or did not finish in time; the message carries what it said."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timeout_s: float = 300.0,
    env: Mapping[str, str] | None = None,
    threads_per_rank: int = 1,
    init_process_group: bool = True,
    preload: Sequence[str] = (),
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on ranks 0..world_size-1 and return their results, by rank.

    `fn` must be importable by name (a module-level function): ranks are fresh spawned interpreters.
    Each rank starts with RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT, `env`
    and OMP_NUM_THREADS in its environment from the first instruction; with `init_process_group` the
    default group is created (gloo on CPU) before `fn` runs and destroyed after. Results travel
    pickled by value.

    `preload`: modules (e.g. torch, transformers) that one forkserver process imports once for every
    later call of this process that passes them; its ranks are forked from it, ready in well under a
    second instead of importing them again (~5 s each). They inherit the server's environment (the rank's
    own variables are set first thing in the rank; what a preloaded module read at import is the
    server's) and the first call's list (the server starts once). Not with `env`: whatever the
    variables configure at import must see them, so those calls spawn fresh interpreters.
    """
    import torch.distributed as dist

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if preload and env:
        raise ValueError("run_ranks: `preload` forks ranks from a server started without `env`; pass one")
    ctx = mp.get_context("forkserver" if preload else "spawn")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    results: queue.Queue = ctx.Queue()
    pg_timeout = timedelta(seconds=max(timeout_s, 1.0))
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=pg_timeout
    )
    payload = pickle.dumps((fn, tuple(args), dict(kwargs or {})))
    with tempfile.TemporaryDirectory(prefix="omni-ranks-") as stack_dir:
        procs = []
        ok = False
        try:
            for rank in range(world_size):
                rank_env = {
                    "RANK": str(rank),
                    "WORLD_SIZE": str(world_size),
                    "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(world_size),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(store.port),
                    "TORCHELASTIC_USE_AGENT_STORE": "True",
                    "OMP_NUM_THREADS": str(threads_per_rank),
                    **(env or {}),
                }
                p = ctx.Process(
                    target=_rank_main,
                    args=(
                        payload,
                        rank,
                        threads_per_rank,
                        init_process_group,
                        pg_timeout,
                        stack_dir,
                        results,
                        os.getpid(),
                        rank_env,
                        not preload,
                    ),
                    name=f"rank{rank}",
                    daemon=False,  # ranks may start workers of their own (data loaders)
                )
                with _environ(rank_env):  # a spawned interpreter inherits the environment at exec
                    p.start()
                procs.append(p)
            out = _collect(procs, results, timeout_s, Path(stack_dir))
            ok = True
            return out
        finally:
            _stop(procs, graceful=ok)
            results.close()
            del store


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank_main(
    payload: bytes,
    rank: int,
    threads: int,
    init_pg: bool,
    pg_timeout: timedelta,
    stack_dir: str,
    results: queue.Queue,
    launcher_pid: int,
    rank_env: dict[str, str],
    spawned: bool,
) -> None:
    os.environ.update(rank_env)  # a forked rank has the forkserver's environment
    # what the rank starts (data-loader workers) starts as from a spawned rank: as direct children (a forked
    # rank's default would be the forkserver, a grandparent to them)
    mp.set_start_method("spawn", force=True)
    os.setsid()  # own process group: stopping the rank also stops anything it started
    # a rank never outlives its job; a forked rank's parent is the forkserver, which exits with the launcher
    die_with_parent(launcher_pid, direct=spawned)
    stack_file = open(Path(stack_dir) / f"rank{rank}.txt", "w")  # noqa: SIM115 (lives as long as the rank)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    import torch

    from omni_dist.env import destroy_distributed, init_distributed

    torch.set_num_threads(threads)
    try:
        fn, args, kwargs = pickle.loads(payload)
        if init_pg:
            init_distributed(timeout=pg_timeout)
        value = fn(*args, **kwargs)
        message = ("ok", pickle.dumps(value))
    except BaseException:
        message = ("error", traceback.format_exc())
    results.put((rank, *message))
    destroy_distributed()


def _collect(procs: list, results: queue.Queue, timeout_s: float, stack_dir: Path) -> list[Any]:
    world_size = len(procs)
    done: dict[int, Any] = {}
    failures: dict[int, str] = {}  # in the order they were seen: the first is the likely cause
    dead_since: dict[int, float] = {}
    first_failure = None
    deadline = time.monotonic() + timeout_s
    while len(done) + len(failures) < world_size:
        try:
            rank, status, message = results.get(timeout=_POLL_S)
        except queue.Empty:
            pass
        else:
            if status == "error":
                failures[rank] = f"rank {rank} of {world_size} raised:\n{message}"
            else:
                done[rank] = pickle.loads(message)
        now = time.monotonic()
        for rank, p in enumerate(procs):
            if rank in done or rank in failures or p.is_alive():
                continue
            # Its result may still be in the pipe: give the queue a moment before calling it dead.
            if now - dead_since.setdefault(rank, now) > _RESULT_GRACE_S:
                failures[rank] = (
                    f"rank {rank} of {world_size} died without a result ({_exit_text(p.exitcode)})."
                )
        if failures and first_failure is None:
            first_failure = now
        # Peers of a failed rank fail too ("connection closed"); wait briefly so the report holds the
        # cause and its consequences rather than whichever symptom arrived first.
        if first_failure is not None and now - first_failure > _FAILURE_WINDOW_S:
            break
        if now > deadline:
            waiting = [r for r in range(world_size) if r not in done and r not in failures]
            raise RankFailedError(
                "".join(f"{text}\n" for text in failures.values())
                + f"ranks {waiting} of {world_size} did not finish within {timeout_s:.0f}s "
                f"(deadlock or a peer stuck in a collective?). Their Python stacks:\n"
                + _dump_stacks(procs, waiting, stack_dir),
                next(iter(failures), None),
            )
    if failures:
        cause = min(failures, key=lambda r: (r not in dead_since, list(failures).index(r)))
        raise RankFailedError("\n".join(failures.values()), cause)
    return [done[r] for r in range(world_size)]


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _dump_stacks(procs: list, ranks: list[int], stack_dir: Path) -> str:
    for r in ranks:
        if procs[r].is_alive() and procs[r].pid:
            os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(_STACK_DUMP_WAIT_S)
    parts = []
    for r in ranks:
        path = stack_dir / f"rank{r}.txt"
        text = path.read_text().strip() if path.exists() else ""
        parts.append(f"--- rank {r} ---\n{text or '(no stack dumped)'}")
    return "\n".join(parts)


def _stop(procs: list, graceful: bool) -> None:
    """After success let ranks exit on their own (they are tearing down); otherwise kill at once.

    Each rank leads its own process group, so the kill also reaches processes it started.
    """
    if graceful:
        for p in procs:
            p.join(timeout=10.0)
    for p in procs:
        if p.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        p.join(timeout=5.0)
