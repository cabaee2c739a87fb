"""One command for a GPU pass on a machine with one GPU and no network: prints one JSON object and a markdown table.

    python3 bench/gpu_pass.py [--out DIR] [--only PART ...] [--budget-s 450] [--small]

Prepare here first: `python3 bench/gpu_wheels.py` writes `.whl/` (git-ignored), the wheels that machine
lacks at uv.lock's versions; the device tool carries it (`carry: [".whl"]`). This script installs them with
`pip install --no-index --no-deps --target SITE` (skipped when SITE has them already; unpacked where python
has no pip; pyyaml, pillow and pytest only where python lacks them) and runs each part as a
subprocess of the source tree (PYTHONPATH: SITE, packages/*/src, the repo root), with its own timeout (also
bounded by what is left of `--budget-s`), stdout and stderr in OUT/logs/PART.{out,err}; a part that fails
or times out is recorded and the next one runs. Parts, in order:
- pytest: `pytest -m gpu` on the test files that have GPU tests;
- text, omni: bench/gpu_step.py --workload W --kernels auto torch --predict --profile: ours per kernel
  setting against one plain loop, the planner's predicted step beside each measured one, each ours run
  with 2 profiled steps after its timed ones (the trainer's train.profile: GPU busy share, host syncs, top
  kernels; traces stay in WORK, files up to 2 MB come back in OUT/profile). Should an ours run fail in the
  profiler, the part reruns once without it;
- kernels: bench/kernels.py (liger / torch per kernel, the loss head's time and memory);
- experts: bench/expert_compute.py (grouped_mm vs the per-expert loop).
OUT (default $OUT, else ./gpu_pass_out) receives gpu_pass.json (everything, with the device, versions and
each part's wall time) and gpu_pass.md (the table). `--small` is the CPU check that CI runs: nothing is
installed, the text part runs at gpu_step's --small dims (512-token micro-batches) and the expert bench at
toy sizes, and the GPU-only parts are recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from gpu_wheels import IF_MISSING, wheel_name

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("pytest", "text", "omni", "kernels", "experts")
MIN_PART_S = 20  # a part is not started with less budget left than this
# torchvision: HF's Qwen2-VL processor (the omni part) cannot be built without it; nothing here carries it
VERSIONS = (
    "torch",
    "torchvision",
    "triton",
    "transformers",
    "liger-kernel",
    "pydantic",
    "tokenizers",
    "huggingface-hub",
)


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    argv: tuple[str, ...] = ()  # after `python3`
    timeout_s: float = 0
    skip: str | None = None  # why it does not run


def plan(small: bool, work: Path, kernels: tuple[str, ...] = ("auto", "torch")) -> list[Part]:
    """The parts and their timeouts: GPU numbers sized to end within 8 minutes on one H200."""
    # ours with both kernel settings against one plain loop; 2 profiled steps after the timed ones; the
    # planner's predicted step beside the measured one
    step = (
        "bench/gpu_step.py",
        "--kernels",
        *kernels,
        "--predict",
        "--profile",
        str(work / "profile"),
    )
    if small:
        size = ("--small", "--tokens", "512", "--steps", "1")
        toy = ("--device", "cpu", "--tokens", "256", "--experts", "4", "--hidden", "64", "--inter", "32")
        return [
            Part("pytest", skip="--small: CPU, where every `pytest -m gpu` test skips itself"),
            Part("text", (*step, "--workload", "text", *size), 240),
            Part(
                "omni",
                skip="--small: text only (the omni CPU check: bench/gpu_step.py --small --workload omni)",
            ),
            Part("kernels", skip="--small: bench/kernels.py compares liger's kernels on a GPU"),
            Part("experts", ("bench/expert_compute.py", *toy, "--steps", "2"), 60),
        ]
    gpu_tests = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()
    )
    return [
        Part("pytest", ("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_tests), 120),
        Part("text", (*step, "--workload", "text"), 180),
        Part("omni", (*step, "--workload", "omni"), 270),
        Part("kernels", ("bench/kernels.py", "--repeats", "10"), 75),
        Part("experts", ("bench/expert_compute.py",), 45),
    ]


def without_profile(part: Part) -> Part:
    i = part.argv.index("--profile")
    return dataclasses.replace(part, argv=part.argv[:i] + part.argv[i + 2 :])


def profiler_failed(result: dict) -> bool:
    """An ours run failed and its error names the profiler (train.profile): worth a rerun without it."""
    return any("ours" not in r and "profil" in r.get("error", "").lower() for r in result.get("results", []))


# -- the environment ------------------------------------------------------------------------------
def install(wheels: Path, site: Path) -> dict:
    """pip install --target the carried wheels (those of IF_MISSING only where python cannot import them)."""
    start = time.perf_counter()
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"no wheels in {wheels}: run `python3 bench/gpu_wheels.py` here and carry .whl")
    chosen = [
        w
        for w in files
        if wheel_name(w) not in IF_MISSING or not importlib.util.find_spec(IF_MISSING[wheel_name(w)])
    ]
    marker = site / ".omni-wheels"
    names = "\n".join(w.name for w in chosen)
    if marker.exists() and marker.read_text() == names:
        return {"wheels": [w.name for w in chosen], "skipped": f"already installed in {site}"}
    shutil.rmtree(site, ignore_errors=True)
    if importlib.util.find_spec("pip"):
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*cmd, "--target", str(site), *map(str, chosen)], check=True)
    else:  # a python without pip: these wheels (no .data dirs) install by unpacking
        for wheel in chosen:
            with zipfile.ZipFile(wheel) as z:
                if any(".data/" in n for n in z.namelist()):
                    raise SystemExit(f"{wheel.name} has a .data dir: install it with pip")
                z.extractall(site)
    marker.write_text(names)
    return {"wheels": [w.name for w in chosen], "wall_s": round(time.perf_counter() - start, 1)}


def versions(search: list[str]) -> dict[str, str | None]:
    """The versions the parts import (SITE first), read from the distributions' metadata."""
    out = {}
    for name in VERSIONS:
        dist = next(iter(importlib.metadata.distributions(name=name, path=search)), None)
        out[name] = dist.version if dist else None
    return out


