"""`omni-train launch`: Ray places the worker group, supervises it, and restarts it from checkpoint.

One placement group bundle per worker ({CPU: k} or {CPU: k, GPU: 1}); workers are actors, ranked by
(node, bundle) so ranks are stable across restarts; rank 0 provides MASTER_ADDR and a free port; each
actor sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE and runs the same `train` as `omni-train run`.

The driver polls every actor's heartbeat (the step it last finished, and when). A task that ends in an
error (a killed process, a lost node, a gloo/NCCL error in a surviving rank) or a worker with no
progress for `launcher.heartbeat_timeout_s` (a hang) fails the attempt: the whole group is torn down
and a new one resumes from the last complete checkpoint, up to `launcher.max_failures` restarts.
Errors that a restart cannot fix (bad data rate, non-finite losses, config) end the run at once: they
are recognised by type (`omni_train.errors.FATAL_ERRORS`), inside Ray's RayTaskError wrapping.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_dist.checkpoint import CheckpointLayout
from omni_train.config import TrainConfig
from omni_train.errors import FATAL_ERRORS

log = logging.getLogger("omni_train.launch")

ROOT_CAUSE_WAIT_S = 5.0  # after a worker error, how long the other ranks may take to report theirs


class LaunchError(RuntimeError):
    """The launcher gave up: no resources, a fatal worker error, or restarts used up."""


class TrainWorker:
    """One rank. Threaded (max_concurrency=2) so heartbeats are answered while `run` trains."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.progress = {"step": -1, "loss": None, "time": time.time()}
        self.lock = threading.Lock()

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return f"rank{self.rank}"

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
        }

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def heartbeat(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.progress)

    def _on_progress(self, step: int, loss: float | None) -> None:
        with self.lock:
            self.progress = {"step": step, "loss": loss, "time": time.time()}

    def run(self, config: dict[str, Any], env: dict[str, str], threads: int) -> dict[str, Any]:
        import torch

        from omni_train.plugins import load_plugins
        from omni_train.trainer import train

        os.environ.update(env)
        torch.set_num_threads(threads)
        self._on_progress(-1, None)
        load_plugins(config["plugins"])  # this actor's process: register the recipe's parts before the build
        return train(TrainConfig.model_validate(config), self._on_progress)


@dataclass
class Attempt:
    actors: list[Any]
    futures: list[Any]
    placement_group: Any


