"""The trainer's profiler: the trace summary's GPU arithmetic on a synthetic trace (exact numbers), and a
real CPU profile of a tiny training loop driven as the trainer drives it."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from omni_train.config import ProfileSection
from omni_train.profiling import StepProfiler, summarize_trace


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _synthetic_trace():
    """Steps 2 [1000, 1100) and 3 [1200, 1300) with kernels on two streams, a gap, host syncs."""
    kernel = lambda name, ts, dur, stream=7: _x("kernel", name, ts, dur, tid=stream)  # noqa: E731
    rt = lambda name, ts, corr=None: _x("cuda_runtime", name, ts, 2, correlation=corr)  # noqa: E731
    return [
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "python"}},
        _x("user_annotation", "ProfilerStep#2", 1000, 100),
        _x("user_annotation", "ProfilerStep#3", 1200, 100),
        _x("gpu_user_annotation", "ProfilerStep#2", 1000, 100, tid=7),  # the GPU copy: not a step
        # step 2: A and B overlap on two streams -> [1000, 1060]; C 10; D crosses the step's end: 5 inside
        kernel("A", 1000, 40),
        kernel("B", 1020, 40, stream=8),
        kernel("C", 1080, 10),
        kernel("D", 1095, 10),
        kernel("E", 1150, 10),  # between the steps: neither busy time nor a top kernel
        # step 3: A 50, then a device-to-host copy 10 (busy, not a kernel)
        kernel("A", 1200, 50),
        _x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 1250, 10, tid=7, correlation=11),
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1262, 0, tid=9, correlation=10),
        _x("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 1263, 0, tid=7, correlation=12),
        _x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 1264, 0, tid=7, correlation=13),
        # host: a synchronize in step 2; in step 3 a pinned upload (async), a device-to-device cudaMemcpy,
        # `.item()` (pageable copy + synchronize: one sync), a lone pageable download (one sync)
        rt("cudaLaunchKernel", 1001),
        rt("cudaStreamSynchronize", 1070),
        rt("cudaDeviceSynchronize", 1150),  # between the steps
        rt("cudaMemcpyAsync", 1205, corr=10),
        rt("cudaMemcpy", 1210, corr=12),
        rt("cudaMemcpyAsync", 1240, corr=11),
        rt("cudaGetDevice", 1243),  # transparent between a copy and its synchronize
        rt("cudaStreamSynchronize", 1255),
        rt("cudaMemcpyAsync", 1280, corr=13),
        rt("cudaLaunchKernel", 1285),
        # `.item()` is aten::item around aten::_local_scalar_dense: one read; nonzero in step 3
        _x("cpu_op", "aten::item", 1010, 10),
        _x("cpu_op", "aten::_local_scalar_dense", 1012, 3),
        _x("cpu_op", "aten::nonzero", 1220, 10),
        _x("cpu_op", "aten::is_nonzero", 1120, 5),  # between the steps
    ]


def test_summary_of_a_synthetic_gpu_trace(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": _synthetic_trace()}))
    s = summarize_trace(path)
    assert s["steps"] == [2, 3] and s["steps_profiled"] == 2 and s["step_ms"] == [0.1, 0.1]
    assert s["wall_ms_per_step"] == pytest.approx(0.1)
    # busy: step 2 60 + 10 + 5, step 3 50 + 10 = 135 us of 200
    assert s["gpu_busy_share"] == pytest.approx(135 / 200) and s["gpu_busy_ms_per_step"] == pytest.approx(
        0.0675
    )
    assert s["host_syncs"] == {
        "cudaStreamSynchronize": 2,
        "cudaMemcpyAsync: Memcpy DtoH (Device -> Pageable)": 1,
    }
    assert s["host_syncs_per_step"] == 1.5
    assert (
        s["sync_forcing_ops"] == {"aten::item": 1, "aten::nonzero": 1} and s["sync_forcing_ops_per_step"] == 1
    )
    assert s["top_kernels_kind"] == "cuda_kernel"
    top = {k["name"]: k for k in s["top_kernels"]}
    assert list(top) == ["A", "B", "C", "D"]  # by device time: 90, 40, 10, 10 us
    assert top["A"]["share"] == pytest.approx(90 / 150) and top["A"]["calls_per_step"] == 1
    assert top["A"]["ms_per_step"] == pytest.approx(0.045)
    # one step of the two
    one = summarize_trace(path, steps=[2])
    assert one["steps"] == [2] and one["gpu_busy_share"] == pytest.approx(0.75)
    assert one["host_syncs"] == {"cudaStreamSynchronize": 1} and one["sync_forcing_ops"] == {"aten::item": 1}
    with pytest.raises(ValueError, match="no ProfilerStep#N annotation for steps"):
        summarize_trace(path, steps=[7])


def _train(profiler: StepProfiler, steps: int, fail_at: int | None = None) -> None:
    """A tiny loop that calls the profiler where the trainer does; `.item()` once per step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        for step in range(1, steps + 1):
            profiler.step_started(step)
            x = torch.randn(8, 16)
            loss = model(x).pow(2).mean()
            loss.backward()
            if step == fail_at:
                raise RuntimeError("boom")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # the step's one read of its numbers
            profiler.step_ended(step)
    finally:
        profiler.close()


