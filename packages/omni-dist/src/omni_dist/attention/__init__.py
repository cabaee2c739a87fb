"""Attention over packed sequences (backends) and Ulysses sequence parallelism around them."""

from omni_dist.attention.backends import (
    BACKENDS,
    backend_status,
    block_causal_mask,
    resolve_backend,
    sdpa_varlen,
)
from omni_dist.attention.ulysses import SequenceParallel, ulysses_attention

__all__ = [
    "BACKENDS",
    "SequenceParallel",
    "backend_status",
    "block_causal_mask",
    "resolve_backend",
    "sdpa_varlen",
    "ulysses_attention",
]
