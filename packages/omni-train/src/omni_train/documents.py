"""Document lengths of a recipe's data, and the attention work they give a packed micro-batch.

Attention in a packed micro-batch is per document: its FLOPs grow with sum(l_i^2) over the micro-batch's
documents, not with its length squared. `packed_micro_batches` runs omni-data's packer
(omni_data.packing.take_batch over a buffer of data.pack_buffer candidates) on a sample of document
lengths, each cut to the budget (data.overlong: truncate) or dropped (drop) as the loader does, and
returns the mean real tokens and sum of l_i^2 per micro-batch. Where the lengths come from
(DocumentLengths.origin):

    index        the llm_tokens column of a preprocessed directory's index.parquet (omni-data preprocess)
    sampled      documents read from the sources (a few evenly spaced shards each, quotas by source
                 weight), measured by the trainer's processor: the recipe's tokenizer and chat
                 template, the model's media processors
    given        lengths given on the command line (`--doc-tokens`)
    fallback     nothing readable: one document per micro-batch (the whole budget), with the reason
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_train.config import TrainConfig

SAMPLE_DOCUMENTS = 256  # documents read from the sources by default
SAMPLE_SHARDS = 8  # shards per source they are read from (evenly spaced)
MIN_MICRO_BATCHES = 64  # the packing simulation cycles the sample until it has made this many
MAX_STREAM = 50_000  # documents it packs at most


@dataclass(frozen=True)
class Packing:
    """Means per micro-batch of a packed stream: real tokens, sum of squared document lengths, and the
    share of tokens with a loss (rows of the LM head)."""

    tokens: float
    sum_sq: float
    labelled: float = 1.0
    micro_batches: int = 0  # that the means are over (0: not simulated)

    @classmethod
    def one_document(cls, tokens: float) -> Packing:
        """The micro-batch is one document of `tokens`."""
        return cls(tokens, float(tokens) ** 2)

    def with_tokens(self, tokens: float) -> Packing:
        """The same documents, `tokens` real tokens per micro-batch (attention per token kept)."""
        return Packing(tokens, self.sum_sq * tokens / self.tokens, self.labelled, self.micro_batches)


@dataclass(frozen=True)
class _Doc:  # what take_batch budgets with
    llm_tokens: int
    encoder_units: int = 0
    media_items: int = 0


def packed_micro_batches(
    lengths: Sequence[int],
    max_tokens: int,
    pack_buffer: int = 64,
    overlong: str = "truncate",
    seed: int = 0,
) -> Packing:
    """Mean tokens and sum of l_i^2 per micro-batch when documents of `lengths` (in a seeded random order,
    cycled until MIN_MICRO_BATCHES are made) are packed into `max_tokens` by omni-data's packer. Only
    micro-batches made from a full buffer count (the stream's end, where the buffer drains, is not
    typical), unless there are no others."""
    from omni_data.packing import Budget, take_batch

    docs = [min(n, max_tokens) if overlong == "truncate" else n for n in lengths if n > 0]
    docs = [n for n in docs if n <= max_tokens]
    if not docs:
        raise ValueError(
            f"no document of the sample fits data.max_tokens {max_tokens} (data.overlong: {overlong})"
        )
    rng = random.Random(seed)
    passes = -(-MIN_MICRO_BATCHES * max_tokens // sum(docs)) + 1
    stream: list[int] = []
    for _ in range(max(1, min(passes, MAX_STREAM // len(docs)))):
        order = docs[:]
        rng.shuffle(order)
        stream += order
    budget = Budget(max_tokens)
    source = iter(stream)
    buffer: list[_Doc] = []
    full: list[list[_Doc]] = []
    drained: list[list[_Doc]] = []
    while True:
        while len(buffer) < pack_buffer and (n := next(source, None)) is not None:
            buffer.append(_Doc(n))
        if not buffer:
            break
        (full if len(buffer) == pack_buffer else drained).append(take_batch(buffer, budget))
    batches = full or drained
    tokens = sum(d.llm_tokens for b in batches for d in b)
    sum_sq = sum(d.llm_tokens**2 for b in batches for d in b)
    return Packing(tokens / len(batches), sum_sq / len(batches), 1.0, len(batches))


@dataclass(frozen=True)
class DocumentLengths:
    """LLM tokens per document of a recipe's data (empty: unknown, one document per micro-batch), the
    share of tokens with a loss, and where they came from (one line for the plan's output)."""

    lengths: tuple[int, ...]
    origin: str
    labelled: float = 1.0
    warning: str | None = None  # set when the lengths are a fallback: why

    @classmethod
    def fallback(cls, why: str) -> DocumentLengths:
        return cls((), "fallback: one document per micro-batch", warning=why)

    def packing(self, max_tokens: int, pack_buffer: int, overlong: str) -> Packing:
        if not self.lengths:
            return Packing.one_document(max_tokens)
        p = packed_micro_batches(self.lengths, max_tokens, pack_buffer, overlong)
        return Packing(p.tokens, p.sum_sq, self.labelled, p.micro_batches)

    def summary(self) -> str:
        """The origin, with the sample's percentiles."""
        if not self.lengths:
            return self.origin
        v = sorted(self.lengths)
        pct = ", ".join(f"p{p} {v[min(len(v) - 1, len(v) * p // 100)]}" for p in (10, 50, 90))
        loss = f", {self.labelled:.0%} of tokens with a loss" if self.labelled < 1 else ""
        return f"{self.origin}; tokens per document: mean {sum(v) / len(v):.0f}, {pct}{loss}"


def given_lengths(spec: str) -> DocumentLengths:
    """`--doc-tokens`: N (every document N tokens), A-B (uniform from A to B) or a comma list."""
    try:
        if "-" in spec:
            a, b = (int(x) for x in spec.split("-"))
            n = min(256, b - a + 1)
            lengths = tuple(a + (b - a) * i // max(1, n - 1) for i in range(n)) if b >= a else ()
        else:
            lengths = tuple(int(x) for x in spec.split(","))
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) < 1:
        raise ValueError(
            f"--doc-tokens {spec!r}: give N, A-B (A <= B) or a comma list of positive token counts"
        )
    return DocumentLengths(lengths, f"given: --doc-tokens {spec}")


def sample_lengths(cfg: TrainConfig, limit: int = SAMPLE_DOCUMENTS, model: Any = None) -> DocumentLengths:
    """About `limit` document lengths of the recipe's training sources (quotas by source weight): from
    the preprocessing index where every shard of a source has one, else measured by the trainer's
    processor (`model`: the recipe's model on meta, built when needed). Unreadable data: the fallback,
    with the reason."""
    from omni_data.dataset import build_sources

    try:
        data = cfg.data_config()
        sources = build_sources(data)
        total = sum(s.weight for s in data.sources)
        measure: Callable | None = None
        lengths: list[int] = []
        measured: list[tuple[int, int]] = []  # (tokens, tokens with a loss) of the measured documents
        parts = []
        for src, sc in zip(sources, data.sources, strict=True):
            quota = max(1, round(limit * sc.weight / total))
            shards = [s for s in src.shards() if os.path.exists(s)]
            if not shards:
                raise FileNotFoundError(f"no shard of {sc.paths!r} is here (e.g. {src.shards()[0]})")
            indexed = _indexed_lengths(shards, quota)
            where = sc.paths if isinstance(sc.paths, str) else ", ".join(sc.paths)
            if indexed is not None:
                lengths += indexed
                parts.append(f"{len(indexed)} documents from {where} (their index.parquet)")
                continue
            if measure is None:
                measure = _measurer(cfg, model)
            got = _measured(src, shards, quota, measure)
            lengths += [n for n, _ in got]
            measured += got
            picked = min(len(shards), SAMPLE_SHARDS)
            parts.append(f"{len(got)} documents from {where} ({picked} of {len(shards)} shards, tokenized)")
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        return DocumentLengths.fallback(f"data.sources unreadable here ({type(e).__name__}: {e})")
    if not lengths:
        return DocumentLengths.fallback("data.sources gave no readable document")
    # the index records no labels: its documents count as all loss tokens
    share = sum(k for _, k in measured) / sum(n for n, _ in measured) if measured else 1.0
    return DocumentLengths(tuple(lengths), "sampled " + "; ".join(parts), labelled=share)


def _indexed_lengths(shards: list[str], quota: int) -> list[int] | None:
    """Up to `quota` llm_tokens, evenly spaced, of these shards' rows in their directories' index.parquet
    (None unless every shard is indexed)."""
    import pyarrow.parquet as pq

    by_dir: dict[Path, set[str]] = {}
    for s in shards:
        by_dir.setdefault(Path(s).parent, set()).add(Path(s).name)
    values: list[int] = []
    for directory, names in by_dir.items():
        index = directory / "index.parquet"
        if not index.is_file():
            return None
        table = pq.read_table(index, columns=["shard", "llm_tokens"]).to_pydict()
        rows = [(s, n) for s, n in zip(table["shard"], table["llm_tokens"], strict=True) if s in names]
        if {s for s, _ in rows} != names:
            return None
        values += [n for _, n in rows if n is not None]
    step = max(1, len(values) // quota)
    return values[::step][:quota]


def _measurer(cfg: TrainConfig, model: Any) -> Callable:
    from omni_train.assembly import chat_processor, meta_model, tokenizer

    model = model if model is not None else meta_model(cfg.model_spec)
    return chat_processor(model, cfg.model_spec, tokenizer(cfg)).measure


def _measured(src, shards: list[str], quota: int, measure: Callable) -> list[tuple[int, int]]:
    """(tokens, tokens with a loss) of up to `quota` documents from evenly spaced shards of `src`."""
    from omni_data.schema import SampleError
    from omni_dist.sequence import IGNORE_INDEX

    count = min(len(shards), SAMPLE_SHARDS)
    picked = [shards[i * len(shards) // count] for i in range(count)]
    per_shard = -(-quota // count)
    out: list[tuple[int, int]] = []
    for shard in picked:
        taken = 0
        records = src.read(shard)
        for rec in records:
            if len(out) >= quota or taken >= per_shard:
                break
            if rec.sample is None:
                continue
            try:
                m = measure(rec.sample)
            except SampleError:  # the loader skips it too
                continue
            out.append((m.llm_tokens, sum(t != IGNORE_INDEX for t in m.labels)))
            taken += 1
        if hasattr(records, "close"):  # a reader stopped early closes its file now
            records.close()
    return out
