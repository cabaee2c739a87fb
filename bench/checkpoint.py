"""Checkpoint save/load on CPU with 2 ranks (FSDP2): sync vs async blocked time, size on disk.

    uv run python bench/checkpoint.py [--layers 12] [--hidden 768]

The model, optimizer and LR schedule are built as the trainer builds them (omni_train.assembly, a Qwen2
foundation recipe) and saved after one step. Prints one JSON object. `blocked_s` is the time `save` keeps
the training loop waiting; for async it is compared with the sync save of the same state in the same run.
Size is compared with the bytes of parameters plus optimizer state.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from omni_dist import ParallelMesh
from omni_dist.checkpoint import CheckpointManager, ModelPart, OptimizerPart, RNGPart
from omni_dist.packed import pack
from omni_dist.spawn import run_ranks
from omni_train.assembly import build_model, build_optimizer
from omni_train.config import TrainConfig
from omni_train.trainer import forward_backward


def _recipe(layers: int, hidden: int) -> TrainConfig:
    """A Qwen2 foundation alone; the data section is unused (one hand-made micro-batch)."""
    foundation = {
        "vocab_size": 8192, "hidden_size": hidden, "intermediate_size": hidden * 8 // 3, "num_hidden_layers": layers,
        "num_attention_heads": 12, "num_key_value_heads": 4, "tie_word_embeddings": False, "dtype": "float32",
    }  # fmt: skip
    data = {"tokenizer": "unused", "sources": [{"kind": "jsonl", "paths": "unused.jsonl"}], "max_tokens": 64}
    return TrainConfig.model_validate(
        {"model": {"foundation": {"name": "qwen2", "config": foundation}}, "data": data}
    )


def measure(layers: int, hidden: int, root: str) -> dict:
    cfg, device = _recipe(layers, hidden), torch.device("cpu")
    mesh = ParallelMesh.build(cfg.dims(dist.get_world_size()), device_type="cpu")
    model = build_model(cfg, mesh, device).model  # as the trainer builds it, and its optimizer
    opt, scheduler = build_optimizer(cfg, model, device)
    params = sum(p.numel() for p in model.parameters())  # DTensor parameters count globally
    forward_backward(model, [pack([torch.zeros(8, dtype=torch.long)])], mesh, None, device)
    opt.step()  # the optimizer state exists from here on
    # the trainer's checkpoint parts, less the loader's and its counters (no loader here)
    parts = {
        "model": ModelPart(model),
        "optimizer": OptimizerPart(model, opt),
        "scheduler": scheduler,
        "rng": RNGPart(),
    }
    out = {"params": params}
    for mode in ("sync", "async"):
        manager = CheckpointManager(Path(root) / mode, keep=1, async_save=mode == "async")
        start = time.perf_counter()
        out[f"{mode}_blocked_s"] = manager.save(1, parts)
        manager.wait()
        dist.barrier()
        out[f"{mode}_total_s"] = time.perf_counter() - start
    manager = CheckpointManager(Path(root) / "sync", keep=1)
    start = time.perf_counter()
    manager.load(parts)
    out["load_s"] = time.perf_counter() - start
    out["size_bytes"] = sum(f.stat().st_size for f in (Path(root) / "sync").rglob("*") if f.is_file())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="omni-ckpt-bench-") as root:
        r = run_ranks(measure, 2, args=(args.layers, args.hidden, root), timeout_s=1800)[0]
    state_bytes = r["params"] * 4 * 3  # fp32 parameters + AdamW exp_avg and exp_avg_sq
    print(json.dumps({
        "benchmark": "checkpoint",
        "device": f"cpu ({os.cpu_count()} cores), 2 ranks FSDP2, gloo, local disk",
        "model": f"Qwen2 {args.layers} layers, hidden {args.hidden}, {r['params'] / 1e6:.1f}M params + AdamW state",
        "sync": {"blocked_s": round(r["sync_blocked_s"], 3), "total_s": round(r["sync_total_s"], 3)},
        "async": {"blocked_s": round(r["async_blocked_s"], 3), "total_s": round(r["async_total_s"], 3)},
        "async_blocked_vs_sync": round(r["async_blocked_s"] / r["sync_blocked_s"], 3),
        "load_s": round(r["load_s"], 3),
        "size_vs_param_plus_optimizer_bytes": round(r["size_bytes"] / state_bytes, 3),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
