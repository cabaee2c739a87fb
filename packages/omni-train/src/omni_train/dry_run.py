"""`--dry-run`: the resolved config, mesh, plan, parameters and predicted per-rank memory
(omni_train.memory), without starting any process.

The model is built on the meta device (no memory), so recipes at real scale validate on a laptop.
"""

from __future__ import annotations

from collections import Counter

from omni_train.config import TrainConfig, check_layout, dump
from omni_train.memory import ModelFacts, estimate_memory, loss_head


def describe(cfg: TrainConfig, world_size: int) -> str:
    from omni_models.parallel import omni_plan
    from omni_train.assembly import meta_model

    check_layout(cfg, world_size)
    dims = cfg.dims(world_size)
    model = meta_model(cfg.model_spec)
    plan = omni_plan(model, cfg.model_spec)
    units = Counter(
        u.split(".")[0] if not u.startswith(("encoders", "projectors")) else ".".join(u.split(".")[:2])
        for u in plan.fsdp_units
    )
    shard = dims.dp_shard * dims.sp
    lines = [
        "# resolved config",
        dump(cfg).rstrip(),
        "",
        "# layout",
        f"world {world_size}: dp_replicate={dims.dp_replicate} dp_shard={dims.dp_shard} sp={dims.sp} "
        f"ep={dims.ep} (dense weights sharded over {shard} ranks, replicated {dims.dp_replicate}x)",
        "",
        "# plan (FSDP units per part)",
    ]
    lines += [f"{part}: {n}" for part, n in sorted(units.items())]
    if plan.expert_params:
        lines.append(f"expert-parallel tensors: {len(plan.expert_params)} ({plan.expert_forward})")
    lines += ["", "# parameters"]
    for part, module in [
        ("foundation", model.foundation),
        *[(f"encoders.{n}", m) for n, m in model.encoders.items()],
        *[(f"projectors.{n}", m) for n, m in model.projectors.items()],
    ]:
        params = sum(p.numel() for p in module.parameters())
        if params == 0:  # an identity projector (the tower's own merger projects)
            continue
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        state = "trainable" if trainable == params else ("frozen" if trainable == 0 else "partly frozen")
        lines.append(f"{part}: {params / 1e9:.3f}B params ({state})")
    # the fused CE runs with `kernels: liger`; `auto` resolves on the run's device (counted as chunked)
    head = loss_head(cfg, liger=cfg.parallel.kernels == "liger")
    lines += [
        "",
        f"# predicted memory per rank ({cfg.data.max_tokens} tokens per micro-batch, "
        f"recompute {cfg.parallel.recompute}, compute in {cfg.parallel.param_dtype})",
        *estimate_memory(cfg, world_size, ModelFacts.of(model, cfg.model_spec), head=head).lines(),
    ]
    return "\n".join(lines)
