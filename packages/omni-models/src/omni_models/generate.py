"""Inference: text, and images through a decoder's codebook head, with a KV cache.

The foundation runs with plain SDPA attention (one unpacked sequence and a KV cache; packed attention
is a training layout) and is restored afterwards. Text tokens come from the LM head; when the model
emits a decoder's start marker (or the prompt ends with one) the next `decoder.tokens` tokens come
from that decoder's head and are fed back with `lm_embed`, the end marker follows, and the codes are
decoded to pixels with `lm_generate`. A model with M-RoPE positions takes the prompt's own (3, n)
position ids (the family's position function gives them); every generated token then sits one
position after the largest so far, on all rows, as HF's rope deltas place it. Classifier-free guidance mixes the image logits with those of an
unconditional sequence, uncond + scale x (cond - uncond): by default it holds only the start marker;
`uncond_ids` gives another (Janus's: the prompt with every token but BOS and the start marker padded).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from omni_dist.packed import MediaBatch, PackedBatch
from omni_dist.sequence import IGNORE_INDEX


@dataclass
class Generation:
    tokens: list[int]  # generated token ids (image tokens appear as the placeholder id)
    images: list[torch.Tensor] = field(default_factory=list)  # (3, S, S) in [0, 1], in order
    codes: list[torch.Tensor] = field(default_factory=list)  # each image's codebook indices


@contextmanager
def _plain_attention(foundation):
    previous = foundation.config._attn_implementation
    foundation.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        foundation.set_attn_implementation(previous)


class _Sequence:
    """One sequence being extended: with a KV cache, or recomputed from all embeddings each step."""

    def __init__(self, foundation, use_cache: bool, rows: int = 1):
        from transformers import DynamicCache

        self.foundation = foundation
        self.cache = DynamicCache(config=foundation.config) if use_cache else None
        self.embeds: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (rows, length so far)
        self.rows = rows
        self.deepstack: dict = {}  # the prompt's deepstack keywords (OmniModel.foundation_inputs)

    def extend(
        self, new: torch.Tensor, positions: torch.Tensor | None = None, deepstack: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (n, hidden) embeddings at `positions` (rows, n) (default: after the largest so far);
        returns (last logits, last hidden state). `deepstack`: the prompt's deepstack keywords, added at
        its media positions (by the prefill with a cache, as HF's generate does; by every recomputation
        without one)."""
        if positions is None:
            start = 0 if self.positions is None else int(self.positions.max()) + 1
            positions = torch.arange(start, start + new.shape[0], device=new.device).expand(self.rows, -1)
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], -1)
        if self.cache is not None:
            embeds, pos = new, positions
            kw = {"past_key_values": self.cache, "use_cache": True, **(deepstack or {})}
        else:
            self.embeds = new if self.embeds is None else torch.cat([self.embeds, new])
            self.deepstack = deepstack or self.deepstack
            embeds, pos, kw = self.embeds, self.positions, {"use_cache": False, **self._deepstack()}
        pos = pos[:, None] if self.rows > 1 else pos  # HF's (3, 1, n) for M-RoPE
        out = self.foundation(inputs_embeds=embeds[None], position_ids=pos, output_hidden_states=True, **kw)
        return out.logits[0, -1].float(), out.hidden_states[-1][0, -1]

    def _deepstack(self) -> dict:
        """The prompt's deepstack keywords over the whole sequence so far (generated tokens get none)."""
        if not self.deepstack:
            return {}
        mask = self.deepstack["visual_pos_masks"]
        grown = torch.nn.functional.pad(mask, (0, self.embeds.shape[0] - mask.shape[1]))
        return {**self.deepstack, "visual_pos_masks": grown}


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    markers: Mapping[str, tuple[int, int, int]],
    media: Mapping[str, MediaBatch] | None = None,
    max_new_tokens: int = 64,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    cfg_scale: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    position_ids: torch.Tensor | None = None,
    uncond_ids: torch.Tensor | None = None,
) -> Generation:
    """Continue `input_ids` (1-D, media placeholders expanded, `media` at their positions).
    `position_ids` (rows, n): the prompt's own positions (M-RoPE: 3 rows); default 0..n-1.

    `markers[modality] = (start_id, placeholder_id, end_id)` for each decoder's modality (the
    tokenizer's `<|image_start|>`, `<|image|>`, `<|image_end|>`). `max_new_tokens` counts every
    generated position, image tokens included.
    """
    foundation = model.foundation
    device = input_ids.device
    n = int(input_ids.numel())
    positions = position_ids if position_ids is not None else torch.arange(n, device=device)[None]
    rows = positions.shape[0]
    prompt = PackedBatch(
        input_ids[None],
        positions[:, None] if rows > 1 else positions,
        torch.full((1, n), IGNORE_INDEX, device=device),
        torch.tensor([0, n], dtype=torch.int32, device=device),
        n,
        media=dict(media or {}),
        num_tokens=n,
    )
    start_of = {ids[0]: m for m, ids in markers.items() if m in model.modality_decoder}
    embed_tokens = foundation.get_input_embeddings()
    result = Generation(tokens=[])
    was_training = model.training
    model.eval()
    with _plain_attention(foundation):
        seq = _Sequence(foundation, use_cache, rows)
        embeds, deepstack = model.foundation_inputs(prompt)
        logits, hidden = seq.extend(embeds, positions.to(device), deepstack)
        pending = start_of.get(int(input_ids[-1]))  # the prompt itself opens an image
        while len(result.tokens) < max_new_tokens:
            if pending is None:
                token = _sample(logits, temperature, top_k, generator)
                result.tokens.append(token)
                if token == eos_id:
                    break
                logits, hidden = seq.extend(embed_tokens(torch.tensor([token], device=device)))
                pending = start_of.get(token)
                continue
            modality, pending = pending, None
            decoder = model.decoders[model.modality_decoder[modality]]
            start_id, placeholder_id, end_id = markers[modality]
            uncond = None
            if cfg_scale is not None:
                uncond = _Sequence(foundation, use_cache, rows)
                free = uncond_ids if uncond_ids is not None else torch.tensor([start_id])
                _, uncond_hidden = uncond.extend(embed_tokens(free.to(device)))
            codes = []
            for _ in range(decoder.tokens):
                scores = decoder.lm_head(hidden).float()
                if uncond is not None:
                    free = decoder.lm_head(uncond_hidden).float()
                    scores = free + cfg_scale * (scores - free)
                code = _sample(scores, temperature, top_k, generator)
                codes.append(code)
                result.tokens.append(placeholder_id)
                emb = decoder.lm_embed(torch.tensor([code], device=device))
                if len(codes) == decoder.tokens:  # the end marker follows the last code
                    emb = torch.cat([emb, embed_tokens(torch.tensor([end_id], device=device))])
                    result.tokens.append(end_id)
                logits, hidden = seq.extend(emb)
                if uncond is not None:
                    _, uncond_hidden = uncond.extend(emb)
            grid = torch.tensor(codes, device=device)
            result.codes.append(grid)
            result.images.append(decoder.lm_generate(grid[None])[0])
    model.train(was_training)
    return result
