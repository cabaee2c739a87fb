"""One shard of the preprocessing job: validate and probe each row, write the tar, its index and errors.

Everything a shard produces is written under a temporary name and renamed, the tar first and the
index part last, so a shard is finished exactly when its index part exists; a re-run skips those.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from omni_data.processor import Measured, Processor
from omni_data.schema import SampleError, parse_sample, sample_to_doc


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def index_part(out: Path, i: int) -> Path:
    return out / ".parts" / f"{shard_name(i)}.index.parquet"


def errors_part(out: Path, i: int) -> Path:
    return out / ".parts" / f"{shard_name(i)}.errors.jsonl"


def load_factory(spec: str) -> Callable[..., Any]:
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"factory {spec!r} must look like 'package.module:callable'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _reader(root: str) -> Callable[[str], bytes]:
    def read(path: str) -> bytes:
        with open(path if os.path.isabs(path) else os.path.join(root, path), "rb") as f:
            return f.read()

    return read


def _inline(files: dict[str, str]) -> Callable[[str], bytes | None]:
    def get(name: str) -> bytes | None:
        value = files.get(name)
        return base64.b64decode(value) if isinstance(value, str) else None

    return get


def _tokens(m: Measured) -> dict[str, list[list[int] | None]]:
    out: dict[str, list[list[int] | None]] = {}
    for span in m.media:
        # An interleaved item's layout is not recorded (None): it is counted again when read.
        counts = None if span.count.layout else [span.count.llm_tokens, span.count.encoder_units]
        out.setdefault(span.item.modality, []).append(counts)
    return out


def write_shard(
    i: int, rows: list[dict[str, Any]], out_dir: str, processor: Processor | None
) -> dict[str, Any]:
    """Write shard i; returns {"shard", "samples", "errors", "bytes"}."""
    out = Path(out_dir)
    (out / ".parts").mkdir(parents=True, exist_ok=True)
    name = shard_name(i)
    tar_tmp = out / f".{name}.tar.tmp"
    index, errors = [], []
    with wds.TarWriter(str(tar_tmp), mtime=0) as writer:  # fixed member times: reproducible shards
        for j, row in enumerate(rows):
            key = f"{row['source']}-{i:06d}-{j:06d}"
            doc = row["doc"]
            try:
                if isinstance(doc, dict) and "__error__" in doc:
                    raise SampleError(*doc["__error__"])
                sample = parse_sample(
                    doc,
                    key=key,
                    source=row["source"],
                    media_bytes=_inline(row["files"]),
                    read_path=_reader(row["media_root"]),
                )
                measured = processor.measure(sample) if processor is not None else None
            except SampleError as e:
                errors.append(
                    {"source": row["source"], "origin": row["origin"], "reason": e.reason, "detail": e.detail}
                )
                continue
            # Media become members of the sample: `<key>.<n>.<ext>`; the document names them.
            members: dict[str, bytes] = {}
            renamed = []
            for n, item in enumerate(sample.media()):
                member = f"{n}.{item.ext or 'bin'}"
                members[member] = item.data
                renamed.append(member)
            out_doc = sample_to_doc(sample)
            it = iter(renamed)
            for message in out_doc["messages"]:
                for part in message["content"]:
                    if "media" in part:
                        part["media"] = next(it)
            meta = dict(out_doc["meta"])
            if measured is not None:
                meta["tokens"] = {"text": measured.text_tokens, **_tokens(measured)}
            out_doc["meta"] = meta
            payload = json.dumps(out_doc).encode()
            writer.write({"__key__": key, "json": payload, **members})
            nbytes = len(payload) + sum(len(b) for b in members.values())
            index.append(
                {
                    "shard": f"{name}.tar",
                    "key": key,
                    "id": sample.id,
                    "source": sample.source,
                    "llm_tokens": measured.llm_tokens if measured else None,
                    "text_tokens": measured.text_tokens if measured else None,
                    "encoder_units": measured.encoder_units if measured else None,
                    "media_items": len(members),
                    "media_tokens": json.dumps(_tokens(measured)) if measured else None,
                    "modalities": ",".join(sorted({m.modality for m in sample.media()})),
                    "bytes": nbytes,
                }
            )
    size = tar_tmp.stat().st_size
    os.replace(tar_tmp, out / f"{name}.tar")
    err_tmp = errors_part(out, i).with_suffix(".tmp")
    err_tmp.write_text("".join(json.dumps(e) + "\n" for e in errors))
    os.replace(err_tmp, errors_part(out, i))
    idx_tmp = index_part(out, i).with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), idx_tmp)
    os.replace(idx_tmp, index_part(out, i))  # last: marks the shard finished
    return {"shard": i, "samples": len(index), "errors": len(errors), "bytes": size}


INDEX_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("llm_tokens", pa.int64()),
        ("text_tokens", pa.int64()),
        ("encoder_units", pa.int64()),
        ("media_items", pa.int64()),
        ("media_tokens", pa.string()),
        ("modalities", pa.string()),
        ("bytes", pa.int64()),
    ]
)
