"""`omni-train plan`: the layouts of a recipe for N devices, those that fit, ranked by predicted throughput.

Every candidate keeps the recipe's model and its token budget per optimizer step (max_tokens x
micro_batches_per_step x data-parallel ranks, at the recipe's sp), and varies dp_replicate, dp_shard,
sp, ep, recompute, parameter / activation offload and the tokens per micro-batch (the recipe's, 1/2,
1/4; micro-batches make up the rest). Invalid ones (heads vs sp, experts vs ep: check_layout) are
skipped; the rest get a predicted peak memory (omni_train.memory, with the loss head the run computes)
and a predicted step time, and are ranked by real tokens per second:

    compute     training FLOPs of the rank's tokens (omni_models.flops): a micro-batch holds the real
                tokens and sum of squared document lengths that packing the recipe's documents gives
                (omni_train.documents; unknown documents: one per micro-batch), the LM head its rows
                with a loss; and of the micro-batch's media (2 x params x units per encoder, 6 x when it
                trains; shared by the SP ranks with encoder_balance sp, else paid by each);
                recompute adds a forward (full: 1/3, selective: 1/30) / (peak FLOP/s x efficiency)
    FSDP        all-gathers (twice when resharding after forward) and the reduce-scatter of each unit per
                micro-batch, and HSDP's all-reduce across replicas; overlapped with compute (the max)
    SP / EP     Ulysses' all-to-alls (q, k, v, output; forward and backward) and the MoE dispatch and
                combine, on the critical path (added)
    offload     parameters, gradients and optimizer states (or activations) over the host link, added
    fixed       per micro-batch, host work the GPU waits for (DeviceSpec.micro_batch_s); per step, the
                optimizer: fused AdamW and the gradient-norm clip read and write ~40 bytes per trainable
                parameter of the rank's shard in device memory (DeviceSpec.hbm_gbps), added

Groups within a node (gpus_per_node) use its fabric, larger ones the network. Device rates are
parameters (DeviceSpec), with defaults for H100 and H200; `omni_train.calibrate` fits the efficiency to a
measured run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass

from pydantic import BaseModel

from omni_train.config import ConfigError, TrainConfig, check_layout
from omni_train.documents import DocumentLengths, Packing
from omni_train.memory import (
    GIB,
    ModelFacts,
    dtype_bytes,
    estimate_memory,
    loss_head,
    micro_batch_encoder_units,
)

RECOMPUTE_EXTRA = {"none": 0.0, "selective": 1 / 30, "full": 1 / 3}  # of the training FLOPs
OPTIMIZER_BYTES = 40  # per trainable parameter: fused AdamW (fp32 param, grad, 2 moments: 16 read, 12
# written) and the norm clip (grads read, then scaled in place: 12)


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
    hbm_gbps: float = 3350.0  # device memory bandwidth, GB/s (H100 SXM's spec)
    # Host work per micro-batch the GPU waits for: launching forward and backward, FSDP's hooks, the
    # batch's hand-off. One H200 ran a one-micro-batch step of a plain FSDP2 loop (1.3B, 8K tokens) busy
    # 203 of 213 ms; this takes about half of that idle time (the rest: the optimizer step's launches).
    micro_batch_s: float = 0.004


DEVICES = {
    "h100": DeviceSpec("H100 SXM", 80.0, 989e12),
    "h200": DeviceSpec("H200 SXM", 141.0, 989e12, intra_node_gbps=400.0, hbm_gbps=4800.0),
}


def device_named(name: str) -> DeviceSpec:
    """The DEVICES entry a device name (e.g. torch.cuda.get_device_name()) contains, else H100's."""
    return next((spec for key, spec in DEVICES.items() if key in name.lower()), DEVICES["h100"])


