"""Data sources: WebDataset tar shards, Parquet files and JSONL files, behind one small Protocol.

A source lists its shards and reads one shard as a sequence of records, each with its position in the
shard and its key: the pair (shard, position) is the restore key the loader saves, and the key is
checked on restore so a shard that changed under a checkpoint is an error, not a silent different
stream. A record that cannot be parsed comes back with its error instead of a sample; a shard that
cannot be opened or read further ends with one error record (reason in `SHARD_REASONS`). The loader
counts both and goes on.

Positions are seekable and unique within a shard: a JSONL line's byte offset, a Parquet row number,
a tar sample's ordinal. The built-in sources also implement the optional `Splittable` methods:
`size(shard)` (positions in the shard, None if it cannot be sized) and `read(shard, start, end)` (the
records whose position is in [start, end), reached with one seek), so one shard can be split among
readers and a reader resumes where it stopped without re-reading (`omni_data.splits`). A registered
source without them keeps working: its shards are read whole.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import stat
import tarfile
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from omni_data.schema import Sample, SampleError, parse_sample


@dataclass(frozen=True)
class Record:
    shard: str
    index: int  # position in the shard (JSONL: byte offset; Parquet: row; tar: ordinal): restore key
    key: str
    sample: Sample | None
    error: SampleError | None = None
    end: int | None = None  # the next record's position: a read from here continues after this one


class Source(Protocol):
    name: str

    def shards(self) -> list[str]: ...

    def read(self, shard: str) -> Iterator[Record]: ...


class Splittable(Source, Protocol):
    """Optional: a source whose shards can be sized and read from any position (one seek)."""

    size_is_cheap: bool  # False: sizing scans the shard, so it is split only when shards are too few

    def size(self, shard: str) -> int | None: ...

    def read(self, shard: str, start: int = 0, end: int | None = None) -> Iterator[Record]: ...


def expand_paths(paths: str | list[str]) -> list[str]:
    """Expand globs and `{000..009}` braces; the result is sorted so every rank sees the same list."""
    import braceexpand  # a dependency of webdataset

    out: list[str] = []
    for pattern in [paths] if isinstance(paths, str) else paths:
        for p in braceexpand.braceexpand(os.path.expanduser(pattern)):
            matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
            if not matches:
                raise FileNotFoundError(
                    f"no files match {p!r} (resolved {os.path.abspath(p)}; relative paths resolve against "
                    "the working directory)"
                )
            out.extend(matches)
    if not out:
        raise FileNotFoundError(f"no shards in {paths!r}")
    return sorted(dict.fromkeys(out))


def _reader(root: str) -> Callable[[str], bytes]:
    def read(path: str) -> bytes:
        with open(path if os.path.isabs(path) else os.path.join(root, path), "rb") as f:
            return f.read()

    return read


def _record(shard: str, index: int, key: str, doc: Any, source: str, media, read_path, end: int) -> Record:
    try:
        sample = parse_sample(doc, key=key, source=source, media_bytes=media, read_path=read_path)
    except SampleError as e:
        return Record(shard, index, key, None, e, end)
    return Record(shard, index, key, sample, None, end)


def _regular_file(path: str) -> os.stat_result | None:
    """The stat of a readable regular file, else None (never opens it: a FIFO would block)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) and os.access(path, os.R_OK) else None


class _FileSource:
    """Shards are files (globs and braces expanded); referenced media resolve against media_root."""

    def __init__(self, name: str, paths: str | list[str], media_root: str | None = None):
        self.name = name
        self._shards = expand_paths(paths)
        self._media_root = media_root

    def shards(self) -> list[str]:
        return list(self._shards)


# webdataset's own rules for which tar members form samples (tar_file_iterator's defaults, then
# group_by_keys: a new sample starts where the key prefix changes); the header scan must agree.
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_TAR_OFFSETS: OrderedDict[tuple[str, int, int], array] = OrderedDict()
_TAR_CACHE_SIZE = 256


