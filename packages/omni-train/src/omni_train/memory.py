"""Predicted peak memory per rank of a recipe on a layout, by part (what `--dry-run` and `plan` print).

    states       parameters, gradients and AdamW moments of the sharded model (fp32 masters): dense
                 weights over dp_shard x sp ranks, experts over ep and then the rest (the same factor)
    gathered     FSDP's unsharded copies in param_dtype: the foundation's own unit (LM head, final norm),
                 kept from forward to backward; in backward the largest unit, the next one (prefetched)
                 and the largest unit's unsharded gradient (plus a reduce_dtype copy when that differs); without
                 resharding after forward, every unit from forward's end
    activations  what autograd saves (omni_models.memory) for this rank's tokens: max_tokens / sp of the
                 foundation, data.max_encoder_units of each trainable encoder (over sp with
                 encoder_balance sp, else on every SP rank); under recompute one block's worth more
                 while it is recomputed. An encoder's blocks come from the optional members the Encoder
                 Protocol names (encoder_blocks); one without them is left out, with a note saying so
    offload      offload_params keeps states on the host; offload_activations keeps the foundation's saved
                 activations there but for two blocks' worth (one leaving, one coming back)
    loss head    the head that runs (LossHead, passed by the caller): the labelled rows' hidden states and
                 their gradient (made in forward), and
                 chunked (omni_dist.loss_head): the fp32 head-weight gradient; while a chunk runs, its
                   logits (torch's chunk kernel: in fp32 and the param dtype next to the previous chunk's,
                   3 x 4 bytes per logit; liger's: in the param dtype, in place), loss_chunk rows (0: all);
                   in backward, the scaled weight gradient

Backward frees each layer's activations as it makes that layer's gradients, so the peak is at one end
of it (MemoryEstimate.peak). Checked against measured peaks of real steps: bench/memory_model.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from torch import nn

from omni_dist.dtypes import DTYPES
from omni_models.memory import BlockShape, decoder_block, encoder_block
from omni_train.config import TrainConfig

GIB = 2**30
# encoder units per micro-batch when data.max_encoder_units is unset: every token a media placeholder
# merged from 4 units (Qwen2-VL's 2 x 2 patch merge), a bound rather than a typical batch
UNITS_PER_TOKEN = 4


@dataclass
class MemoryEstimate:
    """Bytes per rank by when they are held; the peak: what is always held, the larger end of backward
    and the largest transient (under gradient accumulation the gradients are always held)."""

    resident: dict[str, float] = field(default_factory=dict)  # held through the step
    forward_end: dict[str, float] = field(default_factory=dict)  # held when forward ends
    backward_end: dict[str, float] = field(default_factory=dict)  # held when backward ends
    transients: dict[str, float] = field(default_factory=dict)  # one at a time, at either end
    host: dict[str, float] = field(default_factory=dict)  # offloaded to host memory: not in the peak
    notes: tuple[str, ...] = ()  # parts left out of the estimate, and why (ModelFacts.notes)

    @property
    def peak(self) -> float:
        spike = max(self.transients.values(), default=0.0)
        ends = max(sum(self.forward_end.values()), sum(self.backward_end.values()))
        return sum(self.resident.values()) + ends + spike

    def lines(self) -> list[str]:
        out = []
        for when, parts in (
            ("", self.resident),
            (" (when forward ends)", self.forward_end),
            (" (when backward ends)", self.backward_end),
            (" (transient)", self.transients),
            (" (on the host)", self.host),
        ):
            out += [f"{name}{when}: {b / GIB:.2f} GiB" for name, b in parts.items()]
        out.append(f"peak: {self.peak / GIB:.2f} GiB per rank")
        return out + [f"note: {n}" for n in self.notes]


def micro_batch_encoder_units(cfg: TrainConfig) -> int:
    """Encoder units of one micro-batch: data.max_encoder_units, else the bound UNITS_PER_TOKEN per token."""
    return cfg.data.max_encoder_units or cfg.data.max_tokens * UNITS_PER_TOKEN


def dtype_bytes(name: str) -> int:
    """Bytes per element of a config dtype name (aliases too: bf16, fp32, ...)."""
    return DTYPES[name].itemsize


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate reads of a model, gathered once (a planner asks for hundreds of layouts, and a
    30B MoE has ~20K parameter tensors)."""

    params: int
    trainable: int
    active_params: int  # of the foundation's blocks, per token (top-k experts of an MoE)
    total_bytes: int
    trainable_bytes: int
    unit_dense: dict[str, int]  # FSDP unit ("" the root) -> its own dense parameters (nested units apart)
    unit_experts: dict[str, int]  # and its expert parameters (divided over ep)
    block: BlockShape
    layers: int
    encoders: dict[str, tuple[int, BlockShape]]  # trainable encoders: (blocks, block shape)
    encoder_params: dict[str, tuple[int, bool]]  # every encoder: (parameters, trainable)
    head: tuple[int, int]  # the LM head's (vocab, hidden)
    notes: tuple[str, ...] = ()  # what the model does not tell the estimate (one line each)

    @classmethod
    def of(cls, model: nn.Module, spec) -> ModelFacts:
        from omni_models.parallel import omni_plan

        plan = omni_plan(model, spec)
        units = list(plan.fsdp_units)
        dense, experts = dict.fromkeys(["", *units], 0), dict.fromkeys(["", *units], 0)
        for name, q in model.named_parameters():
            owner = max((u for u in units if name.startswith(u + ".")), key=len, default="")
            expert = any(fnmatchcase(name, g) for g in plan.expert_params)
            (experts if expert else dense)[owner] += q.numel()
        config = model.foundation.config
        trained = {n: e for n, e in model.encoders.items() if any(q.requires_grad for q in e.parameters())}
        blocks = {n: encoder_blocks(e) for n, e in trained.items()}  # a frozen one saves nothing for backward
        return cls(
            params=sum(q.numel() for q in model.parameters()),
            trainable=sum(q.numel() for q in model.parameters() if q.requires_grad),
            active_params=model._active_params,
            total_bytes=sum(q.numel() * q.element_size() for q in model.parameters()),
            trainable_bytes=sum(q.numel() * q.element_size() for q in model.parameters() if q.requires_grad),
            unit_dense=dense,
            unit_experts=experts,
            block=decoder_block(config),
            layers=(getattr(config, "text_config", None) or config).num_hidden_layers,
            encoders={n: b for n, b in blocks.items() if b is not None},
            encoder_params={
                name: (sum(q.numel() for q in e.parameters()), any(q.requires_grad for q in e.parameters()))
                for name, e in model.encoders.items()
            },
            head=tuple(model.foundation.get_output_embeddings().weight.shape),
            notes=tuple(
                f"encoders.{n}: activations not estimated ({type(trained[n]).__name__} has no block_shape() "
                "and no HF config with a width and depth; omni_models.modality.Encoder)"
                for n, b in blocks.items()
                if b is None
            ),
        )


