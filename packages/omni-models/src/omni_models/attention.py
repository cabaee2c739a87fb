"""Packed-sequence attention for HF models, registered through transformers' AttentionInterface.

`register_packed_attention()` adds `omni_sdpa`, `omni_varlen` and `omni_fa` (flash-attn); a model uses one
by setting `config._attn_implementation` / `attn_implementation`. The functions read the packed-batch
keywords that HF forwards from the model call (`cu_seq_lens_q`, `max_length_q`) and, when the call
also passes `sequence_parallel=SequenceParallel(...)`, run Ulysses around the backend. No model file
is edited and nothing is patched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from omni_dist.attention import BACKENDS, SequenceParallel, ulysses_attention

PREFIX = "omni_"


def implementation_name(backend: str) -> str:
    """The `attn_implementation` value for an omni-dist backend name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    # transformers treats any implementation name containing "flash" as its own flash attention
    # (and tries to import it), so the flash-attn backend registers under a name without it.
    return PREFIX + _SHORT.get(backend, backend)


_SHORT = {"flash_attn": "fa"}


def _hf_attention(backend: str) -> Callable[..., tuple[torch.Tensor, None]]:
    attn_fn = BACKENDS[backend]

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError(
                f"{implementation_name(backend)} attention needs cu_seq_lens_q and max_length_q in the model call "
                "(the packing collator provides them)."
            )
        if query.shape[0] != 1:
            raise ValueError(
                f"packed attention expects one packed sequence per call, got batch {query.shape[0]}."
            )
        if dropout and module.training:
            raise ValueError(
                "attention dropout is not supported by packed attention; set attention_dropout=0."
            )
        for unsupported in ("sliding_window", "softcap"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(
                    f"{type(module).__name__} asks for {unsupported}={kwargs[unsupported]}, which packed "
                    "attention does not implement (it would silently attend differently)."
                )
        # HF layout (1, heads, T, D) -> varlen layout (T, heads, D)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        causal = getattr(module, "is_causal", True)
        sp: SequenceParallel | None = kwargs.get("sequence_parallel")
        if sp is not None and sp.size > 1:
            out = ulysses_attention(q, k, v, cu_seqlens, int(max_seqlen), scaling, causal, attn_fn, sp)
        else:
            out = attn_fn(q, k, v, cu_seqlens, int(max_seqlen), scaling, causal)
        return out.unsqueeze(0), None  # HF expects (1, T, heads, D)

    return attention


def register_packed_attention() -> list[str]:
    """Register every backend with transformers (idempotent); returns the implementation names."""
    names = []
    for backend in BACKENDS:
        AttentionInterface.register(implementation_name(backend), _hf_attention(backend))
        names.append(implementation_name(backend))
    return names