def test_profiler_in_a_cpu_training_loop(tmp_path, caplog):
    section = ProfileSection(steps=(2, 4))
    profiler = StepProfiler(section, tmp_path, torch.device("cpu"), rank=0)
    assert profiler.dir == tmp_path / "profile"
    with caplog.at_level(logging.INFO, logger="omni_train"):
        _train(profiler, steps=5)
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    marks = [e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"]
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= set(marks) and "ProfilerStep#4" not in marks
    s = json.loads((tmp_path / "profile" / "summary_rank0.json").read_text())
    assert s == profiler.summary
    assert s["steps"] == [2, 3] and s["steps_profiled"] == 2 and s["requested_steps"] == [2, 4]
    assert s["top_kernels_kind"] == "cpu_op" and "aten::addmm" in {k["name"] for k in s["top_kernels"]}
    assert sum(k["share"] for k in s["top_kernels"]) <= 1 + 1e-9 and s["wall_ms_per_step"] > 0
    assert s["gpu_busy_share"] is None and s["host_syncs_per_step"] == 0 and "CPU run" in s["notes"][0]
    assert s["sync_forcing_ops"] == {"aten::item": 2} and s["sync_forcing_ops_per_step"] == 1
    assert any("profile of steps 2-3 (rank 0)" in r.message for r in caplog.records)

    # Another rank, a directory of its own, a run that fails inside the window: the steps that ended.
    section = ProfileSection(steps=(2, 10), dir=str(tmp_path / "elsewhere"))
    profiler = StepProfiler(section, tmp_path, torch.device("cpu"), rank=1)
    with pytest.raises(RuntimeError, match="boom"):
        _train(profiler, steps=5, fail_at=4)
    assert profiler.summary["steps"] == [2, 3] and profiler.summary["rank"] == 1
    assert (tmp_path / "elsewhere" / "trace_rank1.json").exists()
    assert (tmp_path / "elsewhere" / "summary_rank1.json").exists()

    # No section: nothing is profiled or written.
    profiler = StepProfiler(None, tmp_path / "off", torch.device("cpu"), rank=0)
    _train(profiler, steps=2)
    assert profiler.summary is None and not (tmp_path / "off").exists()


def test_profile_steps_are_validated():
    with pytest.raises(ValidationError, match="1 <= a < b"):
        ProfileSection(steps=(3, 3))
    with pytest.raises(ValidationError, match="1 <= a < b"):
        ProfileSection(steps=(0, 2))


@pytest.mark.gpu
def test_profiler_on_cuda_counts_the_item_sync(tmp_path):
    """On a GPU: kernels, a busy share, and exactly one host sync per step (the loop's `.item()`)."""
    device = torch.device("cuda")
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    profiler = StepProfiler(ProfileSection(steps=(3, 6)), tmp_path, device, rank=0)
    try:
        for step in range(1, 7):
            profiler.step_started(step)
            x = torch.randn(512, 256, device=device)
            loss = model(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            profiler.step_ended(step)
    finally:
        profiler.close()
    s = profiler.summary
    assert s["steps"] == [3, 4, 5] and s["top_kernels_kind"] == "cuda_kernel" and s["top_kernels"]
    assert 0 < s["gpu_busy_share"] <= 1
    assert s["host_syncs_per_step"] == 1, s["host_syncs"]
    assert s["sync_forcing_ops"] == {"aten::item": 3}, s["sync_forcing_ops"]
