"""OmniModel: encoders -> projectors -> an HF causal LM foundation, on one packed micro-batch.

Text embeddings come from the foundation; each modality's encoder output, projected to the
foundation's width, replaces the embeddings at that modality's placeholder positions (a DeepStack
encoder's extra rows go to the foundation's first layers at the same positions, as HF's Qwen3-VL adds
them); the foundation runs with packed attention; the loss is the token-summed cross entropy over
labelled positions (the caller divides by the global label-token count, so every parallel layout trains
the same model). A MoE foundation also returns its router's load-balancing loss for the micro-batch
(HF's, per sequence).

An encoder whose modalities are absent from a micro-batch still runs, on its smallest dummy input,
whose features are spliced in at no position: on every rank the same modules run forward and
backward in the same order (FSDP's all-gathers and reduce-scatters never wait on a rank that skipped
one), and the dummy's contribution to loss and gradients is exactly zero.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from omni_dist.attention import SequenceParallel
from omni_dist.loss_head import ChunkCrossEntropy, head_cross_entropy
from omni_dist.media_split import EncoderRoute, WorldRoute
from omni_dist.moe_loss import load_balancing_loss
from omni_dist.packed import MediaBatch, PackedBatch, to_device
from omni_dist.parallelize import EncoderBalance
from omni_dist.rank_slice import RankSlice, host_indices
from omni_models.flops import transformer_flops


@dataclass
class OmniOutput:
    loss_sum: torch.Tensor  # this rank's summed token losses (fp32): text + every decoder, weighted
    label_tokens: int  # tokens that contributed to loss_sum
    parts: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # "text" / decoder -> (sum, n)
    # MoE foundations: this rank's share of the micro-batch's load-balancing loss (shares add up over
    # the SP group to the loss of the whole micro-batch, as HF computes it for one sequence), unscaled
    aux_loss: torch.Tensor | None = None
    aux_loss_coef: float = 0.0


@dataclass(frozen=True)
class RunSettings:
    """How a run computes the model's step, given when the model is built (omni_models.parallel.run_settings
    derives them from a run's mesh, parallel config and kernels). The defaults: one process, all logits at
    once, torch's cross-entropy."""

    # positions whose logits the text and decoder heads compute at a time (omni_dist.loss_head), so the loss
    # never holds (labelled tokens x vocab) logits; 0: all at once
    loss_chunk: int = 0
    chunk_cross_entropy: ChunkCrossEntropy | None = None  # the LM head's per-chunk loss kernel; None: torch's
    # "sp" / "world": the SP group / every rank of `encoder_group` shares the encoders' work
    encoder_balance: EncoderBalance = "none"
    encoder_group: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class MoeRouting:
    num_experts: int
    top_k: int
    aux_loss_coef: float


def moe_routing(config: Any) -> MoeRouting | None:
    """The routing of an HF MoE config whose load-balancing loss trains (coef > 0), else None."""
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    coef = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
    if not experts or coef <= 0:
        return None
    return MoeRouting(int(experts), int(config.num_experts_per_tok), float(coef))


@dataclass
class _Targets:
    """A decoder's teacher-forced tokens on this rank: where they are and what they are."""

    positions: torch.Tensor  # global positions of the image tokens
    codes: torch.Tensor


def projector(kind: str, in_size: int, out_size: int) -> nn.Module:
    if kind == "identity":
        if in_size != out_size:
            raise ValueError(
                f"an identity projector needs the encoder's width {in_size} == the LM's {out_size}"
            )
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_size, out_size)
    if kind == "mlp":
        # The LayerNorm first: a fresh tower's features are small and alike across inputs, so without it
        # the first Linear's bias dominates the output (different images gave cosine 0.9999 at the
        # quickstart's splice) and the LM sees almost no signal from the media until the tower grows.
        return nn.Sequential(
            nn.LayerNorm(in_size), nn.Linear(in_size, out_size), nn.GELU(), nn.Linear(out_size, out_size)
        )
    raise ValueError(f"projector must be 'identity', 'linear' or 'mlp', got {kind!r}")


