"""Per-document attention backends on one GPU, forward + backward, against one long causal sequence.

    python bench/attention.py [--tokens 8192 32768] [--repeats 10] [--backends sdpa varlen flex cudnn]

Packed sequences of documents of 300-3000 tokens (seeded; the last one fills up to `--tokens`), bf16,
head size 128, with the heads of a 1.3B Qwen2-like model (16 query / 2 key-value heads, hidden 2048)
and of Qwen2-7B (28 / 4). q/k/v come in the layout HF hands to attention ((H, T, D) memory).
Per case and backend: the median forward+backward time (CUDA events, after warm-up) and TFLOP/s of
the per-document causal work, 7 * Hq * D * sum(l_i^2) (forward 2, backward 5 half-matmuls of causal
attention). The reference is what the plain HF loop runs: one causal sequence of all T tokens through
F.scaled_dot_product_attention (default choice; also forced to cuDNN and to flash), with TFLOP/s of its
own T^2 work and each backend's speed-up over it. flex is also timed with its block mask built
beforehand (`flex_mask_prebuilt`), with the mask build alone and the compile time reported.
Accuracy: max abs error of the output and the q/k/v gradients against a float32 per-document reference
on a small case (documents of 1, 129, 517, ... tokens).
cudnn runs in a child process, started first so that it overlaps flex's compilation: torch 2.11's
cuDNN varlen backward can write out of bounds (pytorch#186142), which would end this process. Its
entry also gives the time of a call with a layout cuDNN has not seen (a new execution graph).
Prints one JSON object; exits 1 if a backend that backend_status calls usable failed. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
HEADS = {"1.3b": (16, 2), "7b": (28, 4)}
DIM = 128
ACCURACY_LENGTHS = [1, 517, 1, 2000, 129, 1, 1447]  # 4096 tokens: single tokens, tile-crossing lengths
DOC_RANGE = (300, 3000)


def layout(tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(*DOC_RANGE), tokens - sum(lengths)))
    return lengths


def packed(lengths: list[int], heads: int, kv_heads: int, seed: int):
    """Leaf (H, T, D) tensors (HF's memory layout), the cu_seqlens and the output gradient."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    leaves = [
        torch.randn(h, total, DIM, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    ]
    grad = torch.randn(total, heads, DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return leaves, cu, grad


def timed(step: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median seconds of `step` on the GPU."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def fwd_bwd(fn, leaves, cu, max_len: int, grad) -> Callable[[], object]:
    def step():
        out = fn(*(x.transpose(0, 1) for x in leaves), cu, max_len, None, True)
        return torch.autograd.grad(out, leaves, grad)

    return step


def reference_step(leaves, grad, backend) -> Callable[[], object]:
    """One causal sequence over all tokens, as HF's SDPA path runs it (enable_gqa, no mask)."""
    from torch.nn.attention import sdpa_kernel

    grad4 = grad.transpose(0, 1)[None]

    def step():
        if backend is None:
            out = F.scaled_dot_product_attention(*(x[None] for x in leaves), is_causal=True, enable_gqa=True)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(
                    *(x[None] for x in leaves), is_causal=True, enable_gqa=True
                )
        return torch.autograd.grad(out, leaves, grad4)

    return step


def accuracy(fn) -> dict[str, float]:
    """Max abs errors of output and gradients against float32 per-document attention."""
    from omni_dist.attention import sdpa_varlen

    leaves, cu, grad = packed(ACCURACY_LENGTHS, *HEADS["1.3b"], seed=1)
    max_len = max(ACCURACY_LENGTHS)
    out = fn(*(x.transpose(0, 1) for x in leaves), cu, max_len, None, True)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    ref = sdpa_varlen(*(x.transpose(0, 1) for x in ref_leaves), cu, max_len, None, True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.float())
    errors = {"out": (out.float() - ref).abs().max().item()}
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        errors[name] = (a.float() - b).abs().max().item()
    errors["ref_out_absmax"] = ref.abs().max().item()
    return {k: round(v, 5) for k, v in errors.items()}


def work(lengths: list[int], heads: int) -> float:
    return 7.0 * heads * DIM * sum(n * n for n in lengths)


def bench_backend(fn, cases, repeats: int) -> dict:
    """Accuracy, then per case the median time and TFLOP/s of one backend (errors recorded, not raised)."""
    result: dict = {}
    try:
        result["accuracy"] = accuracy(fn)
    except Exception as e:  # recorded: the JSON says which backend failed and how
        return {"error": f"{type(e).__name__}: {e}"[:2000]}
    for case in cases:
        leaves, cu, grad = packed(case["lengths"], *HEADS[case["model"]], seed=0)
        try:
            s = timed(fwd_bwd(fn, leaves, cu, max(case["lengths"]), grad), repeats)
        except Exception as e:  # recorded per case
            result[case["key"]] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        flops = work(case["lengths"], HEADS[case["model"]][0])
        result[case["key"]] = {"ms": round(s * 1e3, 3), "tflops": round(flops / s / 1e12, 1)}
    return result


def cases_for(tokens: list[int]) -> list[dict]:
    return [
        {"key": f"{model}/T{t}", "model": model, "tokens": t, "lengths": layout(t, seed=t)}
        for t in tokens
        for model in HEADS
    ]


def cudnn_child(args) -> dict:
    """This process's job with --cudnn-child: the cudnn backend only, plus a never-seen layout's cost."""
    from omni_dist.attention import BACKENDS, backend_status

    fn = BACKENDS["cudnn"]
    result = {
        "status": backend_status("cuda")["cudnn"],
        **bench_backend(fn, cases_for(args.tokens), args.repeats),
    }
    if "error" not in result:
        lengths = layout(args.tokens[0], seed=12345)  # a layout (documents, longest, T) not seen before
        leaves, cu, grad = packed(lengths, *HEADS["1.3b"], seed=0)
        step = fwd_bwd(fn, leaves, cu, max(lengths), grad)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        result["new_layout_first_call_ms"] = round(first * 1e3, 2)
        result["new_layout_steady_ms"] = round(timed(step, args.repeats, warmup=0) * 1e3, 3)
    return result


def start_cudnn_child(args) -> subprocess.Popen:
    cmd = [
        sys.executable,
        __file__,
        "--cudnn-child",
        "--repeats",
        str(args.repeats),
        "--tokens",
        *map(str, args.tokens),
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_cudnn_child(child: subprocess.Popen) -> dict:
    try:
        out, err = child.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        child.kill()
        return {"error": "timed out after 300 s"}
    if child.returncode:
        return {"error": f"child exited with {child.returncode}: {err[-3000:]}"}
    return json.loads(out.strip().splitlines()[-1])


def flex_compile() -> dict[str, float]:
    """Seconds of the first (compiling) forward+backward per head shape; lengths are dynamic."""
    from omni_dist.attention.flex_document import flex_varlen

    seconds = {}
    for model, (heads, kv_heads) in HEADS.items():
        leaves, cu, grad = packed(layout(8192, seed=7), heads, kv_heads, seed=0)
        start = time.perf_counter()
        fwd_bwd(flex_varlen, leaves, cu, 0, grad)()
        torch.cuda.synchronize()
        seconds[model] = round(time.perf_counter() - start, 1)
    return seconds


def flex_mask_costs(cases, repeats: int) -> dict:
    """The document block mask's build alone, and flex with the mask built beforehand."""
    from omni_dist.attention.flex_document import compiled_flex_attention, document_block_mask

    flex = compiled_flex_attention()
    result = {}
    for case in cases:
        heads, kv_heads = HEADS[case["model"]]
        leaves, cu, grad = packed(case["lengths"], heads, kv_heads, seed=0)
        total = sum(case["lengths"])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            mask = document_block_mask(cu, total, True)
        torch.cuda.synchronize()
        build_ms = (time.perf_counter() - start) / repeats * 1e3

        def prebuilt(q, k, v, cu, max_len, scale, causal, mask=mask, gqa=heads != kv_heads):
            out = flex(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=mask, enable_gqa=gqa)
            return out[0].transpose(0, 1)

        s = timed(fwd_bwd(prebuilt, leaves, cu, 0, grad), repeats)
        result[case["key"]] = {
            "mask_build_ms": round(build_ms, 3),
            "mask_prebuilt_ms": round(s * 1e3, 3),
            "mask_prebuilt_tflops": round(work(case["lengths"], heads) / s / 1e12, 1),
        }
    return result


def references(cases, repeats: int) -> dict:
    from torch.nn.attention import SDPBackend

    result = {}
    for case in cases:
        heads, kv_heads = HEADS[case["model"]]
        leaves, _, grad = packed(case["lengths"], heads, kv_heads, seed=0)
        flops = 7.0 * heads * DIM * case["tokens"] ** 2
        row = {}
        for label, backend in (
            ("default", None),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("flash", SDPBackend.FLASH_ATTENTION),
        ):
            try:
                s = timed(reference_step(leaves, grad, backend), repeats)
            except RuntimeError as e:  # a forced kernel that does not take these inputs
                row[label] = {"error": str(e)[:500]}
                continue
            row[label] = {"ms": round(s * 1e3, 3), "tflops": round(flops / s / 1e12, 1)}
        result[case["key"]] = row
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=["sdpa", "varlen", "flex", "cudnn"])
    ap.add_argument("--cudnn-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA device.")
    if args.cudnn_child:
        print(json.dumps(cudnn_child(args)))
        return
    from omni_dist.attention import BACKENDS, backend_status, resolve_backend

    wall = time.perf_counter()
    child = start_cudnn_child(args) if "cudnn" in args.backends else None
    cases = cases_for(args.tokens)
    status = backend_status("cuda")
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "dtype": "bfloat16",
        "head_dim": DIM,
        "heads": {m: {"q": h, "kv": kv} for m, (h, kv) in HEADS.items()},
        "status": status,
        "auto": resolve_backend("auto", "cuda")[0],
        "cases": {
            c["key"]: {"documents": len(c["lengths"]), "sum_l2": sum(n * n for n in c["lengths"])}
            for c in cases
        },
    }
    backends: dict = {}
    flex_ok = "flex" in args.backends and status["flex"] == "ok"
    compile_s = flex_compile() if flex_ok else None  # CPU-bound: overlaps the cudnn child's GPU work
    if child is not None:
        backends["cudnn"] = finish_cudnn_child(child)
    result["reference"] = references(cases, args.repeats)
    for name in args.backends:
        if name == "cudnn":
            continue
        if status[name] != "ok":
            backends[name] = {"skipped": status[name]}
            continue
        backends[name] = bench_backend(BACKENDS[name], cases, args.repeats)
    if flex_ok:
        backends["flex"]["compile_s"] = compile_s
        backends["flex_mask_prebuilt"] = flex_mask_costs(cases, args.repeats)
    for row in backends.values():
        for case in cases:
            entry, ref = row.get(case["key"]), result["reference"][case["key"]]["default"]
            if isinstance(entry, dict) and "ms" in entry and "ms" in ref:
                entry["speedup_vs_reference"] = round(ref["ms"] / entry["ms"], 2)
    result["backends"] = backends
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    print(json.dumps(result, indent=1))
    failed = [n for n, row in backends.items() if status.get(n) == "ok" and _has_error(row)]
    if failed:
        sys.exit(f"usable backends failed: {', '.join(failed)}")


def _has_error(row: dict) -> bool:
    return "error" in row or any(isinstance(v, dict) and "error" in v for v in row.values())


if __name__ == "__main__":
    main()
