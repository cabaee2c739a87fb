"""Who reads what: one epoch's shards cut into pieces, one list of pieces per reader.

A reader is a (DP rank or data stream, loader worker) slot. Every record has a *position* in its
shard, seekable and unique: a JSONL line's byte offset, a Parquet row number, a tar sample's ordinal
(see `omni_data.sources`). A `Piece` is a half-open range of positions `[start, end)` of one shard
(`end=None`: to the end of the shard), and a record belongs to the piece that holds its *start*, so
any cut point gives an exact partition (a JSONL cut inside a line gives the line to the piece where
it starts).

`plan_epoch` shuffles the shard order per epoch (seeded), lays the shards whose size is known end to
end (total T positions) and gives reader r the positions [r*T//R, (r+1)*T//R): every reader gets
within one record (Parquet, tar) or one line's bytes (JSONL) of the same share, whatever the number of
shards. Shards of unknown size (a source without `size`, a tar source with enough shards to go round,
an unreadable file) are dealt whole, round robin, as before splitting existed. JSONL is balanced by
bytes, which tracks tokens (and so steps) better than line counts; lines of very unequal length give
unequal sample counts.

Pure functions plus a probe: every rank and worker computes the same plan from the same sizes, with
no communication. The plan of any (epoch, readers) can be recomputed later, so a saved reader position
(piece index, position in the piece) names exactly what was consumed: what a resume on another layout
needs to hand out the rest.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

Size = int | None  # positions in a shard; None: unknown (the shard is read whole)


class Piece(NamedTuple):
    shard: str
    start: int  # first position
    end: int | None  # one past the last position; None: to the end of the shard


def seeded(*parts: Any) -> random.Random:
    return random.Random(":".join(map(str, parts)))  # str seeds hash with sha512: same in every process


def splittable(source: Any) -> bool:
    """Sources with `size(shard)` also take `read(shard, start, end)`; others are read whole."""
    return callable(getattr(source, "size", None))


def probe(source: Any, shards: Sequence[str], readers: int) -> list[Size]:
    """Sizes used to split `source` among `readers`; None where a shard is read whole.

    A source whose `size` is cheap (`size_is_cheap`, e.g. a stat or a Parquet footer) is always
    sized; one whose size needs a scan (tar headers) only when its shards cannot go round the readers.
    """
    if not splittable(source):
        return [None] * len(shards)
    if not getattr(source, "size_is_cheap", False) and len(shards) >= readers:
        return [None] * len(shards)
    return [source.size(s) for s in shards]


def fingerprint(shards: Sequence[str], sizes: Sequence[Size]) -> str:
    """A short digest of what a plan was made from: a saved position is valid only for the same."""
    blob = json.dumps([list(shards), list(sizes)]).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def cut_points(total: int, readers: int) -> list[int]:
    """Boundaries of `readers` equal spans of [0, total): span r is [cuts[r], cuts[r + 1])."""
    if readers < 1:
        raise ValueError(f"readers must be >= 1, got {readers}")
    return [r * total // readers for r in range(readers + 1)]


def layout(shards: Sequence[str], sizes: Sequence[Size], readers: int) -> list[list[Piece]]:
    """Pieces per reader, shards in the given order: sized shards end to end in equal spans, then
    unsized shards whole, round robin (all unsized: reader r gets `shards[r::readers]`)."""
    if len(shards) != len(sizes):
        raise ValueError(f"{len(shards)} shards but {len(sizes)} sizes")
    out: list[list[Piece]] = [[] for _ in range(readers)]
    sized = [(s, n) for s, n in zip(shards, sizes, strict=True) if n is not None]
    cuts = cut_points(sum(n for _, n in sized), readers)
    offset, r = 0, 0
    for shard, n in sized:
        lo_shard, hi_shard = offset, offset + n
        while r < readers and cuts[r + 1] <= lo_shard:
            r += 1
        k = r
        while k < readers and cuts[k] < hi_shard:
            lo, hi = max(lo_shard, cuts[k]), min(hi_shard, cuts[k + 1])
            if lo < hi:
                out[k].append(Piece(shard, lo - offset, hi - offset))
            k += 1
        offset = hi_shard
    unsized = [s for s, n in zip(shards, sizes, strict=True) if n is None]
    for j, shard in enumerate(unsized):
        out[j % readers].append(Piece(shard, 0, None))
    return out


def plan_epoch(
    shards: Sequence[str],
    sizes: Sequence[Size],
    readers: int,
    *,
    seed: int,
    epoch: int,
    source_index: int,
    shuffle: bool = True,
) -> list[list[Piece]]:
    """One epoch's pieces per reader for one source (shard order shuffled per epoch when `shuffle`)."""
    order = list(range(len(shards)))
    if shuffle:  # the same permutation as shuffling the shard list itself with this RNG
        seeded(seed, epoch, "shards", source_index).shuffle(order)
    return layout([shards[i] for i in order], [sizes[i] for i in order], readers)


def read_piece(source: Any, piece: Piece, start: int | None = None) -> Iterator[Any]:
    """The records of `piece` from position `start` (default: its start): one seek, no re-read."""
    start = piece.start if start is None else start
    if start == 0 and piece.end is None:
        return iter(source.read(piece.shard))  # works for every source, splittable or not
    return iter(source.read(piece.shard, start, piece.end))
