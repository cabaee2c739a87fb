"""bench/gpu_pass.py: its CPU mode (`--small`) runs end to end; the GPU-only report pieces render from the
shapes the benches print; bench/gpu_wheels.py finds one locked version of every wheel it fetches."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_pass  # noqa: E402
import gpu_wheels  # noqa: E402


def test_small_pass_reports_every_part(tmp_path):
    cmd = [
        sys.executable,
        "bench/gpu_pass.py",
        "--small",
        "--out",
        str(tmp_path),
        "--work",
        str(tmp_path / "w"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_pass.json").read_text())
    assert json.loads(proc.stdout.splitlines()[0]) == report
    parts = report["parts"]
    assert list(parts) == list(gpu_pass.PARTS)
    for name in ("pytest", "omni", "kernels"):
        assert parts[name]["status"] == "skipped" and parts[name]["reason"].startswith("--small"), name
    text = parts["text"]
    assert text["status"] == "ok" and "profiled_attempt_failed" not in text, text.get("error_tail")
    assert [r["ours"]["kernels"] for r in text["results"]] == ["auto", "torch"]
    for r in text["results"]:
        assert r["plain"] == text["results"][0]["plain"]  # one plain run for both settings
        ratio = r["ours_over_plain_tokens_per_s"]
        assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0
        profile = r["ours"]["profile"]  # train.profile's summary of the 2 steps after the timed ones
        assert profile["steps"] == [5, 6] and profile["top_kernels"], profile
        assert r["ours"]["planner"]["predicted_over_measured"] > 0, r["ours"]["planner"]
    assert report["profile_files"]["copied_to_out"]
    experts = parts["experts"]["results"][0]
    assert parts["experts"]["status"] == "ok" and experts["grouped_mm_vs_loop"] > 0
    assert all(p.get("wall_s", 0) >= 0 for p in parts.values()) and report["wall_s"] > 0
    md = (tmp_path / "gpu_pass.md").read_text()
    assert "| text | auto |" in md and "| text | torch |" in md and "| omni | skipped |" in md
    assert proc.stdout.rstrip().endswith(md.rstrip())
    assert (tmp_path / "logs" / "text.out").read_text().strip()


def _part(results: list[dict], **extra) -> dict:
    return {"status": "ok", "wall_s": 1.0, "results": results, **extra}


def test_table_renders_the_gpu_parts():
    """kernels.py's and expert_compute.py's JSON shapes, a GPU profile summary and a profiler rerun."""
    step = {
        "ours": {
            "kernels": "auto",
            "tokens_per_s": 41200.0,
            "mfu": 0.27,
            "planner": {"predicted_over_measured": 0.9},
            "profile": {"gpu_busy_share": 0.96, "host_syncs_per_step": 0.0, "sync_forcing_ops_per_step": 0.0,
                        "top_kernels_kind": "cuda_kernel", "top_kernels": [{"name": "sm90_gemm", "share": 0.4}]},
        },
        "plain": {"tokens_per_s": 38300.0},
        "ours_over_plain_tokens_per_s": 41200 / 38300,
    }  # fmt: skip
    failed = {
        "ours": {"kernels": "torch", "tokens_per_s": 1.0, "planner": {"error": "ValueError: no steps"}},
        "plain": {"tokens_per_s": 2.0},
        "ours_over_plain_tokens_per_s": 0.5,
    }
    timing = {"torch_ms": 1.0, "liger_ms": 0.62, "ratio_liger_over_torch": 0.62, "max_rel_err": 1e-3}
    head = {"rows": 8192, "all_logits": {"peak_gib": 14.9, "ms": 56.0}, "chunked_4096": {"peak_gib": 10.1, "ms": 64.0},
            "liger_chunked_4096": "out of memory"}  # fmt: skip
    report = {
        "device": "NVIDIA H200",
        "small": False,
        "versions": {"torch": "2.11.0+cu130", "transformers": "5.23.0", "liger-kernel": "0.8.5"},
        "parts": {
            "pytest": {"status": "failed", "wall_s": 20.0, "counts": {"passed": 9, "failed": 1}, "error_tail": "x\nboom"},
            "text": _part([step]),
            "omni": _part([failed], profiled_attempt_failed={"wall_s": 3.0}),
            "kernels": _part([{"kernels": {"rms_norm": timing}, "loss_head": [head]}]),
            "experts": _part([{"dtype": "bfloat16", "shape": {"rows": 8192, "experts": 16},
                               "ms_per_fwd_bwd": {"grouped_mm": 1.0, "loop": 5.4}, "grouped_mm_vs_loop": 5.4}]),
        },
    }  # fmt: skip
    md = gpu_pass.table(report)
    assert "| text | auto | 41.2K | 38.3K | 1.08x | 0.27 | 0.960 | 0 | 0 | 0.90 |" in md
    assert (
        "| omni | torch | 1 | 2 | 0.50x | - | profiler failed | profiler failed | profiler failed | error |"
        in md
    )
    assert "Top cuda_kernels (text, auto): sm90_gemm 40%" in md
    assert "| rms_norm | 0.62 | 1.0e-03 |" in md
    assert "| 8192 | 56 / 14.9 | 64 / 10.1 | out of memory |" in md
    assert "grouped_mm 1.0 ms, loop 5.4 ms: 5.4x" in md
    assert "pytest -m gpu: 9 passed, 1 failed" in md and "| pytest | failed | 20.0 | boom |" in md


def test_output_parsing_and_profiler_rerun():
    assert gpu_pass.json_objects('log line {"a": 1}\n{"b": {"c": 2}}\n{\n "d": [1,\n 2]\n}\nend') == [
        {"b": {"c": 2}},
        {"d": [1, 2]},
    ]
    assert gpu_pass.pytest_counts("..\n9 passed, 1 skipped, 2 deselected in 21.03s\n") == {
        "passed": 9,
        "skipped": 1,
        "deselected": 2,
    }
    text = next(p for p in gpu_pass.plan(False, Path("/w")) if p.name == "text")
    assert "--profile" not in gpu_pass.without_profile(text).argv
    assert gpu_pass.without_profile(text).argv[-2:] == ("--workload", "text")
    crashed = {"results": [{"error": "omni-train run failed (text):\n... omni_train/profiling.py ..."}]}
    other = {"results": [{"error": "plain loop failed"}, {"error": "CUDA out of memory", "ours": {}}]}
    assert gpu_pass.profiler_failed(crashed) and not gpu_pass.profiler_failed(other)
    for part in gpu_pass.plan(False, Path("/w")):  # every script the GPU pass runs exists
        assert part.argv[0] == "-m" or (ROOT / part.argv[0]).is_file(), part


def test_every_wheel_has_one_locked_version():
    versions = gpu_wheels.locked_versions(ROOT / "uv.lock", [*gpu_wheels.ALWAYS, *gpu_wheels.IF_MISSING])
    assert set(versions) == {*gpu_wheels.ALWAYS, *gpu_wheels.IF_MISSING} and all(versions.values())
    assert (
        gpu_wheels.wheel_name(Path(f"pydantic_core-{versions['pydantic-core']}-cp312-x.whl"))
        == "pydantic-core"
    )