def tar_sample_offsets(path: str, cache: dict | None = None) -> array | None:
    """Byte offset of each sample's first member header in a tar shard (None: not a readable tar).

    A header-only walk (member data is seeked over, never read), cached per (path, size, mtime) in
    `cache` (default: a bounded one per process). A damaged tail ends the list: the samples before it
    keep their ordinals.
    """
    from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

    st = _regular_file(path)
    if st is None:
        return None
    cache_key = (path, st.st_size, st.st_mtime_ns)
    if cache is not None and (hit := cache.get(cache_key)) is not None:
        return hit
    if (hit := _TAR_OFFSETS.get(cache_key)) is not None:
        _TAR_OFFSETS.move_to_end(cache_key)
        if cache is not None:
            cache[cache_key] = hit
        return hit
    offsets, current = array("q"), None
    try:
        with tarfile.open(path, "r:") as tf:
            while (info := tf.next()) is not None:
                tf.members = []  # headers only: memory stays flat on large shards
                name = info.name
                if not info.isreg() or name is None:
                    continue
                if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
                    continue
                if _SKIP_META.match(name):
                    continue
                prefix, _ = base_plus_ext(name)
                if prefix is not None and prefix != current:
                    offsets.append(info.offset)
                    current = prefix
    except (tarfile.TarError, OSError, EOFError):
        if not offsets:
            return None
    _TAR_OFFSETS[cache_key] = offsets
    while len(_TAR_OFFSETS) > _TAR_CACHE_SIZE:
        _TAR_OFFSETS.popitem(last=False)
    if cache is not None:
        cache[cache_key] = offsets
    return offsets


class WebDatasetSource(_FileSource):
    """Tar shards in WebDataset layout: `<key>.json` holds the sample, `<key>.<name>` its inline media.

    Members are read with webdataset's tar iterator and grouped by key, so shards written by
    `webdataset.ShardWriter` and by the preprocessing job read the same way. A sample's position is its
    ordinal in the shard; reading from ordinal k seeks to its first header (`tar_sample_offsets`).
    Sizing scans the headers, so tar shards are split only when there are fewer than readers.
    """

    size_is_cheap = False

    def __init__(self, name: str, paths: str | list[str], media_root: str | None = None):
        super().__init__(name, paths, media_root)
        # Scans made in the rank's process travel with the source to loader workers (even spawned).
        self._offsets: dict[tuple[str, int, int], array] = {}

    def size(self, shard: str) -> int | None:
        offsets = tar_sample_offsets(shard, self._offsets)
        return None if offsets is None else len(offsets)

    def read(self, shard: str, start: int = 0, end: int | None = None) -> Iterator[Record]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        read_path = _reader(self._media_root or os.path.dirname(shard))
        try:
            stream = open(shard, "rb")  # noqa: SIM115 - closed in finally, after the generator ends
        except OSError as e:
            yield Record(shard, start, "", None, SampleError("shard_open", str(e)))
            return
        index, skip = start, 0
        try:
            if start > 0:
                offsets = tar_sample_offsets(shard, self._offsets)
                if offsets is None:  # not seekable (e.g. compressed): skip from the start
                    index, skip = 0, start
                elif start >= len(offsets):
                    if start > len(offsets):
                        yield Record(
                            shard,
                            start,
                            "",
                            None,
                            SampleError("shard_read", f"no sample {start}: the shard has {len(offsets)}"),
                        )
                    return
                else:
                    stream.seek(offsets[start])
            members = ({**m, "__url__": shard} for m in tar_file_iterator(stream))
            for raw in group_by_keys(members):
                if end is not None and index >= end:
                    break
                if skip:
                    skip -= 1
                    index += 1
                    continue
                key = raw["__key__"]
                if "json" not in raw:
                    rec = Record(
                        shard, index, key, None, SampleError("missing_field", "no .json member"), index + 1
                    )
                else:
                    rec = _record(shard, index, key, raw["json"], self.name, raw.get, read_path, index + 1)
                yield rec
                index += 1
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            # A broken header or truncated member: the rest of this shard cannot be read.
            reason = "shard_open" if index == 0 else "shard_read"
            yield Record(shard, index, "", None, SampleError(reason, f"{type(e).__name__}: {e}"))
        finally:
            stream.close()


_PARQUET_META: OrderedDict[tuple[str, int, int], int | None] = OrderedDict()


