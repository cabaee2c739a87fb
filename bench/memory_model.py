"""The memory model (omni_train.memory) against measured peaks of real CPU training steps.

    uv run python bench/memory_model.py [--only NAME ...]

Each run builds a recipe's model as training does (omni_train.assembly: meta -> parallelize -> materialize,
AdamW), runs one step, then measures the next step (forward + backward of the trainer's
`forward_backward`, gradient clipping at train.grad_clip, optimizer step; the quickstart run: the
trainer's own step, Trainer._step) under torch's MemTracker: the peak of live tensor
bytes on rank 0 (parameters, gradients, optimizer states, activations, temporaries), the CPU analogue
of `torch.cuda.max_memory_allocated`. The runs differ in dims (hidden, layers, vocab, tokens), layout
(1-2 ranks: FSDP, SP, EP, no resharding) and recompute / loss chunking / accumulation; one is the
quickstart omni model with a wider vision tower on a real micro-batch of its data (images, videos,
audio, drawings; the dataset is built first if missing), predicted for that batch's encoder units and
loss rows. Prints a table and one JSON object; every run should be within 25% of its prediction.
"""

from __future__ import annotations

import argparse
import json

import torch
from quickstart_wide import wide_vision_recipe

from omni_dist.spawn import run_ranks

GIB = 2**30


MOE = {"name": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256}


def _recipe(hidden: int, layers: int, vocab: int, tokens: int, parallel: dict, train: dict) -> dict:
    foundation = dict(train.pop("foundation", {"name": "qwen2"}))
    name = foundation.pop("name")
    micro = train.pop("micro_batches_per_step", 1)
    return {
        "model": {
            "foundation": {
                "name": name,
                "config": foundation
                | {
                    "vocab_size": vocab,
                    "hidden_size": hidden,
                    "intermediate_size": hidden * 11 // 4,
                    "num_hidden_layers": layers,
                    "num_attention_heads": hidden // 64,
                    "num_key_value_heads": 2,
                    "max_position_embeddings": tokens,
                    "tie_word_embeddings": False,
                },
            }
        },
        "data": {
            "tokenizer": "unused",
            "sources": [{"kind": "jsonl", "paths": "unused.jsonl"}],
            "max_tokens": tokens,
            "micro_batches_per_step": micro,
        },
        "parallel": parallel,
        "train": {"loss_chunk": 1024, **train},
    }


RUNS = {  # name -> (ranks, hidden, layers, vocab, tokens, parallel, train)
    "h512-l4-1rank": (1, 512, 4, 8192, 2048, {}, {}),
    "h512-l4-fsdp2": (2, 512, 4, 8192, 2048, {}, {}),
    "h768-l2-sp2": (2, 768, 2, 8192, 4096, {"sp": 2}, {}),
    "h512-l6-full-recompute": (1, 512, 6, 8192, 4096, {"recompute": "full"}, {}),
    "h512-l6-selective": (1, 512, 6, 8192, 4096, {"recompute": "selective"}, {}),
    "h256-l4-all-logits": (1, 256, 4, 32768, 2048, {}, {"loss_chunk": 0}),
    "h1024-l2-keep-gathered": (2, 1024, 2, 8192, 2048, {"reshard_after_forward": False}, {}),
    "h512-l4-2-micro-batches": (1, 512, 4, 8192, 2048, {}, {"micro_batches_per_step": 2}),
    "moe-h512-l2-ep2": (2, 512, 2, 8192, 2048, {"ep": 2}, {"foundation": MOE}),
}