def encoder_blocks(encoder: nn.Module) -> tuple[int, BlockShape] | None:
    """(blocks, block shape) of an encoder's transformer stack, from the optional members the Encoder
    Protocol names: its own `block_shape()`, else the HF config of its `tower` (or of itself); None when it
    has neither (or a config without a width and depth)."""
    own = getattr(encoder, "block_shape", None)
    if callable(own):
        return own()
    config = getattr(getattr(encoder, "tower", encoder), "config", None)
    return encoder_block(config) if config is not None else None


@dataclass(frozen=True)
class LossHead:
    """The LM head's loss as a run computes it (omni_dist.loss_head): `chunk` rows of logits at a time (0: all
    rows), each chunk's cross-entropy by the `kernel` a run's kernel set picks: torch's ops (fp32 logits,
    their softmax in place, the param-dtype gradient) or liger-kernel's (in place on the param-dtype logits)."""

    chunk: int = 0
    kernel: Literal["torch", "liger"] = "torch"

    def memory(self, rows: int, vocab: int, hidden: int, dtype_bytes: int) -> tuple[float, float]:
        """(bytes held from the head's forward to backward, its largest transient above them) for `rows`
        labelled rows, a (vocab, hidden) head computed in a `dtype_bytes` param dtype."""
        pdt = dtype_bytes
        rows_and_grad = 2 * rows * hidden * pdt  # the rows' hidden states; their gradient, made in forward
        chunk = min(self.chunk or rows, rows)
        # torch: a chunk's fp32 logits (softmax in their memory) beside the param-dtype logits and gradient of
        # the previous chunk; liger: the param-dtype logits, overwritten by their gradient
        per_logit = 3 * 4 if self.kernel == "torch" else pdt
        # backward scales the fp32 weight gradient (a new fp32 tensor) and casts it to the param dtype
        return rows_and_grad + vocab * hidden * 4, max(chunk * vocab * per_logit, vocab * hidden * (4 + pdt))

    def describe(self) -> str:
        rows = f"{self.chunk} rows" if self.chunk else "all rows at once"
        return f"chunked, {rows}, {self.kernel} chunk kernel"


