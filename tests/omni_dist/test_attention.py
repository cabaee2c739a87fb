"""Packed attention backends and Ulysses SP (sync and async) against single-process references.
The 2-rank checks share one spawn (fixture `two_ranks`)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from omni_dist import ParallelConfigError, ParallelDims, ParallelMesh
from omni_dist.attention import (
    SequenceParallel,
    block_causal_mask,
    resolve_backend,
    sdpa_varlen,
    ulysses_attention,
)
from omni_dist.packed import pack, pad_for_sp
from omni_dist.sequence import gather_sequence, shift_labels, slice_for_sp
from tests.harness import run_checks

LENGTHS = [5, 3, 7, 4]  # 19 tokens: not a multiple of 2 or 4


def _qkv(total: int, heads: int, kv_heads: int, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(total, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(total, kv_heads, dim, generator=g, dtype=torch.float64)
    return q, k, v


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_block_causal_mask():
    mask = block_causal_mask(_cu([2, 3]), 5)
    want = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(mask, want)
    assert torch.equal(
        block_causal_mask(_cu([2, 3]), 5, causal=False)[0], torch.tensor([1, 1, 0, 0, 0]).bool()
    )


@pytest.mark.parametrize(("heads", "kv_heads", "causal"), [(4, 4, True), (4, 2, True), (4, 1, False)])
def test_sdpa_packed_equals_each_sample_alone(heads, kv_heads, causal):
    q, k, v = (x.requires_grad_() for x in _qkv(sum(LENGTHS), heads, kv_heads))
    out = sdpa_varlen(q, k, v, _cu(LENGTHS), max(LENGTHS), None, causal)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    start = 0
    for n in LENGTHS:
        s = slice(start, start + n)
        qs, ks, vs = (x.detach()[s].clone().requires_grad_() for x in (q, k, v))
        rep = heads // kv_heads
        ref = F.scaled_dot_product_attention(
            qs.transpose(0, 1), ks.repeat_interleave(rep, 1).transpose(0, 1),
            vs.repeat_interleave(rep, 1).transpose(0, 1), is_causal=causal,
        ).transpose(0, 1)  # fmt: skip
        (ref * grad[s]).sum().backward()
        torch.testing.assert_close(out[s], ref)
        for a, b in ((q, qs), (k, ks), (v, vs)):
            torch.testing.assert_close(a.grad[s], b.grad)
        start += n


@pytest.mark.parametrize(
    ("lengths", "kv_heads", "causal"), [([5, 9, 5, 0, 9, 5], 2, True), ([7, 3, 7], 4, False)]
)
def test_per_document_sdpa_equals_the_block_diagonal_mask(lengths, kv_heads, causal):
    """Documents batched by length (equal ones together, an empty one skipped) == one SDPA over the
    whole sequence with the block-diagonal mask: outputs and gradients."""
    q, k, v = (x.requires_grad_() for x in _qkv(sum(lengths), 4, kv_heads))
    cu = _cu(lengths)
    out = sdpa_varlen(q, k, v, cu, max(lengths), None, causal)
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    rep = 4 // kv_heads
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1), v.repeat_interleave(rep, 1).transpose(0, 1),
        attn_mask=block_causal_mask(cu, sum(lengths), causal),
    ).transpose(0, 1)  # fmt: skip
    want = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_backend_resolution_on_cpu():
    name, fn = resolve_backend("auto", "cpu")
    assert name == "sdpa" and fn is sdpa_varlen
    with pytest.raises(ValueError, match="'flash_attn' cannot run on cpu: needs a CUDA device"):
        resolve_backend("flash_attn", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        resolve_backend("flash", "cpu")


def test_labels_are_shifted_within_samples_and_padding_is_a_segment():
    seq = pack(
        [torch.tensor([1, 2, 3]), torch.tensor([4, 5])],
        [torch.tensor([0, 1, 1]).bool(), torch.ones(2).bool()],
    )
    assert seq.labels[0].tolist() == [2, 3, -100, 5, -100]
    assert seq.position_ids[0].tolist() == [0, 1, 2, 0, 1] and seq.cu_seqlens.tolist() == [0, 3, 5]
    padded = pad_for_sp(seq, 4)
    assert padded.length == 8 and padded.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert padded.labels[0].tolist()[5:] == [-100] * 3 and padded.position_ids[0].tolist()[5:] == [0, 1, 2]
    assert pad_for_sp(padded, 4) is padded
    assert shift_labels(torch.tensor([7, 8, 9]), _cu([3])).tolist() == [8, 9, -100]


CASES = [(8, 8), (8, 2), (8, 1)]  # heads, kv heads (kv < sp exercises repetition)


def _ulysses_vs_reference(sp_size: int) -> dict[str, float]:
    world = dist.get_world_size()
    mesh = ParallelMesh.build(ParallelDims(world_size=world, sp=sp_size), device_type="cpu")
    errors = {}
    total = sum(LENGTHS)
    padded_len = total + (-total % sp_size)
    cu = (
        torch.cat([_cu(LENGTHS), torch.tensor([padded_len], dtype=torch.int32)])
        if padded_len > total
        else _cu(LENGTHS)
    )
    for heads, kv_heads in CASES:
        q, k, v = _qkv(total, heads, kv_heads)
        grad = torch.randn(total, heads, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = sdpa_varlen(*ref_in, _cu(LENGTHS), max(LENGTHS), None, True)
        (ref * grad).sum().backward()
        pad = padded_len - total
        for chunks in (1, 2):
            sp = SequenceParallel.from_mesh(mesh["sp"], overlap_chunks=chunks)
            local = [
                slice_for_sp(F.pad(x, (0, 0, 0, 0, 0, pad)), sp).clone().requires_grad_() for x in (q, k, v)
            ]
            out = ulysses_attention(*local, cu, max(max(LENGTHS), pad), None, True, sdpa_varlen, sp)
            (out * slice_for_sp(F.pad(grad, (0, 0, 0, 0, 0, pad)), sp)).sum().backward()
            real = slice(sp.rank * out.shape[0], min(total, (sp.rank + 1) * out.shape[0]))
            n = real.stop - real.start
            key = f"h{heads}/kv{kv_heads}/chunks{chunks}"
            errors[key] = max(
                (out[:n] - ref[real]).abs().max().item(),
                *(
                    (loc.grad[:n] - r.grad[real]).abs().max().item()
                    for loc, r in zip(local, ref_in, strict=True)
                ),
            )
    # The gather helper: every rank sees the full sequence; gradients come back summed to their owner.
    x = torch.arange(4.0 * sp_size).reshape(4 * sp_size, 1)
    sp = SequenceParallel.from_mesh(mesh["sp"])
    mine = slice_for_sp(x, sp).clone().requires_grad_()
    full = gather_sequence(mine, sp)
    (full * (sp.rank + 1)).sum().backward()
    errors["gather_forward"] = (full - x).abs().max().item()
    errors["gather_backward"] = (mine.grad - sum(range(1, sp_size + 1))).abs().max().item()
    return errors


@pytest.fixture(scope="module")
def two_ranks():
    return run_checks(2, {"ulysses": (_ulysses_vs_reference, (2,)), "bad_heads": (_bad_heads, ())})


@pytest.fixture(scope="module")
def four_ranks():
    return run_checks(4, {"ulysses": (_ulysses_vs_reference, (4,))})


@pytest.mark.parametrize("ranks", ["two_ranks", "four_ranks"])  # sp=2, sp=4
def test_ulysses_matches_single_process(request, ranks):
    for errors in request.getfixturevalue(ranks)["ulysses"]:
        assert errors.keys() >= {f"h{h}/kv{k}/chunks{c}" for h, k in CASES for c in (1, 2)}
        bad = {k: v for k, v in errors.items() if v > 1e-10}
        assert not bad, bad


def _bad_heads() -> str:
    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), sp=2), device_type="cpu")
    q, k, v = _qkv(4, 3, 3)
    try:
        ulysses_attention(
            q, k, v, _cu([4]), 4, None, True, sdpa_varlen, SequenceParallel.from_mesh(mesh["sp"])
        )
    except ParallelConfigError as e:
        return str(e)
    return "no error"


def test_heads_not_divisible_by_sp_is_a_config_error(two_ranks):
    assert "sp (2) must divide the number of attention heads (3)" in two_ranks["bad_heads"][0]
