"""liger's kernels vs the torch path on one GPU, and the loss head's peak memory, in the same run.

    python bench/kernels.py [--tokens 8192] [--hidden 3584] [--intermediate 18944] [--vocab 152064]
                            [--head-tokens 8192 32768] [--repeats 20]

Per kernel, forward + backward in bf16 (medians of `--repeats` after warm-up, CUDA-synchronised), the
time ratio liger / torch and the largest relative difference of output and input gradients:
- rms_norm: HF's Qwen2RMSNorm vs the swapped KernelRMSNorm (liger), on (tokens, hidden);
- swiglu: HF's Qwen2MLP vs SwiGLUMLP (liger's silu-mul), the whole MLP;
- rope: HF's apply_rotary_pos_emb vs liger's rope, on q/k of Qwen2-7B's heads (28/4 of 128);
- decoder layer: a Qwen2-7B-shaped layer, HF's vs all three swapped, sdpa attention.
Loss head at each `--head-tokens` (all rows labelled, vocab `--vocab`, bf16 weights): peak memory above
the inputs (torch.cuda.max_memory_allocated) and time of all logits at once, the chunked head
(omni_dist.loss_head, chunk 4096) with torch's and with liger's chunk kernel; a path that runs out of memory
is reported as such. Prints one JSON object; needs CUDA and liger-kernel (the `gpu` extra).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys

import torch
import torch.nn.functional as F


def _timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _compare(ref_fn, liger_fn, inputs: list[torch.Tensor], repeats: int) -> dict:
    """Forward + backward of both on the same inputs (and the same output gradient)."""
    grad = None
    results = []
    for fn in (ref_fn, liger_fn):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        out = fn(*xs)
        out = torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out
        grad = torch.randn_like(out) if grad is None else grad
        out.backward(grad)
        results.append((out.detach(), [x.grad for x in xs]))

        def step(fn=fn, grad=grad):
            ys = [x.detach().requires_grad_() for x in inputs]
            o = fn(*ys)
            o = torch.cat([t.flatten() for t in o]) if isinstance(o, tuple) else o
            o.backward(grad)

        results[-1] += (_timed(step, repeats),)
    (ref, ref_grads, ref_s), (got, got_grads, got_s) = results
    return {
        "torch_ms": round(ref_s * 1e3, 3),
        "liger_ms": round(got_s * 1e3, 3),
        "ratio_liger_over_torch": round(got_s / ref_s, 3),
        "max_rel_err": max(
            [_rel(got, ref)] + [_rel(g, r) for g, r in zip(got_grads, ref_grads, strict=True)]
        ),
    }


def _kernels(args, kernels) -> dict:
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2DecoderLayer,
        Qwen2MLP,
        Qwen2RMSNorm,
        Qwen2RotaryEmbedding,
        apply_rotary_pos_emb,
    )

    from omni_dist.kernel_swap import swap_kernels
    from omni_dist.plan import ParallelPlan

    dev, bf16 = "cuda", torch.bfloat16
    cfg = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=28,
                      num_key_value_heads=4, attn_implementation="sdpa")  # fmt: skip
    swaps = kernels.swaps()
    x = torch.randn(1, args.tokens, args.hidden, device=dev, dtype=bf16)
    out = {}

    norm = Qwen2RMSNorm(args.hidden, cfg.rms_norm_eps).to(dev, bf16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    out["rms_norm"] = _compare(norm, swaps["rms_norm"](copy.deepcopy(norm)), [x], args.repeats)

    mlp = Qwen2MLP(cfg).to(dev, bf16)
    out["swiglu"] = _compare(mlp, swaps["swiglu"](copy.deepcopy(mlp)), [x], args.repeats)

    head_dim = args.hidden // 28
    q = torch.randn(1, 28, args.tokens, head_dim, device=dev, dtype=bf16)
    k = torch.randn(1, 4, args.tokens, head_dim, device=dev, dtype=bf16)
    positions = torch.arange(args.tokens, device=dev)[None]
    cos, sin = Qwen2RotaryEmbedding(cfg).to(dev)(x, positions)
    out["rope"] = _compare(
        lambda a, b: apply_rotary_pos_emb(a, b, cos, sin), lambda a, b: kernels.rope(a, b, cos, sin), [q, k],
        args.repeats,
    )  # fmt: skip

    layer = Qwen2DecoderLayer(cfg, 0).to(dev, bf16)
    swapped = copy.deepcopy(layer)
    plan = ParallelPlan(kernels={"Qwen2RMSNorm": "rms_norm", "Qwen2MLP": "swiglu", "Qwen2Attention": "rope"})
    wrapper = torch.nn.ModuleDict({"layer": swapped})
    swap_kernels(wrapper, plan.match_kernels(wrapper), swaps)
    out["decoder_layer"] = _compare(
        lambda h: layer(h, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions),
        lambda h: wrapper["layer"](h, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions),
        [x], args.repeats,
    )  # fmt: skip
    return out


def _loss_head(args, kernels, rows: int) -> dict:
    from omni_dist.loss_head import head_cross_entropy

    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=dev, dtype=bf16)
    torch.nn.init.normal_(head.weight, std=0.02, generator=g)
    hidden = torch.randn(rows, args.hidden, device=dev, dtype=bf16, generator=g)
    targets = torch.randint(0, args.vocab, (rows,), device=dev, generator=g)
    paths = {
        "all_logits": lambda h: F.cross_entropy(head(h).float(), targets, reduction="sum"),
        "chunked_4096": lambda h: head_cross_entropy(head, h, targets, 4096),
        "liger_chunked_4096": lambda h: head_cross_entropy(
            head, h, targets, 4096, kernels.chunk_cross_entropy
        ),
    }
    out = {"rows": rows, "logits_fp32_gib": round(rows * args.vocab * 4 / 2**30, 2)}
    for name, loss_fn in paths.items():
        head.weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

        def step(loss_fn=loss_fn):
            h = hidden.detach().requires_grad_()
            loss_fn(h).backward()

        try:
            seconds = _timed(step, max(3, args.repeats // 4))
        except torch.OutOfMemoryError:
            out[name] = "out of memory"
            continue
        out[name] = {
            "peak_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 3),
            "ms": round(seconds * 1e3, 2),
        }
    for name in ("chunked_4096", "liger_chunked_4096"):
        if isinstance(out[name], dict) and isinstance(out["all_logits"], dict):
            out[f"{name}_over_all_logits"] = {
                "memory": round(out[name]["peak_gib"] / out["all_logits"]["peak_gib"], 4),
                "time": round(out[name]["ms"] / out["all_logits"]["ms"], 3),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--intermediate", type=int, default=18944)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--head-tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    from omni_models.kernels import liger_status, select_kernels

    status = liger_status("cuda" if torch.cuda.is_available() else "cpu")
    if status != "ok":
        sys.exit(f"bench/kernels.py compares liger's kernels on a GPU: {status}")
    kernels = select_kernels("liger", "cuda")
    result = {
        "device": torch.cuda.get_device_name(),
        "args": vars(args),
        "kernels": _kernels(args, kernels),
        "loss_head": [_loss_head(args, kernels, rows) for rows in args.head_tokens],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
