"""Training FLOPs per part, for MFU.

For a transformer stack over sequences of lengths l_i (one packed micro-batch):

    forward = 2 * P * sum(l_i)                      dense matmuls: P = parameters of the blocks
            + 4 * L * d * sum(l_i^2) * c            attention scores (QK^T) and weighted sum (AV),
                                                    L layers, d = attention width, c = 1/2 if causal
    training = 3 * forward                          backward costs twice the forward

For an MoE foundation P counts the parameters a token actually uses (top-k of the experts). The LM
head adds 2 * vocab * hidden per token of forward; embeddings (lookups) add nothing.
"""

from __future__ import annotations

from collections.abc import Sequence


def transformer_flops(params: int, lengths: Sequence[int], layers: int, width: int, causal: bool) -> float:
    tokens = sum(lengths)
    attention = 4 * layers * width * sum(n * n for n in lengths) * (0.5 if causal else 1.0)
    return 3.0 * (2.0 * params * tokens + attention)