class OmniModel(nn.Module):
    def __init__(
        self,
        foundation: nn.Module,
        encoders: Mapping[str, nn.Module],
        projectors: Mapping[str, nn.Module],
        decoders: Mapping[str, nn.Module] | None = None,
        loss_weights: Mapping[str, float] | None = None,
        settings: RunSettings | None = None,
    ):
        """`loss_weights`: a decoder's token losses count this much in `loss_sum` (default 1)."""
        super().__init__()
        self.loss_weights = dict(loss_weights or {})
        self.settings = settings or RunSettings()
        self.foundation = foundation
        self.encoders = nn.ModuleDict(dict(encoders))
        self.projectors = nn.ModuleDict(dict(projectors))
        self.decoders = nn.ModuleDict(dict(decoders or {}))
        if set(self.encoders) != set(self.projectors):
            raise ValueError(
                f"encoders {sorted(self.encoders)} and projectors {sorted(self.projectors)} differ"
            )
        self.modality_encoder = _owners(self.encoders, "read")
        self.modality_decoder = _owners(self.decoders, "generated")

    def _check_media(self, batch: PackedBatch) -> None:
        unknown = sorted(set(batch.media) - set(self.modality_encoder))
        if unknown:
            raise ValueError(
                f"the batch has media {unknown} that no encoder reads (encoders: {self.modality_encoder})"
            )
        unknown = sorted(set(batch.targets) - set(self.modality_decoder))
        if unknown:
            raise ValueError(f"the batch has generation targets {unknown} that no decoder makes")

    def embed(self, batch: PackedBatch, sp: SequenceParallel | None = None) -> torch.Tensor:
        """Input embeddings (t, hidden) of this rank's part of the sequence, media features in place."""
        return self._embed(RankSlice.of(batch, sp))[0][0]

    def foundation_inputs(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        """The embeddings (t, hidden) of a whole (unsliced) sequence and the foundation's other keywords its
        media bring (deepstack features), as generation's prefill passes them."""
        embeds, _, deepstack = self._embed(RankSlice.of(batch, None))
        return embeds[0], deepstack

    def _embed(self, view: RankSlice) -> tuple[torch.Tensor, dict[str, _Targets], dict[str, Any]]:
        """(1, t, hidden) embeddings of this rank's slice, each decoder's targets, and the deepstack
        keywords of the foundation (none without a deepstack encoder)."""
        batch, sp, start, length = view.batch, view.sp, view.start, view.length
        self._check_media(batch)
        ids = view(batch.input_ids[0])
        embeds = self.foundation.get_input_embeddings()(ids[None])
        row0 = ids.new_zeros(())  # the batch index of every spliced position
        balance = self.settings.encoder_balance
        deep: list[tuple[torch.Tensor, torch.Tensor]] = []  # per deepstack encoder: (positions, rows)
        for name, encoder in self.encoders.items():
            present = {m: batch.media[m] for m in encoder.modalities if m in batch.media}
            if balance == "world":  # every rank takes part, with media or without
                embeds = self._embed_world(name, present, embeds, sp, deep)
                continue
            if present and sp is not None and balance == "sp":
                embeds = self._embed_shared(name, present, embeds, sp, deep)
                continue
            media = present or {m: x.to(ids.device) for m, x in encoder.dummy_media().items()}
            # The same ops in the same order whether or not the media is real (so every rank's backward
            # reaches the FSDP units in the same order; one projector call per encoder for the same
            # reason); a dummy's features are spliced in at no position.
            feats = encoder.lm_encode(media)
            projected, extra = self._project(name, torch.cat(list(feats.values())))
            # Which rows go where is worked out on the host (positions stay there: PackedBatch.to), so
            # no data-dependent op waits on the device; the indices go over asynchronously.
            rows, targets, offset = [], [], 0
            for m, f in feats.items():
                pos = media[m].positions - start
                if not present:
                    pos = pos[:0]
                elif f.shape[0] != pos.shape[0]:
                    raise ValueError(
                        f"{name} gave {f.shape[0]} {m} embeddings for {pos.shape[0]} placeholders"
                    )
                keep = host_indices((pos >= 0) & (pos < length)) if present else pos
                rows.append(keep + offset)
                targets.append(pos[keep])
                offset += f.shape[0]
            at, picked = (_to(torch.cat(x), ids.device) for x in (targets, rows))
            embeds = embeds.index_put((row0.expand_as(at), at), projected[picked].to(embeds.dtype))
            if extra is not None:
                deep.append((at, extra[picked]))
        generated: dict[str, _Targets] = {}
        batch_targets = batch.targets
        for name, decoder in self.decoders.items():
            # Generation targets: teacher-forced token embeddings at their positions (dummy: at none).
            (m,) = decoder.modalities
            present = m in batch_targets
            media = (
                {m: batch_targets[m]}
                if present
                else {m: x.to(ids.device) for m, x in decoder.dummy_media().items()}
            )
            feats, codes = decoder.lm_encode(media)[m]
            pos = media[m].positions  # on the host
            if not present:
                pos = pos[:0]
            elif feats.shape[0] != pos.shape[0]:
                raise ValueError(f"{name} gave {feats.shape[0]} {m} tokens for {pos.shape[0]} placeholders")
            keep = host_indices((pos >= start) & (pos < start + length)) if present else pos
            at, keep = _to(pos[keep] - start, ids.device), _to(keep, ids.device)
            embeds = embeds.index_put((row0.expand_as(at), at), feats[keep].to(embeds.dtype))
            generated[name] = _Targets(pos, codes[: pos.shape[0]])
        return embeds, generated, _deepstack(deep, length, embeds.device)

    def _project(self, name: str, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder `name`'s features (rows, width), or (rows, 1 + N, width) from a deepstack encoder ->
        the projected input embeddings and the N deepstack rows (rows, N, hidden) (None: not one)."""
        if not getattr(self.encoders[name], "deepstack_layers", 0):
            return self.projectors[name](feats), None
        projected, extra = self.projectors[name](feats[:, 0]), feats[:, 1:]
        if extra.shape[-1] != projected.shape[-1]:
            raise ValueError(
                f"encoder {name!r}: deepstack features of width {extra.shape[-1]} for a foundation of "
                f"width {projected.shape[-1]} (they are added to its hidden states as they are)"
            )
        return projected, extra

    def _embed_shared(
        self, name: str, media: dict[str, MediaBatch], embeds: torch.Tensor, sp: SequenceParallel, deep: list
    ) -> torch.Tensor:
        """Encoder `name` on this SP rank's share of the micro-batch's items (omni_dist.media_split)."""
        route = EncoderRoute.plan(media, sp.rank, sp.size, embeds.shape[1])
        return self._encode_routed(name, route, embeds, sp.group, deep)

    def _embed_world(
        self,
        name: str,
        present: dict[str, MediaBatch],
        embeds: torch.Tensor,
        sp: SequenceParallel | None,
        deep: list,
    ) -> torch.Tensor:
        """Encoder `name` on the items all ranks assigned this one (omni_dist.media_split.WorldRoute):
        each offers its SP share of its micro-batch."""
        length, group = embeds.shape[1], self.settings.encoder_group
        offer = present
        if sp is not None:
            offer = EncoderRoute.share(present, sp.rank, sp.size) if present else {}
            owners = [dist.get_group_rank(group, r) for r in dist.get_process_group_ranks(sp.group)]
        else:
            owners = [dist.get_rank(group)]
        route = WorldRoute.plan(offer, group, owners, length, embeds.device)
        return self._encode_routed(name, route, embeds, group, deep)

    def _encode_routed(self, name: str, route, embeds: torch.Tensor, group, deep: list) -> torch.Tensor:
        """Encode the route's items (the dummy input when it has none, so every rank's backward reaches
        the FSDP units in the same order), project them, send the features (with their deepstack rows)
        to the ranks whose slices hold their placeholders and splice in those that arrive here."""
        encoder = self.encoders[name]
        mine = route.mine or {m: x.to(embeds.device) for m, x in encoder.dummy_media().items()}
        feats = encoder.lm_encode(mine)
        projected, extra = self._project(name, torch.cat([feats[m] for m in mine]))
        if route.mine and projected.shape[0] != route.send_order.shape[0]:
            raise ValueError(
                f"{name} gave {projected.shape[0]} embeddings for {route.send_order.shape[0]} placeholders"
            )
        if extra is None:
            rows, at = route.exchange(projected, group)
        else:  # one exchange: each row travels with its deepstack rows
            rows, at = route.exchange(torch.cat([projected[:, None], extra], 1).flatten(1), group)
            rows = rows.unflatten(1, (1 + extra.shape[1], -1))
            deep.append((at, rows[:, 1:]))
            rows = rows[:, 0]
        return embeds.index_put((at.new_zeros(()).expand_as(at), at), rows.to(embeds.dtype))

    def forward(
        self, batch: PackedBatch | RankSlice, sequence_parallel: SequenceParallel | None = None
    ) -> OmniOutput:
        """`batch`: a packed micro-batch, or this rank's view of one (RankSlice.of(batch, sp), which holds
        its SP group), as the trainer passes it: made once, also to count the step's loss tokens, and left
        alone by FSDP's root pre-forward (see omni_dist.rank_slice)."""
        if isinstance(batch, RankSlice):
            if sequence_parallel is not None:
                raise ValueError("pass the SP group in the RankSlice (RankSlice.of(batch, sp)), not again")
            view = batch
        else:
            view = RankSlice.of(batch, sequence_parallel)
        batch, sp, settings = view.batch, view.sp, self.settings
        embeds, generated, deepstack = self._embed(view)
        # (1, T), or (3, 1, T) for M-RoPE (HF's own layout): either way the sequence is the last dim
        positions = view(batch.position_ids, dim=-1)
        # Logits only where a text label is (media placeholders and prompts have none): the foundation
        # returns none, and its LM head runs here on the labelled positions' last hidden states, so the
        # head's memory and FLOPs follow the labelled tokens (in chunks of `loss_chunk`), not the sequence.
        # The labels are on the host (PackedBatch.to): the positions are found there.
        labelled = _to(view.labelled, embeds.device)
        lm = self.foundation(
            inputs_embeds=embeds,
            position_ids=positions,
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen,
            use_cache=False,
            sequence_parallel=sp,
            # Only the last hidden state (the heads read it). All of them would include the input
            # embeddings, which FSDP's pre-forward hands on as a view: returned from the foundation's
            # unit, an in-place op on that view would skip FSDP's pre-backward hook.
            output_hidden_states=-1,
            logits_to_keep=labelled[:0],
            **({"output_router_logits": True} if self._moe else {}),
            **deepstack,
        )
        head = self.foundation.get_output_embeddings()
        targets = _to(view.labels[view.labelled], embeds.device)
        hidden = lm.hidden_states[-1][0, labelled]
        loss = head_cross_entropy(head, hidden, targets, settings.loss_chunk, settings.chunk_cross_entropy)
        parts = {"text": (loss, int(view.labelled.numel()))}
        for name, decoder in self.decoders.items():
            # Token k of an image is predicted from the hidden state one position before it; that
            # position may sit on this SP rank even when the token itself does not.
            t = generated[name]
            (m,) = decoder.modalities
            keep = view.predicted.get(m, t.positions)  # absent: the dummy's, at no position
            hidden = lm.hidden_states[-1][0, _to(t.positions[keep] - 1 - view.start, embeds.device)]
            part = decoder.lm_loss(hidden, t.codes[_to(keep, t.codes.device)], settings.loss_chunk)
            parts[name] = (part, int(keep.numel()))  # reported unweighted: nats per code
            loss = loss + self.loss_weights.get(name, 1.0) * part
        out = OmniOutput(loss, sum(n for _, n in parts.values()), parts)
        if self._moe:
            real = view(torch.arange(batch.input_ids.shape[1], device=embeds.device) < batch.num_tokens)
            group = sp.group if sp is not None else None
            m = self._moe
            out.aux_loss = load_balancing_loss(lm.router_logits, m.top_k, m.num_experts, real, group)
            out.aux_loss_coef = m.aux_loss_coef
        return out

    def generate(self, input_ids: torch.Tensor, markers, media=None, **kwargs):
        """Text and images from a prompt; see omni_models.generate.generate for the options."""
        from omni_models.generate import generate

        return generate(self, input_ids, markers, media, **kwargs)

    @cached_property
    def _moe(self) -> MoeRouting | None:
        return moe_routing(self.foundation.config)

    @cached_property
    def _active_params(self) -> int:  # counted once: flops() runs for every micro-batch
        return active_block_params(self.foundation)

    def flops(self, batch: PackedBatch) -> dict[str, float]:
        """Training FLOPs of this micro-batch per part (see omni_models.flops)."""
        cfg = self.foundation.config
        cu = batch.cu_seqlens.tolist()
        lengths = [b - a for a, b in itertools.pairwise(cu)]
        out = {
            "foundation": transformer_flops(
                self._active_params,
                lengths,
                cfg.num_hidden_layers,
                cfg.num_attention_heads * _head_dim(cfg),
                causal=True,
            )
            + 3.0 * 2 * cfg.vocab_size * cfg.hidden_size * sum(lengths)
        }
        for name, encoder in self.encoders.items():
            present = {m: batch.media[m] for m in encoder.modalities if m in batch.media}
            out[name] = encoder.flops(present) if present else 0.0
        targets = batch.targets
        for name, decoder in self.decoders.items():
            present = {m: targets[m] for m in decoder.modalities if m in targets}
            out[name] = decoder.flops(present) if present else 0.0
        return out