class ParquetSource(_FileSource):
    """Parquet files with a `json` string column and an optional `media` column of {name, data} lists.

    A sample's position is its row number in the file. Reading rows [start, end) decodes only the row
    groups that overlap them, in batches of `batch_rows`: with many row groups a reader of 1/R of a
    file decodes about 1/R of it; a file written as one row group is decoded (streamed, in batches) up
    to `end` by every reader of a piece of it.
    """

    size_is_cheap = True  # the footer

    def __init__(
        self, name: str, paths: str | list[str], media_root: str | None = None, batch_rows: int = 256
    ):
        super().__init__(name, paths, media_root)
        self._batch_rows = batch_rows

    def size(self, shard: str) -> int | None:
        import pyarrow.parquet as pq

        st = _regular_file(shard)
        if st is None:
            return None
        cache_key = (shard, st.st_size, st.st_mtime_ns)
        if cache_key not in _PARQUET_META:
            try:
                md = pq.read_metadata(shard)
                rows = md.num_rows if "json" in md.schema.to_arrow_schema().names else None
            except (OSError, ValueError):
                rows = None  # read whole by one reader, which reports why it cannot be read
            _PARQUET_META[cache_key] = rows
            while len(_PARQUET_META) > 4096:
                _PARQUET_META.popitem(last=False)
        return _PARQUET_META[cache_key]

    def read(self, shard: str, start: int = 0, end: int | None = None) -> Iterator[Record]:
        import pyarrow.parquet as pq

        read_path = _reader(self._media_root or os.path.dirname(shard))
        try:
            pf = pq.ParquetFile(shard)
            if "json" not in pf.schema_arrow.names:
                raise ValueError(f"no 'json' column (columns: {pf.schema_arrow.names})")
        except (OSError, ValueError) as e:
            yield Record(shard, start, "", None, SampleError("shard_open", f"{type(e).__name__}: {e}"))
            return
        columns = [c for c in ("json", "media") if c in pf.schema_arrow.names]
        md = pf.metadata
        stop = md.num_rows if end is None else min(end, md.num_rows)
        groups, row, first = [], 0, None
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if row < stop and row + n > start:
                groups.append(g)
                first = row if first is None else first
            row += n
        if not groups:
            return
        row = first
        name = os.path.basename(shard)
        try:
            for batch in pf.iter_batches(batch_size=self._batch_rows, columns=columns, row_groups=groups):
                n = batch.num_rows
                lo, hi = max(start - row, 0), min(stop - row, n)
                if lo < hi:
                    part = batch.slice(lo, hi - lo)
                    docs = part.column("json").to_pylist()
                    media = part.column("media").to_pylist() if "media" in columns else [None] * len(docs)
                    for j, (doc, items) in enumerate(zip(docs, media, strict=True)):
                        index = row + lo + j
                        files = {m["name"]: m["data"] for m in items or []}
                        yield _record(
                            shard,
                            index,
                            f"{name}:{index}",
                            doc if doc is not None else "",
                            self.name,
                            files.get,
                            read_path,
                            index + 1,
                        )
                row += n
                if row >= stop:
                    break
        except OSError as e:
            yield Record(shard, row, "", None, SampleError("shard_read", f"{type(e).__name__}: {e}"))


class JsonlSource(_FileSource):
    """JSONL files, one sample per line; inline media as base64 in the line's `files` object.

    A line's position is the byte offset where it starts, and its key is `<file name>@<offset>` (the
    sample id of a document without an "id"). Reading from byte `start` seeks there and skips the rest
    of the line it falls in (that line belongs to the piece where it starts); balanced splits are by
    bytes.
    """

    size_is_cheap = True  # a stat

    def size(self, shard: str) -> int | None:
        st = _regular_file(shard)
        return None if st is None else st.st_size

    def read(self, shard: str, start: int = 0, end: int | None = None) -> Iterator[Record]:
        read_path = _reader(self._media_root or os.path.dirname(shard))
        try:
            f = open(shard, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as e:
            yield Record(shard, start, "", None, SampleError("shard_open", str(e)))
            return
        name = os.path.basename(shard)
        pos = start
        with f:
            try:
                if start > 0:  # byte start-1 is "\\n" exactly when a line starts at `start`
                    f.seek(start - 1)
                    pos = start - 1 + len(f.readline())
                while end is None or pos < end:
                    line = f.readline()
                    if not line:
                        return
                    index, pos = pos, pos + len(line)
                    key = f"{name}@{index}"
                    try:
                        doc = json.loads(line)
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        yield Record(shard, index, key, None, SampleError("bad_json", str(e)), pos)
                        continue
                    files = doc.get("files", {}) if isinstance(doc, Mapping) else {}
                    yield _record(shard, index, key, doc, self.name, inline_files(files), read_path, pos)
            except OSError as e:
                yield Record(shard, pos, "", None, SampleError("shard_read", f"{type(e).__name__}: {e}"))


def inline_files(files: Any) -> Callable[[str], bytes | None]:
    """media_bytes of a JSONL document's `files` object (name -> base64); None for a name it lacks."""

    def get(name: str) -> bytes | None:
        value = files.get(name) if isinstance(files, Mapping) else None
        if not isinstance(value, str):
            return None
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            return None

    return get


SOURCES: dict[str, Callable[..., Source]] = {
    "webdataset": WebDatasetSource,
    "parquet": ParquetSource,
    "jsonl": JsonlSource,
}


def register_source(kind: str, factory: Callable[..., Source]) -> None:
    """Add a data source kind; registering the same factory again (a plugin loaded twice) is a no-op."""
    if SOURCES.get(kind, factory) is not factory:
        raise ValueError(f"source kind {kind!r} is already registered (as {SOURCES[kind]!r})")
    SOURCES[kind] = factory