@dataclass(frozen=True)
class Layout:
    """A candidate's recipe settings: each field is the recipe key of its name in the section that
    declares it (recipe_keys), so a renamed setting fails here rather than drifting."""

    dp_replicate: int
    dp_shard: int
    sp: int
    ep: int
    recompute: str
    offload_params: bool
    offload_activations: bool
    max_tokens: int
    micro_batches_per_step: int

    @property
    def offload(self) -> str:
        """none | params | activations"""
        return "params" if self.offload_params else "activations" if self.offload_activations else "none"

    @property
    def micro_batches(self) -> int:
        return self.micro_batches_per_step

    def settings(self) -> dict[str, object]:
        return {key: getattr(self, name) for name, key in recipe_keys().items()}

    def overrides(self, cfg: TrainConfig | None = None) -> list[str]:
        """`key=value` for each setting (with `cfg`: those that differ from it; its dp_shard -1 as what it
        resolves to on this layout's devices)."""
        current = {}
        if cfg is not None:
            recipe = _recipe_layout(cfg)
            with contextlib.suppress(ValueError):  # unless the recipe's other degrees do not fit
                recipe = layout_of(cfg, self.dp_replicate * self.dp_shard * self.sp)
            current = recipe.settings()
        return [
            f"{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in self.settings().items()
            if cfg is None or current[key] != value
        ]


@dataclass
class Candidate:
    layout: Layout
    memory_gib: float  # predicted peak per device
    step_s: float  # predicted seconds per optimizer step
    times: dict[str, float]  # seconds by term
    tokens_per_s_per_device: float  # real (packed) tokens
    fits: bool


def recipe_keys() -> dict[str, str]:
    """Layout field -> `section.field`, the TrainConfig section declaring a field of that name."""
    sections = {
        name: f.annotation
        for name, f in TrainConfig.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    }
    keys = {}
    for f in dataclasses.fields(Layout):
        owners = [name for name, section in sections.items() if f.name in section.model_fields]
        if len(owners) != 1:
            raise ConfigError(
                f"planner: Layout.{f.name} must be the field of one recipe section, but {owners or 'none'} "
                "declare it; name it as the setting it varies"
            )
        keys[f.name] = f"{owners[0]}.{f.name}"
    return keys


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
        # offload (params, activations): none, params, activations
        for ep, recompute, offload, split in itertools.product(
            eps, ("none", "selective", "full"), ((False, False), (True, False), (False, True)), (1, 2, 4)
        ):
            tokens = cfg.data.max_tokens // split
            if tokens % sp or step_tokens % (tokens * dp):
                continue
            mb = step_tokens // (tokens * dp)
            out.append(Layout(dp_replicate, dp_shard, sp, ep, recompute, *offload, tokens, mb))
    return out


def _collective_s(nbytes: float, group: int, device: DeviceSpec, span_nodes: bool) -> float:
    """A ring collective moving `nbytes` per rank: (g - 1) / g of it over the slowest link."""
    if group <= 1:
        return 0.0
    rate = (device.inter_node_gbps if span_nodes else device.intra_node_gbps) * 1e9
    return nbytes * (group - 1) / group / rate


def predict(
    cfg: TrainConfig, layout: Layout, device: DeviceSpec, facts: ModelFacts, packing: Packing | None = None
) -> tuple[float, dict[str, float]]:
    """Predicted seconds per optimizer step and its terms (see the module docstring). `packing`: what a
    micro-batch holds (default: one document of max_tokens)."""
    from omni_models.flops import transformer_flops

    block, layers = facts.block, facts.layers
    vocab, hidden = facts.head
    pdt = dtype_bytes(cfg.parallel.param_dtype)
    packing = packing or Packing.one_document(layout.max_tokens)
    tokens = layout.max_tokens // layout.sp  # per rank per micro-batch: the budget (buffers are sized by it)
    m = layout.micro_batches
    # omni_models.flops' formula split into its per-token and per-squared-length parts
    per_sq = transformer_flops(0, [1], layers, block.q_dim, causal=True)
    per_token = transformer_flops(facts.active_params, [1], layers, block.q_dim, causal=True) - per_sq
    flops = m * (per_token * packing.tokens + per_sq * packing.sum_sq) / layout.sp
    flops += m * 3.0 * 2 * vocab * hidden * packing.tokens * packing.labelled / layout.sp  # the LM head
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
    fixed = m * device.micro_batch_s
    if layout.offload != "params":  # offloaded states step on the host (their transfer counts above)
        fixed += OPTIMIZER_BYTES * facts.trainable / shard / (device.hbm_gbps * 1e9)
    times = {"compute": compute, "fsdp": fsdp + hsdp, "sp_ep": a2a, "offload": host, "fixed": fixed}
    return max(compute, fsdp + hsdp) + a2a + host + fixed, times