def _deepstack(deep: list[tuple[torch.Tensor, torch.Tensor]], length: int, device) -> dict[str, Any]:
    """The foundation's deepstack keywords (HF's Qwen3-VL names) from each deepstack encoder's (positions
    in this slice, rows (n, N, hidden)): the positions as a (1, length) mask, and per layer the rows in
    position order (the order in which a boolean mask selects the hidden states they are added to)."""
    if not deep:
        return {}
    layers = {rows.shape[1] for _, rows in deep}
    if len(layers) > 1:
        raise ValueError(f"deepstack encoders feed different numbers of layers {sorted(layers)}")
    at = torch.cat([a for a, _ in deep])
    rows = torch.cat([r for _, r in deep])[torch.argsort(at)]
    mask = torch.zeros(1, length, dtype=torch.bool, device=device)
    mask = mask.index_put(
        (at.new_zeros(()).expand_as(at), at), torch.ones((), dtype=torch.bool, device=device)
    )
    return {"visual_pos_masks": mask, "deepstack_visual_embeds": list(rows.unbind(1))}


def _to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-computed index tensor on `device`, copied without waiting for the device (from page-locked
    memory: a copy from pageable memory may wait for the stream)."""
    return to_device(index, device)


def _owners(parts: nn.ModuleDict, verb: str) -> dict[str, str]:
    """Modality -> the part that handles it; a modality handled twice is a config error."""
    out: dict[str, str] = {}
    for name, part in parts.items():
        for m in part.modalities:
            if m in out:
                raise ValueError(f"modality {m!r} is {verb} by both {out[m]!r} and {name!r}")
            out[m] = name
    return out


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def active_block_params(foundation: nn.Module) -> int:
    """Parameters of the decoder blocks a token uses: for MoE, top-k of the experts."""
    cfg = foundation.config
    total = 0
    for name, p in foundation.named_parameters():
        if ".layers." not in name:
            continue
        if ".mlp.experts." in name:
            total += p.numel() * cfg.num_experts_per_tok // cfg.num_experts
        else:
            total += p.numel()
    return total
