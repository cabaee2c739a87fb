"""Processors turn samples into model tensors and report token counts before any media is decoded.

Two steps, so the packer can budget before paying for decoding: `measure` tokenizes the text and asks
each media processor how many LLM tokens and encoder units an item becomes (from its header, or from
counts recorded by preprocessing); `process` decodes only the media of samples the packer selected.

Media processors come from the model side (omni-models) through omni-train; omni-data only knows the
`MediaProcessor` Protocol (omni_dist.media, with MediaCount), so the two packages never import each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from omni_data.schema import MediaItem, Sample, SampleError
from omni_dist.media import MediaCount, MediaProcessor
from omni_dist.sequence import IGNORE_INDEX


@dataclass(frozen=True)
class MediaSpan:
    item: MediaItem
    count: MediaCount
    start: int  # first placeholder position in the sample's input_ids
    marker_start: int  # position of the modality's start marker (the span ends with its end marker)


@dataclass(frozen=True)
class Measured:
    """A tokenized sample, media not yet decoded: what the packer budgets with."""

    sample: Sample
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # unshifted; IGNORE_INDEX where no text loss
    media: tuple[MediaSpan, ...]
    truncated: bool = False

    @property
    def llm_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def text_tokens(self) -> int:
        """Tokens that are not media placeholders (markers included)."""
        return self.llm_tokens - sum(m.count.llm_tokens for m in self.media)

    @property
    def encoder_units(self) -> int:
        return sum(m.count.encoder_units for m in self.media)

    @property
    def media_items(self) -> int:
        return len(self.media)

    @property
    def cost(self) -> int:
        """Compute proxy for balancing: attention in encoders grows with units^2 per item."""
        return self.llm_tokens + sum(m.count.encoder_units**2 for m in self.media)

    def truncate(self, max_tokens: int) -> Measured:
        """Keep the first max_tokens, never splitting a media item (a cut item is dropped whole)."""
        if self.llm_tokens <= max_tokens:
            return self
        cut = max_tokens
        for m in self.media:
            end = m.start + m.count.llm_tokens + 1  # inclusive of the end marker
            if m.marker_start < cut <= end:
                cut = m.marker_start
        kept = tuple(m for m in self.media if m.marker_start < cut)
        return replace(
            self, input_ids=self.input_ids[:cut], labels=self.labels[:cut], media=kept, truncated=True
        )


@dataclass
class ProcessedMedia:
    modality: str
    generate: bool
    tensors: dict[str, torch.Tensor]
    llm_tokens: int
    encoder_units: int
    start: int  # first placeholder position inside its sample
    # A part of an interleaved item: its placeholder positions inside the sample (not contiguous)
    offsets: torch.Tensor | None = None

    @property
    def positions(self) -> torch.Tensor:
        """Its placeholder positions inside its sample, in the order its features fill them."""
        if self.offsets is not None:
            return self.offsets
        return torch.arange(self.start, self.start + self.llm_tokens)


@dataclass
class ProcessedSample:
    id: str
    source: str
    input_ids: torch.Tensor  # (L,) int64
    labels: torch.Tensor  # (L,) int64, unshifted
    media: list[ProcessedMedia] = field(default_factory=list)
    position_ids: torch.Tensor | None = None  # (rows, L) from the model's PositionFn; None: 0..L-1


class PositionFn(Protocol):
    """A model's own position ids for one sample (e.g. M-RoPE's (3, L) rows t/h/w), starting at 0."""

    def __call__(self, input_ids: torch.Tensor, media: Sequence[ProcessedMedia], /) -> torch.Tensor: ...


class Processor(Protocol):
    def measure(self, sample: Sample) -> Measured: ...

    def process(self, measured: Measured) -> ProcessedSample: ...


def _media_call(fn, item: MediaItem):
    try:
        return fn(item)
    except SampleError:
        raise
    except ValueError as e:
        raise SampleError("decode_error", f"{item.modality} {item.name!r}: {e}") from None


def modality_tokens(modality: str) -> tuple[str, str, str]:
    """The start marker, placeholder and end marker of a modality (special tokens in the tokenizer)."""
    return f"<|{modality}_start|>", f"<|{modality}|>", f"<|{modality}_end|>"


class ChatProcessor:
    """Text through the tokenizer's chat template, media as `start, placeholder x n, end` tokens.

    The marker tokens are `modality_tokens(m)` unless `markers[m]` names the model's own (a pretrained
    family's, e.g. `<|vision_start|>`, `<|image_pad|>`, `<|vision_end|>`); `positions`, when given,
    makes each processed sample's position ids (the model's M-RoPE rows).

    Labels cover assistant turns only (found by rendering each conversation prefix, so any template
    that renders a prefix as a prefix works); placeholders and markers of input media get no text
    loss; a generation target keeps its start marker's label (the model learns to start the image)
    while its own positions are the decoder's to score.
    """

    def __init__(
        self,
        tokenizer: Any,
        media: Mapping[str, MediaProcessor] | None = None,
        targets: Mapping[str, MediaProcessor] | None = None,
        use_recorded_counts: bool = True,
        markers: Mapping[str, tuple[str, str, str]] | None = None,
        positions: PositionFn | None = None,
    ):
        self.tokenizer = tokenizer
        self.media = dict(media or {})
        self.targets = dict(targets or {})
        self.use_recorded_counts = use_recorded_counts
        self.positions = positions
        self._names: dict[str, tuple[str, str, str]] = {}
        self._layout_tokens: dict[str, int] = {}  # interleaved layouts' token ids, as first met
        self._ids: dict[str, tuple[int, int, int]] = {}
        vocab = tokenizer.get_vocab()
        for modality in {*self.media, *self.targets}:
            names = (markers or {}).get(modality) or modality_tokens(modality)
            missing = [n for n in names if n not in vocab]
            if missing:
                raise ValueError(
                    f"tokenizer lacks the {modality!r} tokens {missing}: add them as special tokens "
                    f"(omni_data.processor.modality_tokens gives the names)"
                )
            self._names[modality] = tuple(names)
            self._ids[modality] = tuple(vocab[n] for n in names)

    def marker_ids(self, modality: str) -> tuple[int, int, int]:
        """Token ids of the modality's (start marker, placeholder, end marker)."""
        return self._ids[modality]

    def _render(self, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )

    def _processor_for(self, item: MediaItem) -> MediaProcessor:
        table = self.targets if item.generate else self.media
        proc = table.get(item.modality)
        if proc is None:
            kind = "generation target" if item.generate else "input"
            raise SampleError("unknown_modality", f"no {kind} processor for {item.modality!r}")
        return proc

    def measure(self, sample: Sample) -> Measured:
        items: list[MediaItem] = []
        chat = []
        for m in sample.messages:
            text = []
            for p in m.content:
                if p.media is None:
                    text.append(p.text or "")
                else:
                    self._processor_for(p.media)
                    text.append(self._names[p.type][1])
                    items.append(p.media)
            chat.append({"role": m.role, "content": "".join(text)})
        full = self._render(chat, generation_prompt=False)
        spans = []  # character spans of assistant turns
        for i, m in enumerate(chat):
            if m["role"] != "assistant":
                continue
            before = self._render(chat[:i], generation_prompt=True)
            upto = self._render(chat[: i + 1], generation_prompt=False)
            if not full.startswith(upto) or not upto.startswith(before):
                raise ValueError("the chat template does not render a conversation prefix as a prefix")
            spans.append((len(before), len(upto)))
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        counts = self._counts(sample, items)
        placeholder_of = {self._ids[k][1]: k for k in self._ids}
        ids: list[int] = []
        labels: list[int] = []
        media: list[MediaSpan] = []
        for tok, (a, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            in_answer = any(s <= a < e for s, e in spans)
            if tok in placeholder_of and len(media) < len(items):
                item = items[len(media)]
                start_id, ph_id, end_id = self._ids[item.modality]
                if tok != ph_id:
                    raise SampleError("bad_field", "placeholder order does not match the media order")
                count = counts[len(media)]
                inner = self._layout_ids(item, count) if count.layout else [ph_id] * count.llm_tokens
                media.append(MediaSpan(item, count, len(ids) + 1, len(ids)))
                ids += [start_id, *inner, end_id]
                start_label = start_id if (item.generate and in_answer) else IGNORE_INDEX
                labels += [start_label, *[IGNORE_INDEX] * (len(inner) + 1)]
                continue
            ids.append(tok)
            labels.append(tok if in_answer else IGNORE_INDEX)
        if len(media) != len(items):
            raise SampleError("bad_field", f"{len(items)} media items but {len(media)} placeholders survived")
        return Measured(sample, tuple(ids), tuple(labels), tuple(media))

    def _layout_ids(self, item: MediaItem, count: MediaCount) -> list[int]:
        """The token ids of an interleaved item's layout (its processor's runs, checked)."""
        new = {t for t, _ in count.layout} - set(self._layout_tokens)
        if new:  # each token looked up once: a vocabulary (~150K for Qwen) is costly to build per item
            vocab = self.tokenizer.get_vocab()
            unknown = sorted(t for t in new if t not in vocab)
            if unknown:
                raise ValueError(
                    f"the {item.modality} processor's layout names tokens {unknown} the tokenizer lacks"
                )
            self._layout_tokens |= {t: vocab[t] for t in new}
        ids = [self._layout_tokens[t] for t, n in count.layout for _ in range(n)]
        parts = {self._ids[m][1]: m for m in self.media}
        found = {parts[i] for i in ids if i in parts}
        if len(ids) != count.llm_tokens or found != {m for m, _ in count.part_units}:
            raise ValueError(
                f"the {item.modality} processor's layout has {len(ids)} tokens and parts {sorted(found)}; "
                f"its count says {count.llm_tokens} and {sorted(m for m, _ in count.part_units)}"
            )
        return ids

    def _counts(self, sample: Sample, items: list[MediaItem]) -> list[MediaCount]:
        recorded = sample.known_tokens() if self.use_recorded_counts else {}
        seen: dict[str, int] = {}
        out = []
        for item in items:
            j = seen.get(item.modality, 0)
            seen[item.modality] = j + 1
            rec = recorded.get(item.modality)
            if isinstance(rec, list) and j < len(rec) and isinstance(rec[j], list) and len(rec[j]) == 2:
                out.append(MediaCount(int(rec[j][0]), int(rec[j][1])))
            else:
                out.append(_media_call(self._processor_for(item).count, item))
        return out

    def process(self, measured: Measured) -> ProcessedSample:
        ids = torch.tensor(measured.input_ids, dtype=torch.long)
        media = []
        for m in measured.media:
            out = _media_call(self._processor_for(m.item).process, m.item)
            if m.count.layout:
                media += self._parts(m, out, ids)
                continue
            if any(isinstance(v, Mapping) for v in out.values()):
                raise SampleError(
                    "bad_field",
                    f"{m.item.modality} {m.item.name!r}: processed as interleaved parts, but its count has no "
                    "layout (counts recorded by a preprocessing for another model? re-run it for this one)",
                )
            item = m.item
            media.append(
                ProcessedMedia(
                    item.modality, item.generate, out, m.count.llm_tokens, m.count.encoder_units, m.start
                )
            )
        s = measured.sample
        positions = self.positions(ids, media) if self.positions is not None else None
        return ProcessedSample(
            s.id, s.source, ids, torch.tensor(measured.labels, dtype=torch.long), media, positions
        )

    def _parts(self, span: MediaSpan, out: Mapping[str, Any], ids: torch.Tensor) -> list[ProcessedMedia]:
        """An interleaved item's parts, each at its own placeholders inside the item's span."""
        if set(out) != {m for m, _ in span.count.part_units}:
            raise SampleError(
                "bad_field",
                f"{span.item.modality} {span.item.name!r}: processed parts {sorted(out)}, "
                f"counted {sorted(m for m, _ in span.count.part_units)}",
            )
        inner = ids[span.start : span.start + span.count.llm_tokens]
        parts = []
        for modality, units in span.count.part_units:
            offsets = torch.nonzero(inner == self._ids[modality][1]).flatten() + span.start
            parts.append(
                ProcessedMedia(
                    modality, False, out[modality], offsets.numel(), units, int(offsets[0]), offsets
                )
            )
        return parts