class Launcher:
    def __init__(self, cfg: TrainConfig, address: str | None = None, poll_s: float = 0.5):
        self.cfg = cfg
        self.address = address or cfg.launcher.address
        self.poll_s = poll_s
        self.n = cfg.launcher.num_workers
        self.timings: dict[str, float] = {}

    # -- one attempt -------------------------------------------------------------------------
    def _start(self, ray, config: dict[str, Any]) -> Attempt:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lc = self.cfg.launcher
        bundle = {"CPU": lc.cpus_per_worker} | ({"GPU": lc.gpus_per_worker} if lc.gpus_per_worker else {})
        pg = placement_group([dict(bundle) for _ in range(self.n)], strategy=lc.placement)
        ready, _ = ray.wait([pg.ready()], timeout=lc.timeout_s)
        if not ready:
            ray.util.remove_placement_group(pg)
            raise LaunchError(
                f"the cluster cannot place {self.n} workers of {bundle} within {lc.timeout_s} s "
                f"(available: {ray.available_resources()})"
            )
        # Ranks follow (node, bundle): the same layout gives the same ranks after a restart.
        nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        order = sorted(range(self.n), key=lambda b: (ips.get(nodes[b], ""), nodes[b], b))
        cls = ray.remote(max_concurrency=2)(TrainWorker)
        actors = [
            cls.options(
                num_cpus=lc.cpus_per_worker,
                num_gpus=lc.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
            ).remote(rank)
            for rank, bundle in enumerate(order)
        ]
        infos = ray.get([a.info.remote() for a in actors])
        port = ray.get(actors[0].free_port.remote())
        per_node: dict[str, list[int]] = {}
        for rank, info in enumerate(infos):
            per_node.setdefault(info["node"], []).append(rank)
        threads = max(1, int(lc.cpus_per_worker))
        futures = []
        for rank, (actor, info) in enumerate(zip(actors, infos, strict=True)):
            local = per_node[info["node"]]
            env = {
                "RANK": str(rank),
                "WORLD_SIZE": str(self.n),
                "LOCAL_RANK": str(local.index(rank)),
                "LOCAL_WORLD_SIZE": str(len(local)),
                "MASTER_ADDR": infos[0]["ip"],
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": str(threads),
            }
            futures.append(actor.run.remote(config, env, threads))
        pids = {rank: info["pid"] for rank, info in enumerate(infos)}
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.run_dir / "workers.json").write_text(json.dumps({str(r): p for r, p in pids.items()}))
        return Attempt(actors, futures, pg)

    def _stop(self, ray, attempt: Attempt) -> None:
        for actor in attempt.actors:
            ray.kill(actor, no_restart=True)
        ray.util.remove_placement_group(attempt.placement_group)

    def _watch(self, ray, attempt: Attempt, progress) -> tuple[str, str | None, list[Any] | None]:
        """Wait until the attempt ends: ('done', None, results) or ('failed'|'fatal', cause, None)."""
        last = {r: (time.time(), -1) for r in range(self.n)}
        timeout = self.cfg.launcher.heartbeat_timeout_s
        pending = list(attempt.futures)
        while True:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll_s)
            errors = _errors(ray, attempt, done)
            if errors:
                return _root_cause(ray, attempt, pending, errors)
            if not pending:
                return "done", None, ray.get(attempt.futures)
            beats = [a.heartbeat.remote() for a in attempt.actors]
            ready, _ = ray.wait(beats, num_returns=len(beats), timeout=min(5.0, timeout))
            now = time.time()
            for rank, ref in enumerate(beats):
                if ref in ready:
                    try:
                        beat = ray.get(ref)
                    except Exception as e:  # the actor is gone or unreachable: its run task says why
                        return _root_cause(ray, attempt, pending, [(rank, e)])
                    if beat["step"] != last[rank][1]:
                        last[rank] = (now, beat["step"])
                    if rank == 0:
                        progress(beat)
            stalled = [r for r, (t, _) in last.items() if now - t > timeout]
            if stalled:
                step = last[stalled[0]][1]
                return (
                    "failed",
                    f"rank {stalled[0]}: no progress for {timeout:.0f} s (hung at step {step + 1})",
                    None,
                )

    # -- supervision -------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        from omni_data.ray_cluster import connect, import_ray
        from omni_train.local import prepare_data

        t0 = time.perf_counter()
        prepare_data(self.cfg)
        ray = import_ray()
        started = connect(self.address)
        worker_cfg = self.cfg.model_copy(
            update={"logging": self.cfg.logging.model_copy(update={"console": "none"})}
        )
        config = worker_cfg.model_dump(mode="json")
        bar = _Progress(self.cfg.train.steps, enabled=self.cfg.logging.console == "progress")
        checkpoints = CheckpointLayout(self.cfg.checkpoint_dir)
        failures = 0
        failed_at = None
        try:
            while True:
                resume_from = checkpoints.latest_step() or 0
                attempt = self._start(ray, config)

                def progress(beat, resume_from=resume_from, failed_at=failed_at):
                    # Launch -> first step, and failure -> first step past the checkpoint resumed from.
                    key = "launch_to_first_step_s" if failed_at is None else "failure_to_resumed_step_s"
                    if beat["step"] > resume_from and key not in self.timings:
                        self.timings[key] = time.perf_counter() - (t0 if failed_at is None else failed_at)
                    bar.update(beat)

                try:
                    outcome, cause, results = self._watch(ray, attempt, progress)
                finally:  # also on Ctrl-C: no worker outlives the launcher
                    self._stop(ray, attempt)
                if outcome == "done":
                    return results
                failed_at = time.perf_counter()
                self.timings.pop("failure_to_resumed_step_s", None)
                step = checkpoints.latest_step() or 0
                if outcome == "fatal":
                    raise LaunchError(
                        f"training failed: {cause} (not retried: a restart would fail the same way)"
                    )
                if failures >= self.cfg.launcher.max_failures:
                    raise LaunchError(
                        f"worker failure: {cause}; launcher.max_failures={self.cfg.launcher.max_failures} "
                        f"restarts used up (last complete checkpoint: step {step})"
                    )
                failures += 1
                config["checkpoint"]["resume"] = "auto"  # a restart continues from the newest checkpoint
                log.warning(
                    "worker failure (%s); restart %d/%d from checkpoint step %d",
                    cause,
                    failures,
                    self.cfg.launcher.max_failures,
                    step,
                )
        finally:
            bar.close()
            if started:
                ray.shutdown()


