"""Token-budget packing: fill micro-batches from a bounded buffer of measured candidates.

Each micro-batch starts with the oldest candidate (so nothing waits more than one buffer's worth of
batches) and is filled first-fit-decreasing from the rest: larger candidates first, each taken if it
fits every budget (LLM tokens, encoder units, media items). With a few dozen candidates this packs a
long-tailed length mix to within a few percent of the budget (bench/packing.py measures it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar


class Sized(Protocol):
    @property
    def llm_tokens(self) -> int: ...

    @property
    def encoder_units(self) -> int: ...

    @property
    def media_items(self) -> int: ...


T = TypeVar("T", bound=Sized)


@dataclass(frozen=True)
class Budget:
    max_tokens: int
    max_encoder_units: int | None = None
    max_media_items: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_encoder_units", "max_media_items"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"budget {name} must be >= 1, got {value}")

    def over(self, c: Sized) -> str | None:
        """Why a single candidate can never fit (None if it can)."""
        if c.llm_tokens > self.max_tokens:
            return f"{c.llm_tokens} LLM tokens > max_tokens {self.max_tokens}"
        if self.max_encoder_units is not None and c.encoder_units > self.max_encoder_units:
            return f"{c.encoder_units} encoder units > max_encoder_units {self.max_encoder_units}"
        if self.max_media_items is not None and c.media_items > self.max_media_items:
            return f"{c.media_items} media items > max_media_items {self.max_media_items}"
        return None

    def fits(self, tokens: int, units: int, items: int) -> bool:
        return (
            tokens <= self.max_tokens
            and (self.max_encoder_units is None or units <= self.max_encoder_units)
            and (self.max_media_items is None or items <= self.max_media_items)
        )


def take_batch(buffer: list[T], budget: Budget) -> list[T]:
    """Remove and return one micro-batch: the oldest candidate plus the largest others that still fit.

    Every candidate must fit the budget on its own (the caller truncates or drops those that do not).
    The batch keeps buffer order, so the stream is the same however the candidates were sized.
    """
    if not buffer:
        return []
    first = buffer[0]
    tokens, units, items = first.llm_tokens, first.encoder_units, first.media_items
    chosen = {0}
    order = sorted(range(1, len(buffer)), key=lambda i: (-buffer[i].llm_tokens, i))
    for i in order:
        c = buffer[i]
        if budget.fits(tokens + c.llm_tokens, units + c.encoder_units, items + c.media_items):
            chosen.add(i)
            tokens += c.llm_tokens
            units += c.encoder_units
            items += c.media_items
            if tokens == budget.max_tokens:
                break
    batch = [buffer[i] for i in sorted(chosen)]
    buffer[:] = [c for i, c in enumerate(buffer) if i not in chosen]
    return batch