def layout_of(cfg: TrainConfig, world_size: int) -> Layout:
    """The layout a recipe runs on `world_size` ranks (ValueError when its degrees do not fit them)."""
    return dataclasses.replace(_recipe_layout(cfg), dp_shard=cfg.dims(world_size).dp_shard)


def _recipe_layout(cfg: TrainConfig) -> Layout:
    """The recipe's settings as they are written (dp_shard may be -1: inferred)."""
    values = {}
    for name, key in recipe_keys().items():
        section, _ = key.split(".")
        values[name] = getattr(getattr(cfg, section), name)
    return Layout(**values)


def plan(
    cfg: TrainConfig,
    devices: int,
    device: DeviceSpec,
    docs: DocumentLengths | None = None,
    liger_ce: bool | None = None,
    facts: ModelFacts | None = None,
) -> tuple[list[Candidate], list[Candidate]]:
    """(feasible candidates, most real tokens per second first; infeasible ones) for `devices` of
    `device`. `docs`: the recipe's document lengths (default: one document per micro-batch); `liger_ce`:
    whether the loss head's chunks run liger's kernel (default: with `kernels: liger`)."""
    from omni_train.assembly import meta_model

    facts = facts or ModelFacts.of(meta_model(cfg.model_spec), cfg.model_spec)
    docs = docs or DocumentLengths.fallback("no document lengths given")
    liger = cfg.parallel.kernels == "liger" if liger_ce is None else liger_ce
    packings: dict[int, Packing | None] = {}  # by tokens per micro-batch; None: no document fits
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
        memory = (
            estimate_memory(candidate_cfg, devices, facts, head=loss_head(candidate_cfg, liger)).peak / GIB
        )
        if layout.max_tokens not in packings:
            packings[layout.max_tokens] = _packing(docs, candidate_cfg)
        packing = packings[layout.max_tokens]
        if packing is None:  # data.overlong drop: this budget drops every document
            continue
        step_s, times = predict(candidate_cfg, layout, device, facts, packing)
        rate = packing.tokens * layout.micro_batches / layout.sp / step_s
        c = Candidate(layout, memory, step_s, times, rate, memory <= device.memory_gib)
        (feasible if c.fits else infeasible).append(c)
    feasible.sort(key=lambda c: -c.tokens_per_s_per_device)
    return feasible, infeasible


def _packing(docs: DocumentLengths, cfg: TrainConfig) -> Packing | None:
    try:
        return docs.packing(cfg.data.max_tokens, cfg.data.pack_buffer, cfg.data.overlong)
    except ValueError:
        return None


def format_plan(
    cfg: TrainConfig,
    feasible: list[Candidate],
    infeasible: list[Candidate],
    devices: int,
    device: DeviceSpec,
    top: int,
    notes: list[str] | None = None,
) -> str:
    """The plan as text: a head line, `notes` (where the document lengths came from, a calibration, ...),
    the best `top` layouts and the --set overrides of each."""
    head = (
        f"{devices} x {device.name} ({device.memory_gib:g} GiB each): {len(feasible) + len(infeasible)} valid "
        f"layouts, {len(feasible)} fit, {len(infeasible)} predicted over the budget"
    )
    cols = (
        f"{'#':>2} {'dp_rep':>6} {'dp_shard':>8} {'sp':>3} {'ep':>3} {'recompute':>9} {'offload':>11} "
        f"{'tokens x mb':>12} {'peak GiB':>9} {'step s':>8} {'tok/s/dev':>10}  "
        "compute/fsdp/sp+ep/offload/fixed s"
    )
    lines = [head, *(notes or []), "", cols]
    for i, c in enumerate(feasible[:top], 1):
        x, t = c.layout, c.times
        lines.append(
            f"{i:>2} {x.dp_replicate:>6} {x.dp_shard:>8} {x.sp:>3} {x.ep:>3} {x.recompute:>9} {x.offload:>11} "
            f"{f'{x.max_tokens} x {x.micro_batches}':>12} {c.memory_gib:>9.1f} {c.step_s:>8.3f} "
            f"{c.tokens_per_s_per_device:>10.0f}  "
            + "/".join(f"{t[k]:.3f}" for k in ("compute", "fsdp", "sp_ep", "offload", "fixed"))
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