def loss_head(cfg: TrainConfig, liger: bool) -> LossHead:
    """The head a run of `cfg` computes its LM loss with: train.loss_chunk rows a chunk, by liger's chunk kernel
    where the run's kernel set has it (`liger`), else torch's."""
    return LossHead(cfg.train.loss_chunk, "liger" if liger else "torch")


def estimate_memory(
    cfg: TrainConfig,
    world_size: int,
    facts: ModelFacts | None = None,
    labelled: int | None = None,
    encoder_units: dict[str, int] | None = None,
    *,
    head: LossHead,
) -> MemoryEstimate:
    """Predicted memory per rank. `facts`: of the recipe's model (default: built on meta); `labelled`: loss
    rows per rank (default: every token of its slice); `encoder_units`: per encoder, units per
    micro-batch (default: data.max_encoder_units, else a bound); `head`: the loss head the run computes
    (loss_head)."""
    from omni_train.assembly import meta_model

    dims = cfg.dims(world_size)
    p = cfg.parallel
    facts = facts if facts is not None else ModelFacts.of(meta_model(cfg.model_spec), cfg.model_spec)
    shard = dims.dp_shard * dims.sp
    pdt, rdt = dtype_bytes(p.param_dtype), dtype_bytes(p.reduce_dtype)
    est = MemoryEstimate(notes=facts.notes)

    accumulating = cfg.data.micro_batches_per_step > 1
    states = est.host if p.offload_params else est.resident  # FSDP's CPU offload keeps them on the host
    states["parameters"] = facts.total_bytes / shard
    states["optimizer (AdamW)"] = 2 * facts.trainable_bytes / shard
    (est.host if p.offload_params else est.resident if accumulating else est.backward_end)["gradients"] = (
        facts.trainable_bytes / shard
    )

    units = {u: n + facts.unit_experts[u] // dims.ep for u, n in facts.unit_dense.items()}
    grad_copy = pdt + (rdt if rdt != pdt else 0)
    largest, second = [*sorted(units.values(), reverse=True), 0, 0][:2]
    if p.reshard_after_forward:
        est.resident["gathered foundation unit"] = units.get("foundation", 0) * pdt
        est.transients["backward unit"] = largest * (pdt + grad_copy) + second * pdt  # + the prefetched
    else:
        est.forward_end["gathered units"] = sum(units.values()) * pdt
        est.transients["backward unit"] = largest * grad_copy

    tokens = cfg.data.max_tokens // dims.sp
    block = facts.block
    activations = _activations(block, facts.layers, tokens, p.recompute, pdt, est)
    if p.offload_activations:  # each block's saved tensors go to the host; one block out, one coming back
        est.host["activations: foundation"] = activations
        activations = 2 * block.saved(p.recompute) * tokens * pdt
    est.forward_end["activations: foundation"] = activations
    for name, (depth, shape) in facts.encoders.items():
        units_of = (encoder_units or {}).get(name)
        units_of = units_of if units_of is not None else micro_batch_encoder_units(cfg)
        if p.encoder_balance == "sp":  # the SP ranks share the items (balanced by cost)
            units_of = -(-units_of // dims.sp)
        est.forward_end[f"activations: encoders.{name}"] = _activations(
            shape, depth, units_of, p.recompute, pdt, est, f"encoders.{name}"
        )

    rows = tokens if labelled is None else labelled
    vocab, hidden = facts.head
    saved, transient = head.memory(rows, vocab, hidden, pdt)
    est.forward_end[f"loss head ({head.describe()})"] = saved
    est.transients["loss head chunk"] = transient
    return est


def _activations(
    shape: BlockShape, blocks: int, tokens: int, recompute: str, dtype_bytes: int, est, name="foundation"
) -> float:
    """Saved activations of `blocks` blocks over `tokens` (plus the stack's input and final norm);
    under recompute, one block's full activations are a transient."""
    if recompute != "none":
        est.transients[f"recomputed block ({name})"] = shape.saved("none") * tokens * dtype_bytes
    return (blocks * shape.saved(recompute) + 4 * shape.hidden) * tokens * dtype_bytes