def gpu_name() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        return subprocess.run(
            [*query, "-i", "0"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"cuda (nvidia-smi: {e})"


def environment(site: Path | None, tmp: Path) -> dict[str, str]:
    paths = [str(site)] if site else []
    paths += [str(p) for p in sorted((ROOT / "packages").glob("*/src"))] + [str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # no network there: never wait on the hub
    return {
        **os.environ,
        **offline,
        "PYTHONPATH": os.pathsep.join(paths),
        "TMPDIR": str(tmp),
        "PYTHONUNBUFFERED": "1",
    }


# -- running a part ------------------------------------------------------------------------------------
def json_objects(text: str) -> list[dict]:
    """The JSON objects a bench printed: one per line, or one indented over many lines."""
    decoder, found, pos = json.JSONDecoder(), [], 0
    while (start := text.find("{", pos)) >= 0:
        if start and text[start - 1] != "\n":
            pos = start + 1
            continue
        try:
            obj, pos = decoder.raw_decode(text, start)
            found.append(obj)
        except json.JSONDecodeError:
            pos = start + 1
    return found


def pytest_counts(text: str) -> dict[str, int]:
    """`9 passed, 1 skipped in 21.03s` -> {"passed": 9, "skipped": 1}."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def run_part(
    part: Part, site: Path | None, work: Path, logs: Path, timeout_s: float, label: str = ""
) -> dict:
    label = label or part.name
    out, err = logs / f"{label}.out", logs / f"{label}.err"
    tmp = work / "tmp" / part.name  # its TMPDIR: gpu_step's model and run dirs (the omni model is ~9 GB)
    tmp.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with out.open("w") as stdout, err.open("w") as stderr:
        # its own session: a timeout ends the bench's own children too (trainer ranks, the plain loop)
        proc = subprocess.Popen(
            [sys.executable, *part.argv],
            cwd=ROOT,
            env=environment(site, tmp),
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        _end_group(proc)
    shutil.rmtree(tmp, ignore_errors=True)
    text = out.read_text()
    result = {"status": status, "returncode": rc, "wall_s": round(time.perf_counter() - start, 1)}
    result |= {
        "timeout_s": round(timeout_s),
        "log": [str(out.relative_to(logs.parent)), str(err.relative_to(logs.parent))],
    }
    if part.name == "pytest":
        result["counts"] = pytest_counts(text)
    else:
        result["results"] = json_objects(text)
    errors = [r["error"] for r in result.get("results", []) if "error" in r]
    if status == "ok" and errors:
        result["status"] = "failed"
    if result["status"] != "ok":
        result["error_tail"] = (errors[0] if errors else err.read_text().strip() or text)[-3000:]
    return result


def _end_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(1)  # the group's other members (data workers) get a moment too


def copy_small_files(src: Path, dst: Path, max_bytes: int = 2 << 20) -> dict:
    """The profile's summaries come back with OUT; traces larger than max_bytes stay (the transfer is bounded)."""
    copied, left = [], {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()) if src.exists() else []:
        rel = path.relative_to(src)
        if path.stat().st_size > max_bytes:
            left[str(rel)] = path.stat().st_size
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / rel)
        copied.append(str(rel))
    return {"copied_to_out": copied, "left_on_machine_bytes": left}


# -- the table --------------------------------------------------------------------------------------------
def _num(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x) if isinstance(x, float | int) else str(x)


def _tok(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e3:.1f}K" if x >= 1e3 else f"{x:.0f}"


def _profile_cells(prof: dict | None, rerun: bool) -> list[str]:
    """GPU busy share, host syncs and sync-forcing ops per step, from omni_train.profiling's summary."""
    if rerun:
        return ["profiler failed"] * 3
    if not prof or "missing" in prof:
        return ["no summary" if prof else "-"] * 3
    if prof.get("gpu_busy_share") is None:  # a CPU trace: no GPU time, host syncs not measured
        return ["n/a (CPU)", "n/a (CPU)", _num(prof.get("sync_forcing_ops_per_step"), "{:g}")]
    keys = ("gpu_busy_share", "host_syncs_per_step", "sync_forcing_ops_per_step")
    return [_num(prof.get(k), f) for k, f in zip(keys, ("{:.3f}", "{:g}", "{:g}"), strict=True)]


def _step_rows(parts: dict) -> list[str]:
    lines = [
        "| workload | kernels | ours tok/s | plain tok/s | ours / plain | MFU | GPU busy | host syncs / step "
        "| sync-forcing ops / step | planner step / measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tops = []
    for name in ("text", "omni"):
        for r in parts[name].get("results", []):
            ours, plain = r.get("ours", {}), r.get("plain", {})
            ratio = _num(r.get("ours_over_plain_tokens_per_s"), "{:.2f}x")
            if "error" in r:
                ratio = "error: " + r["error"].strip().splitlines()[-1][:80].replace("|", "/")
            cells = [name, ours.get("kernels", "?"), _tok(ours.get("tokens_per_s"))]
            cells += [_tok(plain.get("tokens_per_s")), ratio, _num(ours.get("mfu"))]
            cells += _profile_cells(ours.get("profile"), "profiled_attempt_failed" in parts[name])
            planner = ours.get("planner", {})
            cells.append(
                _num(planner.get("predicted_over_measured"), "{:.2f}") if "error" not in planner else "error"
            )
            lines.append("| " + " | ".join(cells) + " |")
            top = ours.get("profile", {}).get("top_kernels") or []
            if top:
                shown = ", ".join(f"{k['name'][:50]} {k['share']:.0%}" for k in top[:5])
                tops.append(
                    f"Top {ours['profile'].get('top_kernels_kind', 'kernel')}s ({name}, {cells[1]}): {shown}"
                )
    return lines + (["", *tops] if tops else [])


def _kernel_rows(kernels: dict) -> list[str]:
    lines = ["| kernel | liger / torch time | max rel err |", "|---|---|---|"]
    for k, r in kernels.get("kernels", {}).items():
        lines.append(f"| {k} | {_num(r['ratio_liger_over_torch'])} | {r['max_rel_err']:.1e} |")
    lines += [
        "",
        "| loss head rows | all logits ms / GiB | chunked 4096, torch | chunked 4096, liger |",
        "|---|---|---|---|",
    ]
    for h in kernels.get("loss_head", []):
        paths = ("all_logits", "chunked_4096", "liger_chunked_4096")
        cells = [
            h[p] if isinstance(h[p], str) else f"{h[p]['ms']:.0f} / {h[p]['peak_gib']:.1f}" for p in paths
        ]
        lines.append(f"| {h['rows']} | " + " | ".join(cells) + " |")
    return lines


def table(report: dict) -> str:
    parts, v = report["parts"], report["versions"]
    lines = [
        f"GPU pass on {report['device']}: "
        + ", ".join(f"{k} {v[k]}" for k in VERSIONS if k in v)
        + (" (--small)" if report["small"] else ""),
        "",
        *_step_rows(parts),
    ]
    if kernels := next(iter(parts["kernels"].get("results", [])), None):
        lines += ["", *_kernel_rows(kernels)]
    if experts := next(iter(parts["experts"].get("results", [])), None):
        ms, shape = experts["ms_per_fwd_bwd"], experts["shape"]
        lines += [
            "",
            f"Experts ({experts['dtype']}, {shape['rows']} rows, {shape['experts']} experts): grouped_mm "
            f"{ms['grouped_mm']} ms, loop {ms['loop']} ms: {experts['grouped_mm_vs_loop']}x",
        ]
    if counts := parts["pytest"].get("counts"):
        lines += ["", "pytest -m gpu: " + ", ".join(f"{n} {k}" for k, n in counts.items())]
    lines += ["", "| part | status | wall s | note |", "|---|---|---|---|"]
    for name, p in parts.items():
        note = p.get("reason") or (p.get("error_tail", "").strip().splitlines() or [""])[-1][:100]
        lines.append(f"| {name} | {p['status']} | {_num(p.get('wall_s'), '{}')} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# -- the pass ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_pass_out"))
    ap.add_argument("--only", nargs="+", choices=PARTS, help="run these parts (the others: skipped)")
    ap.add_argument(
        "--kernels",
        nargs="+",
        default=["auto", "torch"],
        help="the step benches' settings of ours (gpu_step.py)",
    )
    ap.add_argument(
        "--timeout",
        nargs="+",
        default=[],
        metavar="PART=S",
        help="a part's own time limit, instead of its default",
    )
    ap.add_argument("--budget-s", type=float, help="all parts together (default 450; --small 400)")
    ap.add_argument("--small", action="store_true", help="the CPU check (CI): no GPU, no install")
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    ap.add_argument("--site", type=Path, default=Path("/tmp/omni-site"), help="where the wheels install")
    ap.add_argument("--work", type=Path, default=Path("/tmp/omni-gpu-pass"), help="scratch (profile traces)")
    args = ap.parse_args()
    start = time.perf_counter()
    budget = args.budget_s or (400 if args.small else 450)
    import torch  # the device's name comes from nvidia-smi: no CUDA context held in this process

    if not args.small and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --small for the CPU check")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    shutil.rmtree(args.work / "profile", ignore_errors=True)
    site = None if args.small else args.site
    report = {
        "bench": "gpu_pass",
        "small": args.small,
        "device": f"cpu ({os.cpu_count()} cores)" if args.small else gpu_name(),
        "python": sys.version.split()[0],
        "install": install(args.wheels, site) if site else {"skipped": "--small: runs in this environment"},
        "versions": versions([*([str(site)] if site else []), *sys.path]),
        "budget_s": budget,
        "parts": {},
    }
    limits = {k: float(v) for k, v in (t.split("=") for t in args.timeout)}
    for part in plan(args.small, args.work, tuple(args.kernels)):
        part = dataclasses.replace(part, timeout_s=limits.get(part.name, part.timeout_s))
        left = budget - (time.perf_counter() - start)
        if part.skip or (args.only and part.name not in args.only) or left < MIN_PART_S:
            reason = part.skip or (
                "not in --only" if left >= MIN_PART_S else f"budget spent ({left:.0f} s left)"
            )
            report["parts"][part.name] = {"status": "skipped", "reason": reason}
            continue
        result = run_part(part, site, args.work, logs, min(part.timeout_s, left))
        left = budget - (time.perf_counter() - start)
        if profiler_failed(result) and left >= MIN_PART_S:  # keep the step numbers: rerun unprofiled
            first = {k: result[k] for k in ("wall_s", "error_tail") if k in result}
            result = run_part(
                without_profile(part),
                site,
                args.work,
                logs,
                min(part.timeout_s, left),
                f"{part.name}.unprofiled",
            )
            result["profiled_attempt_failed"] = first
        report["parts"][part.name] = result
        print(
            f"gpu_pass: {part.name} {result['status']} in {result['wall_s']} s", file=sys.stderr, flush=True
        )
    report["profile_files"] = copy_small_files(args.work / "profile", args.out / "profile")
    report["wall_s"] = round(time.perf_counter() - start, 1)
    md = table(report)
    (args.out / "gpu_pass.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_pass.md").write_text(md)
    print(json.dumps(report))
    print(md)


if __name__ == "__main__":
    main()
