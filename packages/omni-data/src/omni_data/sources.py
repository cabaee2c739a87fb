"""Data sources: WebDataset tar shards, Parquet files and JSONL files, behind one small Protocol.

A source lists its shards and reads one shard as a sequence of records, each with its index in the
shard and its key: the pair (shard, index) is the restore key the loader saves, and the key is checked
on restore so a shard that changed under a checkpoint is an error, not a silent different stream.
A record that cannot be parsed comes back with its error instead of a sample; a shard that cannot be
opened or read further ends with one error record. The loader counts both and goes on.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from omni_data.schema import Sample, SampleError, parse_sample


@dataclass(frozen=True)
class Record:
    shard: str
    index: int  # position in the shard: the restore key with the shard
    key: str
    sample: Sample | None
    error: SampleError | None = None


class Source(Protocol):
    name: str

    def shards(self) -> list[str]: ...

    def read(self, shard: str) -> Iterator[Record]: ...


def expand_paths(paths: str | list[str]) -> list[str]:
    """Expand globs and `{000..009}` braces; the result is sorted so every rank sees the same list."""
    import braceexpand  # a dependency of webdataset

    out: list[str] = []
    for pattern in [paths] if isinstance(paths, str) else paths:
        for p in braceexpand.braceexpand(os.path.expanduser(pattern)):
            matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
            if not matches:
                raise FileNotFoundError(f"no files match {p!r}")
            out.extend(matches)
    if not out:
        raise FileNotFoundError(f"no shards in {paths!r}")
    return sorted(dict.fromkeys(out))


def _reader(root: str) -> Callable[[str], bytes]:
    def read(path: str) -> bytes:
        with open(path if os.path.isabs(path) else os.path.join(root, path), "rb") as f:
            return f.read()

    return read


def _record(shard: str, index: int, key: str, doc: Any, source: str, media, read_path) -> Record:
    try:
        sample = parse_sample(doc, key=key, source=source, media_bytes=media, read_path=read_path)
    except SampleError as e:
        return Record(shard, index, key, None, e)
    return Record(shard, index, key, sample)


class _FileSource:
    """Shards are files (globs and braces expanded); referenced media resolve against media_root."""

    def __init__(self, name: str, paths: str | list[str], media_root: str | None = None):
        self.name = name
        self._shards = expand_paths(paths)
        self._media_root = media_root

    def shards(self) -> list[str]:
        return list(self._shards)


class WebDatasetSource(_FileSource):
    """Tar shards in WebDataset layout: `<key>.json` holds the sample, `<key>.<name>` its inline media.

    Members are read with webdataset's tar iterator and grouped by key, so shards written by
    `webdataset.ShardWriter` and by the preprocessing job read the same way.
    """

    def read(self, shard: str) -> Iterator[Record]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        read_path = _reader(self._media_root or os.path.dirname(shard))
        try:
            stream = open(shard, "rb")  # noqa: SIM115 - closed in finally, after the generator ends
        except OSError as e:
            yield Record(shard, 0, "", None, SampleError("shard_open", str(e)))
            return
        index = 0
        try:
            members = ({**m, "__url__": shard} for m in tar_file_iterator(stream))
            for raw in group_by_keys(members):
                key = raw["__key__"]
                if "json" not in raw:
                    rec = Record(shard, index, key, None, SampleError("missing_field", "no .json member"))
                else:
                    rec = _record(shard, index, key, raw["json"], self.name, raw.get, read_path)
                yield rec
                index += 1
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            # A broken header or truncated member: the rest of this shard cannot be read.
            reason = "shard_open" if index == 0 else "shard_read"
            yield Record(shard, index, "", None, SampleError(reason, f"{type(e).__name__}: {e}"))
        finally:
            stream.close()


class ParquetSource(_FileSource):
    """Parquet files with a `json` string column and an optional `media` column of {name, data} lists."""

    def __init__(
        self, name: str, paths: str | list[str], media_root: str | None = None, batch_rows: int = 256
    ):
        super().__init__(name, paths, media_root)
        self._batch_rows = batch_rows

    def read(self, shard: str) -> Iterator[Record]:
        import pyarrow.parquet as pq

        read_path = _reader(self._media_root or os.path.dirname(shard))
        try:
            pf = pq.ParquetFile(shard)
            if "json" not in pf.schema_arrow.names:
                raise ValueError(f"no 'json' column (columns: {pf.schema_arrow.names})")
        except (OSError, ValueError) as e:
            yield Record(shard, 0, "", None, SampleError("shard_open", f"{type(e).__name__}: {e}"))
            return
        columns = [c for c in ("json", "media") if c in pf.schema_arrow.names]
        index = 0
        try:
            for batch in pf.iter_batches(batch_size=self._batch_rows, columns=columns):
                docs = batch.column("json").to_pylist()
                media = batch.column("media").to_pylist() if "media" in columns else [None] * len(docs)
                for doc, items in zip(docs, media, strict=True):
                    files = {m["name"]: m["data"] for m in items or []}
                    key = f"{os.path.basename(shard)}:{index}"
                    yield _record(
                        shard, index, key, doc if doc is not None else "", self.name, files.get, read_path
                    )
                    index += 1
        except OSError as e:
            yield Record(shard, index, "", None, SampleError("shard_read", f"{type(e).__name__}: {e}"))


class JsonlSource(_FileSource):
    """JSONL files, one sample per line; inline media as base64 in the line's `files` object."""

    def read(self, shard: str) -> Iterator[Record]:
        read_path = _reader(self._media_root or os.path.dirname(shard))
        try:
            f = open(shard, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as e:
            yield Record(shard, 0, "", None, SampleError("shard_open", str(e)))
            return
        with f:
            for index, line in enumerate(f):
                key = f"{os.path.basename(shard)}:{index}"
                try:
                    doc = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    yield Record(shard, index, key, None, SampleError("bad_json", str(e)))
                    continue
                files = doc.get("files", {}) if isinstance(doc, Mapping) else {}
                yield _record(shard, index, key, doc, self.name, _b64_lookup(files), read_path)


def _b64_lookup(files: Any) -> Callable[[str], bytes | None]:
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
    if kind in SOURCES:
        raise ValueError(f"source kind {kind!r} is already registered")
    SOURCES[kind] = factory
