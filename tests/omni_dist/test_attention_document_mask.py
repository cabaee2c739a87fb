"""The flex backend's document block mask (built from cu_seqlens, no T x T mask) and the GPU backends'
status on CPU. flex_attention's kernels need CUDA and its CPU path has no backward; the block mask and
the mask_mod are plain tensor code that runs here."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from omni_dist.attention import backend_status, resolve_backend, sdpa_varlen
from omni_dist.attention.flex_document import document_block_mask, document_ids, document_mask_mod
from omni_dist.sync_guard import HostSyncGuard


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _dense(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """flex's ordered (counts, column indices) -> the (rows, columns) bool tile matrix."""
    rows, cols = indices.shape[-2:]
    dense = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        dense[r, indices[0, 0, r, : counts[0, 0, r]].long()] = True
    return dense


LAYOUTS = [
    ([5, 1, 9, 0, 3, 14], 4),  # an empty document, single tokens, documents inside one tile
    ([1] * 7 + [20], 8),  # 27 tokens: the last tile is padding for the most part
    ([33], 16),  # one document over three tiles
    ([16, 16], 16),  # documents exactly on tile boundaries: full tiles off the diagonal
    ([40, 2, 30], 8),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("lengths", "block"), LAYOUTS)
def test_block_mask_equals_flex_create_block_mask(lengths, block, causal):
    """Partial and full tiles, and their transposes for the backward, as create_block_mask finds them
    from the dense T x T mask of the same mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask

    total = sum(lengths)
    mine = document_block_mask(_cu(lengths), total, causal, block)
    mod = document_mask_mod(document_ids(_cu(lengths), total, total), causal)
    ref = create_block_mask(mod, None, None, total, total, device="cpu", BLOCK_SIZE=block)
    assert mine.seq_lengths == ref.seq_lengths == (total, total)
    for counts, indices in (
        ("kv_num_blocks", "kv_indices"),
        ("full_kv_num_blocks", "full_kv_indices"),
        ("q_num_blocks", "q_indices"),
        ("full_q_num_blocks", "full_q_indices"),
    ):
        got = _dense(getattr(mine, counts), getattr(mine, indices))
        want = _dense(getattr(ref, counts), getattr(ref, indices))
        assert torch.equal(got, want), (counts, got.int(), want.int())


def test_document_ids_skip_empty_documents_and_mark_padding():
    assert document_ids(_cu([2, 0, 3]), 5, 8).tolist() == [0, 0, 2, 2, 2, -1, -1, -1]


def test_block_mask_is_built_without_host_sync():
    """Every tensor counts as a device tensor here: no .item(), no data-dependent size."""
    cu = _cu([300, 1, 129, 1000, 7])
    with HostSyncGuard("cpu") as guard:
        document_block_mask(cu, 1437, True)
    assert guard.events == []


@pytest.mark.parametrize("causal", [True, False])
def test_flex_forward_with_the_document_mask_equals_per_document_sdpa(causal):
    """flex_attention's reference (unfused) path on CPU with our mask and grouped-query heads."""
    from torch.nn.attention.flex_attention import flex_attention

    lengths = [5, 1, 9, 0, 3, 14]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(32, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    mask = document_block_mask(_cu(lengths), 32, causal, block=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": meant here
        out = flex_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=mask, enable_gqa=True)
    want = sdpa_varlen(q, k, v, _cu(lengths), 14, None, causal)
    torch.testing.assert_close(out[0].transpose(0, 1), want)


def test_gpu_backends_are_unavailable_on_cpu_and_auto_says_why(caplog):
    status = backend_status("cpu")
    assert status["sdpa"] == "ok"
    for name in ("cudnn", "flex", "varlen", "flash_attn"):
        assert status[name] == "needs a CUDA device"
    with caplog.at_level(logging.INFO, logger="omni_dist.attention.backends"):
        name, fn = resolve_backend("auto", "cpu")
    assert name == "sdpa" and fn is sdpa_varlen
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("attention backend: sdpa (auto, order cudnn > ")
    assert "skipped cudnn: needs a CUDA device" in line and "flex: needs a CUDA device" in line
    with pytest.raises(ValueError, match="'flex' cannot run on cpu: needs a CUDA device"):
        resolve_backend("flex", "cpu")