def _measure(recipe: dict) -> dict:
    import torch.distributed as dist
    from torch.distributed._tools.mem_tracker import MemTracker

    from omni_dist import ParallelMesh
    from omni_dist.grad_norm import clip_grad_norm_
    from omni_dist.packed import pack, pad_for_sp
    from omni_train.assembly import build_model, build_optimizer, sequence_parallel, trainable_parameters
    from omni_train.config import TrainConfig
    from omni_train.memory import estimate_memory, loss_head
    from omni_train.trainer import forward_backward

    cfg = TrainConfig.model_validate(recipe)
    world = dist.get_world_size()
    mesh = ParallelMesh.build(cfg.dims(world), device_type="cpu")
    sp = sequence_parallel(cfg, mesh)
    device = torch.device("cpu")
    model = build_model(cfg, mesh, device).model
    optimizer, _ = build_optimizer(cfg, model, device)
    params = trainable_parameters(model)
    vocab, tokens = model.foundation.config.vocab_size, cfg.data.max_tokens
    gen = torch.Generator().manual_seed(mesh.dp_rank)
    lengths = [tokens // 2, tokens // 4, tokens // 4]  # three documents fill the micro-batch
    batch = pad_for_sp(pack([torch.randint(vocab, (n,), generator=gen) for n in lengths]), cfg.parallel.sp)

    def step(tracker=None) -> None:
        for _ in range(cfg.data.micro_batches_per_step):  # gradients accumulate over the calls
            forward_backward(model, [batch], mesh, sp, device)
            if tracker is not None:
                tracker.reset_mod_stats()  # MemTracker follows one module call at a time; peaks stay
        clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer states exist from here on
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step(tracker)
    snapshot = tracker.get_tracker_snapshot("peak")[device]
    peak = snapshot.pop("Total")
    kinds = {str(getattr(k, "value", k)): round(v / GIB, 4) for k, v in snapshot.items() if v}
    labelled = batch.num_label_tokens // (cfg.parallel.sp or 1)
    estimate = estimate_memory(cfg, world, labelled=labelled, head=loss_head(cfg, liger=False))  # CPU: torch
    return {
        "measured": peak,
        "measured_by_kind_gib": kinds,
        "predicted": estimate.peak,
        "parts": estimate.lines(),
    }


class _NoHook:
    def remove(self) -> None:
        return None


def _frozen_aware_tracker():
    """torch's MemTracker hooks the gradient of every parameter a module call holds, which fails on frozen
    ones (the quickstart's VQ-VAE); they get no hook (they get no gradient either)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for q in module.parameters():
                if not q.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(q, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return Tracker()


def _measure_omni(config: dict) -> dict:
    from omni_data.loader import Step
    from omni_train.config import TrainConfig
    from omni_train.memory import estimate_memory, loss_head
    from omni_train.trainer import Trainer, local_label_tokens

    cfg = TrainConfig.model_validate(config)
    trainer = Trainer(cfg)
    model, device = trainer.model, trainer.device
    steps = iter(trainer.loader)

    def units(batch) -> dict[str, int]:
        return {
            name: sum(int(batch.media[m].encoder_units.sum()) for m in e.modalities if m in batch.media)
            for name, e in model.encoders.items()
        }

    batch = max((next(steps).micro_batches[0] for _ in range(8)), key=lambda b: units(b)["vision"])
    step = Step([batch], epoch=0)
    trainer._step(step)  # the trainer's own step; optimizer states exist from here on
    tracker = _frozen_aware_tracker()
    tracker.track_external(model, trainer.optimizer)
    with tracker:
        trainer._step(step)
    snapshot = tracker.get_tracker_snapshot("peak")[device]
    peak = snapshot.pop("Total")
    kinds = {str(getattr(k, "value", k)): round(v / GIB, 4) for k, v in snapshot.items() if v}
    labelled = local_label_tokens([batch], trainer.sp)
    head = loss_head(cfg, liger=False)  # CPU: torch kernels
    estimate = estimate_memory(cfg, 1, labelled=labelled, encoder_units=units(batch), head=head)
    return {
        "measured": peak,
        "measured_by_kind_gib": kinds,
        "predicted": estimate.peak,
        "parts": estimate.lines(),
        "encoder_units": units(batch),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="run only these (names from the table)")
    args = ap.parse_args()
    rows = []
    for name, (ranks, hidden, layers, vocab, tokens, parallel, train) in RUNS.items():
        if args.only and name not in args.only:
            continue
        recipe = _recipe(hidden, layers, vocab, tokens, parallel, train)
        result = run_ranks(_measure, ranks, args=(recipe,), timeout_s=900, threads_per_rank=2 // ranks)[0]
        rows.append(_row(name, ranks, result))
    if not args.only or "quickstart-wide-vision" in args.only:
        result = run_ranks(
            _measure_omni,
            1,
            args=(wide_vision_recipe("/tmp/omni-bench-memory"),),
            timeout_s=900,
            threads_per_rank=2,
            init_process_group=False,
        )[0]
        rows.append(_row("quickstart-wide-vision", 1, result))
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(json.dumps({"runs": rows, "worst_relative_error": round(worst, 3), "within_25pct": worst <= 0.25}))


def _row(name: str, ranks: int, result: dict) -> dict:
    ratio = result["predicted"] / result["measured"]
    print(
        f"{name:<26} ranks {ranks}  measured {result['measured'] / GIB:7.3f} GiB  "
        f"predicted {result['predicted'] / GIB:7.3f} GiB  ratio {ratio:.2f}",
        flush=True,
    )
    return {"run": name, "ranks": ranks, **result, "ratio": round(ratio, 3)}


if __name__ == "__main__":
    main()
