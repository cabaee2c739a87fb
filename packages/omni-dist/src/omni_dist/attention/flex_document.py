"""Per-document attention through flex_attention, with a block mask built on the device from cu_seqlens.

`document_block_mask` classifies each (query block, key block) tile from the first and last document
of its tokens: no T x T mask is ever materialised (create_block_mask would build one: 1 GiB at 32K
tokens), and nothing is read back to the host. Documents are contiguous, so two tiles share a document
exactly when their [first, last] document ranges overlap; a tile is full (no mask evaluated) when both
tiles lie inside one document and, causally, strictly below the diagonal. The mask is rebuilt on every
call (a few kernels on a (T/128)^2 grid): the packed layout changes with every micro-batch.

flex_attention is only fast compiled. The compiled function is made once per process and compiled with
dynamic shapes, so a new packed length does not recompile; the numbers of heads and the head size are
static in flex itself (a new model shape compiles once more).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

BLOCK = 128  # flex's default sparse block; its kernels tile within it


def document_ids(cu_seqlens: torch.Tensor, total: int, padded: int) -> torch.Tensor:
    """(padded,) int32: the document of each token; the `padded - total` tail gets -1, which matches
    no real document (flex may evaluate the mask there when `total` is not a multiple of the block)."""
    bounds = cu_seqlens[1:].to(torch.int32).contiguous()
    positions = torch.arange(padded, dtype=torch.int32, device=cu_seqlens.device)
    docs = torch.searchsorted(bounds, positions, right=True).to(torch.int32)  # boundaries <= position
    return torch.where(positions < total, docs, -1)


def document_mask_mod(docs: torch.Tensor, causal: bool) -> Callable[..., torch.Tensor]:
    """flex's mask_mod: same document (and key not after query when `causal`)."""
    if causal:

        def causal_document(b, h, q_idx, kv_idx):
            return (docs[q_idx] == docs[kv_idx]) & (q_idx >= kv_idx)

        return causal_document

    def document(b, h, q_idx, kv_idx):
        return docs[q_idx] == docs[kv_idx]

    return document


def document_block_mask(
    cu_seqlens: torch.Tensor, total: int, causal: bool = True, block: int = BLOCK
):  # -> BlockMask (imported lazily: flex_attention pulls in dynamo)
    """The BlockMask of per-document (causal) attention over `total` packed tokens."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = -(-total // block)
    docs = document_ids(cu_seqlens, total, blocks * block)
    starts = torch.arange(blocks, device=docs.device) * block
    first = docs[starts]
    last = docs[(starts + block - 1).clamp(max=total - 1)]
    whole = starts + block <= total  # no padding inside the tile
    # tile pairs (query block i: rows, key block j: columns)
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    single = (first == last) & whole
    full = single[:, None] & single[None, :] & (first[:, None] == first[None, :])
    if causal:
        below = torch.ones(blocks, blocks, dtype=torch.bool, device=docs.device).tril()
        overlap &= below
        full &= below.tril(-1)  # a diagonal tile always masks its upper triangle
    partial = overlap & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx,
        BLOCK_SIZE=block, mask_mod=document_mask_mod(docs, causal), seq_lengths=(total, total),
    )  # fmt: skip


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, blocks) bool -> flex's (1, 1, blocks) counts and (1, 1, blocks, blocks) column indices,
    the tiles of each row first (as flex's own dense-to-ordered conversion lays them out)."""
    tiles = tiles.to(torch.int32)
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """torch.compile(flex_attention), made once per process (dynamo caches the compiled code per
    function object, so a new wrapper per call would compile again)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """(T, Hq, D), (T, Hkv, D) x2 -> (T, Hq, D): compiled flex_attention with the document block mask."""
    del max_seqlen  # the block mask carries the layout
    total, heads, kv_heads = q.shape[0], q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads}).")
    mask = document_block_mask(cu_seqlens, total, causal)
    out = compiled_flex_attention()(
        *(x.transpose(0, 1)[None] for x in (q, k, v)),
        block_mask=mask, scale=scale, enable_gqa=heads != kv_heads,
    )  # fmt: skip
    return out[0].transpose(0, 1).contiguous()
