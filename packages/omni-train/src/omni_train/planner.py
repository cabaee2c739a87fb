"""`omni-train plan`: the layouts of a recipe for N devices, those that fit, ranked by predicted step time.

Every candidate keeps the recipe's model and its tokens per optimizer step (max_tokens x
micro_batches_per_step x data-parallel ranks, at the recipe's sp), and varies dp_replicate, dp_shard,
sp, ep, recompute, parameter / activation offload and the tokens per micro-batch (the recipe's, 1/2,
1/4; micro-batches make up the rest). Invalid ones (heads vs sp, experts vs ep: check_layout) are
skipped; the rest get a predicted peak memory (omni_train.memory) and a predicted step time:

    compute     training FLOPs of the rank's tokens (omni_models.flops) and of the micro-batch's media
                (2 x params x units per encoder, 6 x when it trains; shared by the SP ranks with
                encoder_balance sp, else paid by each);
                recompute adds a forward (full: 1/3, selective: 1/30) / (peak FLOP/s x efficiency)
    FSDP        all-gathers (twice when resharding after forward) and the reduce-scatter of each unit per
                micro-batch, and HSDP's all-reduce across replicas; overlapped with compute (the max)
    SP / EP     Ulysses' all-to-alls (q, k, v, output; forward and backward) and the MoE dispatch and
                combine, on the critical path (added)
    offload     parameters, gradients and optimizer states (or activations) over the host link, added

Groups within a node (gpus_per_node) use its fabric, larger ones the network. Device rates are
parameters (DeviceSpec), with defaults for H100 and H200.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from omni_train.config import ConfigError, TrainConfig, check_layout
from omni_train.memory import GIB, ModelFacts, dtype_bytes, estimate_memory, micro_batch_encoder_units

RECOMPUTE_EXTRA = {"none": 0.0, "selective": 1 / 30, "full": 1 / 3}  # of the training FLOPs


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_gib: float
    flops: float  # dense bf16 FLOP/s
    efficiency: float = 0.45  # achieved share of `flops` in the model's matmuls
    intra_node_gbps: float = 360.0  # collective bus bandwidth within a node, GB/s
    inter_node_gbps: float = 45.0  # per device, across nodes
    host_gbps: float = 25.0  # device <-> host
    gpus_per_node: int = 8


DEVICES = {
    "h100": DeviceSpec("H100 SXM", 80.0, 989e12),
    "h200": DeviceSpec("H200 SXM", 141.0, 989e12, intra_node_gbps=400.0),
}


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    sp: int
    ep: int
    recompute: str
    offload: str  # none | params | activations
    max_tokens: int
    micro_batches: int

    def settings(self) -> dict[str, object]:
        return {
            "parallel.dp_replicate": self.dp_replicate,
            "parallel.dp_shard": self.dp_shard,
            "parallel.sp": self.sp,
            "parallel.ep": self.ep,
            "parallel.recompute": self.recompute,
            "parallel.offload_params": self.offload == "params",
            "parallel.offload_activations": self.offload == "activations",
            "data.max_tokens": self.max_tokens,
            "data.micro_batches_per_step": self.micro_batches,
        }

    def overrides(self, cfg: TrainConfig | None = None) -> list[str]:
        """`key=value` for each setting (with `cfg`: those that differ from it)."""
        out = []
        for key, value in self.settings().items():
            section, name = key.split(".")
            if cfg is None or getattr(getattr(cfg, section), name) != value:
                out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return out


@dataclass
class Candidate:
    layout: Layout
    memory_gib: float  # predicted peak per device
    step_s: float  # predicted seconds per optimizer step
    times: dict[str, float]  # seconds by term
    tokens_per_s_per_device: float
    fits: bool


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _apply(base: dict, layout: Layout) -> TrainConfig:
    recipe = {**base, "parallel": {**base.get("parallel", {})}, "data": {**base["data"]}}
    for key, value in layout.settings().items():
        section, name = key.split(".")
        recipe[section][name] = value
    units = base["data"].get("max_encoder_units")
    if units:  # a smaller micro-batch holds proportionally less media
        recipe["data"]["max_encoder_units"] = units * layout.max_tokens // base["data"]["max_tokens"]
    return TrainConfig.model_validate(recipe)


def layouts(cfg: TrainConfig, devices: int, experts: int) -> list[Layout]:
    """Every combination of degrees, recompute, offload and micro-batch size for `devices` ranks that keeps
    the recipe's tokens per step (`experts`: the foundation's, 0 for a dense one: which ep divide them);
    validity against the model's heads is checked later."""
    sp0 = cfg.parallel.sp if devices % cfg.parallel.sp == 0 else 1
    step_tokens = cfg.data.max_tokens * cfg.data.micro_batches_per_step * (devices // sp0)
    out = []
    for sp, dp_replicate in itertools.product(_divisors(devices), _divisors(devices)):
        if devices % (sp * dp_replicate):
            continue
        dp_shard = devices // (sp * dp_replicate)
        dp = dp_replicate * dp_shard
        eps = [e for e in _divisors(dp_shard * sp) if experts % e == 0] if experts else [1]
        for ep, recompute, offload, split in itertools.product(
            eps, ("none", "selective", "full"), ("none", "params", "activations"), (1, 2, 4)
        ):
            tokens = cfg.data.max_tokens // split
            if tokens % sp or step_tokens % (tokens * dp):
                continue
            out.append(
                Layout(
                    dp_replicate, dp_shard, sp, ep, recompute, offload, tokens, step_tokens // (tokens * dp)
                )
            )
    return out


def _collective_s(nbytes: float, group: int, device: DeviceSpec, span_nodes: bool) -> float:
    """A ring collective moving `nbytes` per rank: (g - 1) / g of it over the slowest link."""
    if group <= 1:
        return 0.0
    rate = (device.inter_node_gbps if span_nodes else device.intra_node_gbps) * 1e9
    return nbytes * (group - 1) / group / rate


def predict(
    cfg: TrainConfig, layout: Layout, device: DeviceSpec, facts: ModelFacts
) -> tuple[float, dict[str, float]]:
    """Predicted seconds per optimizer step and its terms (see the module docstring)."""
    from omni_models.flops import transformer_flops

    block, layers = facts.block, facts.layers
    vocab, hidden = facts.head
    pdt = dtype_bytes(cfg.parallel.param_dtype)
    tokens = layout.max_tokens // layout.sp  # per rank per micro-batch
    m = layout.micro_batches
    flops = (
        m
        * transformer_flops(facts.active_params, [layout.max_tokens], layers, block.q_dim, causal=True)
        / layout.sp
    )
    flops += m * 3.0 * 2 * vocab * hidden * tokens  # the LM head
    shared = layout.sp if cfg.parallel.encoder_balance == "sp" else 1  # SP ranks share the media
    units = micro_batch_encoder_units(cfg)  # cfg is the layout's: its max_tokens and encoder units
    for params, trains in facts.encoder_params.values():
        flops += m * (6 if trains else 2) * params * units / shared
    flops *= 1 + RECOMPUTE_EXTRA[layout.recompute]
    compute = flops / (device.flops * device.efficiency)

    per_node = device.gpus_per_node
    shard = layout.dp_shard * layout.sp
    params = facts.params
    gathers = 2 if cfg.parallel.reshard_after_forward else 1
    fsdp = m * (gathers + 1) * _collective_s(params * pdt, shard, device, shard > per_node)
    hsdp = 2 * _collective_s(facts.trainable * 4 / shard, layout.dp_replicate, device, True)

    a2a = 0.0
    if layout.sp > 1:  # q, k, v and the output, forward and backward, per layer
        width = 2 * block.q_dim + 2 * block.kv_dim
        a2a += m * layers * 2 * _collective_s(tokens * width * pdt, layout.sp, device, layout.sp > per_node)
    if layout.ep > 1:  # dispatch and combine of every routed copy, forward and backward
        routed = tokens * block.top_k * hidden * pdt
        a2a += m * layers * 4 * _collective_s(routed, layout.ep, device, layout.ep > per_node)

    host = 0.0
    if layout.offload == "params":  # states stream to and from the host each step
        host = 3 * params * 4 / shard / (device.host_gbps * 1e9)
    elif layout.offload == "activations":  # saved activations out in forward, back in backward
        saved = block.saved(layout.recompute) * tokens * pdt * layers
        host = m * 2 * saved / (device.host_gbps * 1e9)
    times = {"compute": compute, "fsdp": fsdp + hsdp, "sp_ep": a2a, "offload": host}
    return max(compute, fsdp + hsdp) + a2a + host, times


def plan(cfg: TrainConfig, devices: int, device: DeviceSpec) -> tuple[list[Candidate], list[Candidate]]:
    """(feasible candidates fastest first, infeasible ones) for `devices` of `device`."""
    from omni_train.assembly import meta_model

    facts = ModelFacts.of(meta_model(cfg.model_spec), cfg.model_spec)
    base = cfg.model_dump(mode="json")
    feasible, infeasible = [], []
    valid: dict[tuple[int, int], bool] = {}  # (sp, ep) -> whether the model allows it
    for layout in layouts(cfg, devices, facts.block.experts):
        try:
            candidate_cfg = _apply(base, layout)
        except ValueError:  # a setting the recipe's validation rejects
            continue
        key = (layout.sp, layout.ep)
        if key not in valid:
            try:
                check_layout(candidate_cfg, devices)
                valid[key] = True
            except ConfigError:
                valid[key] = False
        if not valid[key]:
            continue
        memory = estimate_memory(candidate_cfg, devices, facts).peak / GIB
        step_s, times = predict(candidate_cfg, layout, device, facts)
        rate = layout.max_tokens * layout.micro_batches / layout.sp / step_s
        c = Candidate(layout, memory, step_s, times, rate, memory <= device.memory_gib)
        (feasible if c.fits else infeasible).append(c)
    feasible.sort(key=lambda c: c.step_s)
    return feasible, infeasible


def format_plan(
    cfg: TrainConfig,
    feasible: list[Candidate],
    infeasible: list[Candidate],
    devices: int,
    device: DeviceSpec,
    top: int,
) -> str:
    head = (
        f"{devices} x {device.name} ({device.memory_gib:g} GiB each): {len(feasible) + len(infeasible)} valid "
        f"layouts, {len(feasible)} fit, {len(infeasible)} predicted over the budget"
    )
    cols = (
        f"{'#':>2} {'dp_rep':>6} {'dp_shard':>8} {'sp':>3} {'ep':>3} {'recompute':>9} {'offload':>11} "
        f"{'tokens x mb':>12} {'peak GiB':>9} {'step s':>8} {'tok/s/dev':>10}  compute/fsdp/sp+ep/offload s"
    )
    lines = [head, "", cols]
    for i, c in enumerate(feasible[:top], 1):
        x, t = c.layout, c.times
        lines.append(
            f"{i:>2} {x.dp_replicate:>6} {x.dp_shard:>8} {x.sp:>3} {x.ep:>3} {x.recompute:>9} {x.offload:>11} "
            f"{f'{x.max_tokens} x {x.micro_batches}':>12} {c.memory_gib:>9.1f} {c.step_s:>8.3f} "
            f"{c.tokens_per_s_per_device:>10.0f}  "
            + "/".join(f"{t[k]:.3f}" for k in ("compute", "fsdp", "sp_ep", "offload"))
        )
    if not feasible:
        least = min(infeasible, key=lambda c: c.memory_gib, default=None)
        lines.append(
            "no layout fits"
            + (f"; the smallest predicted peak is {least.memory_gib:.1f} GiB" if least else "")
        )
    for i, c in enumerate(feasible[:top], 1):
        lines.append(
            f"{i}: " + (" ".join(f"--set {o}" for o in c.layout.overrides(cfg)) or "the recipe as it is")
        )
    return "\n".join(lines)
