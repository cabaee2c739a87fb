"""Reading the raw inputs into manifest rows: one JSON-able dict per sample, media not yet read.

A row is {"source", "origin" (file:line for error reports), "doc" (the sample document), "files"
(inline media as base64, from Parquet/JSONL), "media_root", "size" (estimated bytes)}.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omni_data.preprocess.spec import InputSpec
from omni_data.sources import expand_paths

MEDIA_KINDS = {
    "png": "image",
    "jpg": "image",
    "jpeg": "image",
    "webp": "image",
    "wav": "audio",
    "flac": "audio",
    "mp3": "audio",
    "ogg": "audio",
    "mp4": "video",
    "webm": "video",
    "mkv": "video",
    "avi": "video",
}


def _tar_bytes(n: int) -> int:
    """Bytes a member of n bytes takes in a tar: a 512-byte header plus data padded to 512."""
    return 512 + -(-n // 512) * 512


def _size(doc: Any, files: dict[str, str], root: str) -> int:
    """Estimated bytes in the shard: the JSON member and every media member, tar overhead included."""
    size = _tar_bytes(len(json.dumps(doc))) + sum(_tar_bytes(len(v) * 3 // 4) for v in files.values())
    messages = doc.get("messages") if isinstance(doc, dict) else None
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        for p in content if isinstance(content, list) else []:
            path = p.get("path") if isinstance(p, dict) else None
            if isinstance(path, str):
                full = path if os.path.isabs(path) else os.path.join(root, path)
                size += _tar_bytes(os.path.getsize(full)) if os.path.isfile(full) else 0
    return size


def _row(spec: InputSpec, origin: str, doc: Any, files: dict[str, str], root: str) -> dict[str, Any]:
    return {
        "source": spec.source,
        "origin": origin,
        "doc": doc,
        "files": files,
        "media_root": root,
        "size": _size(doc, files, root),
    }


def read_rows(spec: InputSpec) -> Iterator[dict[str, Any]]:
    if spec.kind == "folder":
        yield from _folder_rows(spec)
        return
    for path in expand_paths(spec.paths if isinstance(spec.paths, str) else list(spec.paths)):
        root = spec.media_root or os.path.dirname(os.path.abspath(path))
        if spec.kind == "jsonl":
            with open(path, "rb") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    origin = f"{path}:{i + 1}"
                    try:
                        doc = json.loads(line)
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        doc = {"__error__": ["bad_json", str(e)]}
                    files = doc.pop("files", {}) if isinstance(doc, dict) else {}
                    yield _row(spec, origin, doc, files if isinstance(files, dict) else {}, root)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            docs = table.column("json").to_pylist()
            media = table.column("media").to_pylist() if "media" in table.column_names else [None] * len(docs)
            for i, (doc, items) in enumerate(zip(docs, media, strict=True)):
                try:
                    parsed = json.loads(doc) if doc is not None else {"__error__": ["bad_json", "null json"]}
                except json.JSONDecodeError as e:
                    parsed = {"__error__": ["bad_json", str(e)]}
                files = {m["name"]: base64.b64encode(m["data"]).decode() for m in items or []}
                yield _row(spec, f"{path}:row{i}", parsed, files, root)


def _folder_rows(spec: InputSpec) -> Iterator[dict[str, Any]]:
    """Media files with an optional same-name .txt caption: user = prompt + media, assistant = caption."""
    for folder in expand_paths(spec.paths if isinstance(spec.paths, str) else list(spec.paths)):
        for path in sorted(Path(folder).rglob("*")):
            kind = MEDIA_KINDS.get(path.suffix.lower().lstrip("."))
            if kind is None or not path.is_file():
                continue
            caption = path.with_suffix(".txt")
            if not caption.exists():
                doc = {"__error__": ["missing_field", f"no caption file {caption.name}"]}
                yield _row(spec, str(path), doc, {}, str(path.parent))
                continue
            doc = {
                "id": path.stem,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": spec.prompt},
                            {"type": kind, "path": str(path.resolve())},
                        ],
                    },
                    {"role": "assistant", "content": caption.read_text().strip()},
                ],
            }
            yield _row(spec, str(path), doc, {}, str(path.parent))