def _errors(ray, attempt: Attempt, refs) -> list[tuple[int, Exception]]:
    out = []
    for ref in refs:
        try:
            ray.get(ref)
        except Exception as e:  # any worker failure is classified by _classify
            out.append((attempt.futures.index(ref), e))
    return out


def _root_cause(ray, attempt: Attempt, pending, errors: list[tuple[int, Exception]]):
    """A dead worker breaks its peers' collectives and a peer's error (or an unreachable heartbeat) can
    arrive first: give the other ranks a moment to report, then name the root cause."""
    more = ray.wait(pending, num_returns=len(pending), timeout=ROOT_CAUSE_WAIT_S)[0] if pending else []
    return _classify(ray, _errors(ray, attempt, more) + errors)


def _classify(ray, errors: list[tuple[int, BaseException]]) -> tuple[str, str, None]:
    """('fatal' | 'failed', cause): a fatal error anywhere wins, then a dead worker, then the first.

    Errors are judged by the exception the worker raised, not by Ray's wrapper: `ray.get` raises a
    RayTaskError (subclassed as "RayTaskError(TrainingError)") whose `.cause` is the original. A
    type in FATAL_ERRORS, raised or chained (`raise ... from`) as a cause, makes the failure fatal.
    """
    raised = [(rank, _unwrap(ray, e)) for rank, e in errors]
    fatal = [(rank, f) for rank, e in raised if (f := _fatal_in(ray, e)) is not None]
    died = [(rank, e) for rank, e in raised if isinstance(e, ray.exceptions.ActorDiedError)]
    rank, e = (fatal or died or raised)[0]
    return ("fatal" if fatal else "failed"), f"rank {rank}: {type(e).__name__}: {_first_line(e)}", None


def _unwrap(ray, e: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray's RayTaskError wrapping (nested for nested tasks)."""
    seen = set()
    while isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, BaseException):
        if id(e) in seen:
            break
        seen.add(id(e))
        e = e.cause
    return e


def _fatal_in(ray, e: BaseException) -> BaseException | None:
    """The first exception of a FATAL_ERRORS type in `e`'s chain of causes (Ray's and Python's)."""
    seen = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current = _unwrap(ray, current)
        if isinstance(current, FATAL_ERRORS):
            return current
        current = current.__cause__
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    useful = [line for line in text if line.strip() and not line.startswith(("Traceback", "  "))]
    return (useful[-1] if useful else (text[0] if text else ""))[:300]


class _Progress:
    """The driver's progress bar, fed by rank 0's heartbeats."""

    def __init__(self, total: int, enabled: bool):
        self._p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self._task = self._p.add_task("train", total=total, status="")
            self._p.start()

    def update(self, beat: dict[str, Any]) -> None:
        if self._p is not None and beat["step"] >= 0:
            loss = beat["loss"]
            self._p.update(
                self._task, completed=beat["step"], status="" if loss is None else f"loss {loss:.4f}"
            )

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def launch(cfg: TrainConfig, address: str | None = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    launcher = Launcher(cfg, address)
    results = launcher.run()
    Path(cfg.run_dir / "launch.json").write_text(json.dumps(launcher.timings))
    return results, launcher.timings
