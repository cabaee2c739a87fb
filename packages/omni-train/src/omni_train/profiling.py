"""The trainer's profiler (`train.profile`): a torch profiler trace of optimizer steps [a, b) on every rank,
and a summary read back from that trace: wall time per step, the top kernels, the share of the steps' wall
time the GPU was busy, the host syncs and the sync-forcing ops per step.

The summary is computed from the exported Chrome trace (kineto's JSON, the same on torch 2.11 and 2.13)
rather than from `prof.events()`: there GPU kernels are "cat": "kernel" events with device start and end on
the host's clock, CUDA runtime calls are "cat": "cuda_runtime", and each profiled step is a
"ProfilerStep#<step>" annotation (the name torch's own profiler schedule gives its steps, so Perfetto and
TensorBoard's profiler plugin show them). `summarize_trace` therefore also works on traces from elsewhere.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from omni_train.config import ProfileSection

log = logging.getLogger("omni_train")

STEP_MARK = "ProfilerStep#"
_STEP_RE = re.compile(rf"^{re.escape(STEP_MARK)}(\d+)$")
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # what keeps the GPU busy
# CUDA runtime calls that return only once the device got there.
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"})
# Runtime calls that order work on the device; any other (cudaGetDevice, ...) is transparent when pairing a
# blocking copy with the synchronize that follows it.
_DEVICE_WORK_CALLS = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cudaMemcpy", "cudaMemset")
# Ops that read a device value into Python or size their output by the data: on a GPU each waits for the
# device; on the CPU they are all the trace shows of such waits.
SYNC_FORCING_OPS = frozenset(
    {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::equal", "aten::is_nonzero"}
)
TOP = 10


class StepProfiler:
    """Profiles the optimizer steps `section.steps = [a, b)` of this rank into DIR/trace_rank{r}.json and
    DIR/summary_rank{r}.json (DIR: `section.dir` relative to the run dir, default RUN_DIR/profile); rank 0
    logs the summary in one line. The trainer calls `step_started(step)` before fetching step `step`
    (1-based), `step_ended(step)` after its metrics were read, and `close()` at the end of training, also on
    errors. Without a section every call does nothing. A run resumed inside [a, b) profiles the steps left;
    a run that ends (or fails) inside it writes the steps that ended."""

    def __init__(self, section: ProfileSection | None, run_dir: Path, device: torch.device, rank: int):
        self.steps = section.steps if section is not None else None
        self.dir = Path(run_dir) / (section.dir or "profile") if section is not None else None
        self.device, self.rank = device, rank
        self.summary: dict[str, Any] | None = None  # set once written
        self._prof: profile | None = None
        self._mark: record_function | None = None  # the running step's annotation
        self._ended: list[int] = []
        self._done = section is None

    def step_started(self, step: int) -> None:
        if self._done or not self.steps[0] <= step < self.steps[1]:
            return
        if self._prof is None:
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities, record_shapes=False, with_stack=False)
            self._prof.start()
        self._mark = record_function(f"{STEP_MARK}{step}")
        self._mark.__enter__()

    def step_ended(self, step: int) -> None:
        if self._mark is None:
            return
        self._mark.__exit__(None, None, None)
        self._mark = None
        self._ended.append(step)
        if step >= self.steps[1] - 1:
            self._finish()

    def close(self) -> None:
        """Stops a profile still running (the run ended or failed inside the window) and writes it."""
        if self._prof is None:
            return
        if self._mark is not None:  # a step that did not end: in the trace, not in the summary
            self._mark.__exit__(None, None, None)
            self._mark = None
        self._finish()

    def _finish(self) -> None:
        prof, self._prof, self._done = self._prof, None, True
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        if not self._ended:
            if self.rank == 0:
                log.warning("profile: no step of %s ended; trace only: %s", list(self.steps), trace)
            return
        summary = {
            "rank": self.rank,
            "device": str(self.device),
            "requested_steps": list(self.steps),
            "trace": str(trace),
            **summarize_trace(trace, self._ended),
        }
        (self.dir / f"summary_rank{self.rank}.json").write_text(json.dumps(summary, indent=1))
        self.summary = summary
        if self.rank == 0:
            log.info("%s (%s)", describe(summary), self.dir)


def describe(summary: dict[str, Any]) -> str:
    """One line: steps, ms per step, GPU busy share, syncs and sync-forcing ops per step, top 3 kernels."""
    steps = summary["steps"]
    busy = summary["gpu_busy_share"]
    top = ", ".join(f"{k['name'][:60]} {k['share']:.0%}" for k in summary["top_kernels"][:3])
    return (
        f"profile of steps {steps[0]}-{steps[-1]} (rank {summary.get('rank', 0)}): "
        f"{summary['wall_ms_per_step']:.1f} ms/step, GPU busy "
        + (f"{busy:.1%}" if busy is not None else "n/a (no GPU in the trace)")
        + f", {summary['host_syncs_per_step']:g} host syncs/step, "
        f"{summary['sync_forcing_ops_per_step']:g} sync-forcing ops/step; "
        f"top {summary['top_kernels_kind'].replace('_', ' ')}s: {top}"
    )


# -- the summary, from a Chrome trace ---------------------------------------------------------------
def summarize_trace(path: str | Path, steps: Collection[int] | None = None) -> dict[str, Any]:
    """The summary of a Chrome trace (`export_chrome_trace`, .json or .json.gz) over its "ProfilerStep#N"
    windows (those of `steps` only, when given; the whole trace as one step when it has none). Times are in
    ms; shares are fractions. GPU busy = the union of kernel, memcpy and memset intervals (all streams)
    within the step windows / the windows' wall time. A host sync = a CUDA runtime call that blocks the
    host: a synchronize, a synchronous cudaMemcpy (not device to device), a cudaMemcpyAsync from or into
    pageable memory; a blocking copy followed by a synchronize (torch's `.item()`, `.cpu()`) counts once."""
    events = [e for e in _load(path) if e.get("ph") == "X" and "ts" in e and "dur" in e]
    windows, notes = _step_windows(events, steps)
    n = len(windows)
    wall_us = sum(end - start for _, start, end in windows)

    def inside(e: dict[str, Any]) -> bool:
        return any(start <= e["ts"] < end for _, start, end in windows)

    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_cat[e.get("cat", "")].append(e)
    gpu_work = [e for cat in GPU_WORK for e in by_cat[cat]]
    gpu = bool(gpu_work or by_cat["cuda_runtime"])

    if gpu:
        busy_us = _covered(_union((e["ts"], e["ts"] + e["dur"]) for e in gpu_work), windows)
        kernels = Counter()
        calls = Counter()
        for e in filter(inside, by_cat["kernel"]):
            kernels[e["name"]] += e["dur"]
            calls[e["name"]] += 1
        top, kind = _top(kernels, calls, n), "cuda_kernel"
        syncs = Counter(
            e["name"] for e in _host_syncs(by_cat["cuda_runtime"], by_cat["gpu_memcpy"]) if inside(e)
        )
    else:
        busy_us = None
        ops = [(e, self_us) for e, self_us in _self_times(by_cat["cpu_op"]) if inside(e)]
        self_time, calls = Counter(), Counter()
        for e, self_us in ops:
            self_time[e["name"]] += self_us
            calls[e["name"]] += 1
        top, kind = _top(self_time, calls, n), "cpu_op"
        syncs = Counter()
        notes.append(
            "no CUDA runtime events in the trace (a CPU run): host syncs are not measured there; "
            "sync_forcing_ops counts the ops that would wait for a GPU"
        )
    forcing = Counter(e["name"] for e in _outermost(by_cat["cpu_op"], SYNC_FORCING_OPS) if inside(e))
    return {
        "steps": [s for s, _, _ in windows],
        "steps_profiled": n,
        "step_ms": [round((end - start) / 1e3, 3) for _, start, end in windows],
        "wall_ms_per_step": wall_us / n / 1e3,
        "gpu_busy_share": busy_us / wall_us if busy_us is not None and wall_us > 0 else None,
        "gpu_busy_ms_per_step": busy_us / n / 1e3 if busy_us is not None else None,
        "host_syncs_per_step": sum(syncs.values()) / n,
        "host_syncs": dict(syncs.most_common()),
        "sync_forcing_ops_per_step": sum(forcing.values()) / n,
        "sync_forcing_ops": dict(forcing.most_common()),
        "top_kernels_kind": kind,  # cuda_kernel: by device time; cpu_op: by self time
        "top_kernels": top,
        "notes": notes,
    }


def _load(path: str | Path) -> list[dict[str, Any]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def _step_windows(
    events: list[dict[str, Any]], steps: Collection[int] | None
) -> tuple[list[tuple[int, float, float]], list[str]]:
    """[(step, start us, end us)] of the host-side step annotations, in time order."""
    windows = []
    for e in events:
        match = _STEP_RE.match(e["name"]) if e.get("cat") == "user_annotation" else None
        if match and (steps is None or int(match[1]) in steps):
            windows.append((int(match[1]), e["ts"], e["ts"] + e["dur"]))
    if windows:
        return sorted(windows, key=lambda w: w[1]), []
    if steps is not None:
        raise ValueError(f"the trace has no {STEP_MARK}N annotation for steps {sorted(steps)}")
    if not events:
        raise ValueError("the trace has no complete events")
    start, end = min(e["ts"] for e in events), max(e["ts"] + e["dur"] for e in events)
    return [(0, start, end)], [f"no {STEP_MARK}N annotations: the whole trace is counted as one step"]


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _covered(merged: list[tuple[float, float]], windows: list[tuple[int, float, float]]) -> float:
    """The time of disjoint `merged` intervals that falls inside the windows."""
    return sum(max(0.0, min(b, end) - max(a, start)) for _, start, end in windows for a, b in merged)


def _top(total_us: Counter, calls: Counter, steps: int) -> list[dict[str, Any]]:
    grand = sum(total_us.values()) or 1.0
    return [
        {
            "name": name,
            "ms_per_step": us / steps / 1e3,
            "calls_per_step": calls[name] / steps,
            "share": us / grand,
        }
        for name, us in total_us.most_common(TOP)
    ]


def _by_thread(events: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Events per (process, thread), each list in start order, a parent before the children it encloses."""
    threads: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        threads[(e.get("pid"), e.get("tid"))].append(e)
    return [sorted(evs, key=lambda e: (e["ts"], -e["dur"])) for evs in threads.values()]


def _self_times(ops: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """(op, its time less that of the ops it encloses on its thread)."""
    out = []
    for evs in _by_thread(ops):
        stack: list[int] = []  # indices into `out` of the enclosing ops
        for e in evs:
            while stack and out[stack[-1]][0]["ts"] + out[stack[-1]][0]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                parent, self_us = out[stack[-1]]
                out[stack[-1]] = (parent, self_us - e["dur"])
            out.append((e, e["dur"]))
            stack.append(len(out) - 1)
    return out


def _outermost(ops: list[dict[str, Any]], names: frozenset[str]) -> list[dict[str, Any]]:
    """The ops named in `names` that no other such op encloses (`.item()` is aten::item around
    aten::_local_scalar_dense: one read)."""
    out = []
    for evs in _by_thread(e for e in ops if e["name"] in names):
        outer_end = float("-inf")
        for e in evs:
            if e["ts"] >= outer_end:
                out.append(e)
                outer_end = e["ts"] + e["dur"]
    return out


def _host_syncs(runtime: list[dict[str, Any]], copies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runtime calls that block the host, each named by its call (a copy also by its direction)."""
    copy_names = {e["args"]["correlation"]: e["name"] for e in copies if "correlation" in e.get("args", {})}

    def is_sync(e: dict[str, Any]) -> bool:  # also the _ptsz (per-thread default stream) variants
        return e["name"].split("_")[0] in SYNC_CALLS

    out = []
    for evs in _by_thread(runtime):
        work = [e for e in evs if is_sync(e) or e["name"].startswith(_DEVICE_WORK_CALLS)]
        for i, e in enumerate(work):
            if is_sync(e):
                out.append(e)
                continue
            copy = copy_names.get(e.get("args", {}).get("correlation"))
            followed_by_sync = i + 1 < len(work) and is_sync(work[i + 1])
            if _blocking_copy(e["name"], copy) and not followed_by_sync:
                out.append({**e, "name": f"{e['name']}: {copy}" if copy else e["name"]})
    return out


def _blocking_copy(call: str, copy: str | None) -> bool:
    """Whether a runtime call blocks the host as a copy (CUDA's "API synchronization behavior"): a
    synchronous cudaMemcpy except device to device; an asynchronous one from or into pageable memory (the
    driver stages it) or host to host. `copy` is kineto's name of the matching GPU copy,
    "Memcpy DtoH (Device -> Pageable)", None when the trace lacks it."""
    if not call.startswith("cudaMemcpy"):
        return False
    if "Async" in call:
        return copy is not None and ("Pageable" in copy or "HtoH" in copy)
    return copy is None or not copy.startswith(("Memcpy DtoD", "Memcpy PtoP"))
