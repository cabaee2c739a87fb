"""The sample schema: a multimodal conversation with inline or referenced media.

A sample is stored as one JSON document (the `json` member of a WebDataset sample, a Parquet column,
or a JSONL line)::

    {"id": "s1", "source": "captions",
     "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image", "media": "0.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "meta": {"tokens": {"text": 12, "image": [64]}}}

A media part names its bytes by `media` (a file stored with the sample: `<key>.0.png` in a tar, an
entry of the Parquet `media` column, base64 `data` in JSONL) or by `path` (a file referenced on disk,
relative to the source's media root). `type` is the modality name ("image", "video", "audio", or any
registered one); `"generate": true` on an assistant's media part marks a generation target.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


class SampleError(Exception):
    """A sample that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class MediaItem:
    """One media item with its raw bytes (decoded only by the processor, only if the sample is used)."""

    modality: str
    name: str  # inline member name or referenced path; its extension tells the format
    data: bytes
    generate: bool = False

    @property
    def ext(self) -> str:
        return self.name.rsplit(".", 1)[-1].lower() if "." in self.name else ""


@dataclass(frozen=True)
class Part:
    type: str  # "text" or a modality name
    text: str | None = None
    media: MediaItem | None = None


@dataclass(frozen=True)
class Message:
    role: str
    content: tuple[Part, ...]


@dataclass(frozen=True)
class Sample:
    id: str
    source: str
    messages: tuple[Message, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def media(self) -> list[MediaItem]:
        """Media items in conversation order."""
        return [p.media for m in self.messages for p in m.content if p.media is not None]

    def known_tokens(self) -> Mapping[str, Any]:
        """Token counts recorded by preprocessing (`meta.tokens`), if any."""
        tokens = self.meta.get("tokens", {})
        return tokens if isinstance(tokens, Mapping) else {}


def _require(d: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise SampleError("missing_field", f"{where} has no '{key}'")
    value = d[key]
    if not isinstance(value, kind):
        raise SampleError("bad_field", f"{where}.{key} is {type(value).__name__}, expected {kind.__name__}")
    return value


def parse_sample(
    doc: bytes | str | Mapping[str, Any],
    *,
    key: str,
    source: str,
    media_bytes: Callable[[str], bytes | None],
    read_path: Callable[[str], bytes],
) -> Sample:
    """Validate a sample document and attach its media bytes.

    `media_bytes(name)` returns an inline member (None if absent); `read_path(path)` reads a referenced
    file. Every problem raises SampleError with the reason it is counted under.
    """
    if not isinstance(doc, Mapping):
        try:
            doc = json.loads(doc)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError("bad_json", str(e)) from None
        if not isinstance(doc, Mapping):
            raise SampleError("bad_json", f"top level is {type(doc).__name__}, expected an object")
    raw_messages = _require(doc, "messages", list, "sample")
    if not raw_messages:
        raise SampleError("bad_field", "sample has no messages")
    messages = []
    for i, m in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise SampleError("bad_field", f"{where} is not an object")
        role = _require(m, "role", str, where)
        if role not in ROLES:
            raise SampleError("bad_field", f"{where}.role is {role!r}, expected one of {ROLES}")
        content = m.get("content")
        if isinstance(content, str):  # plain-text shorthand
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise SampleError("missing_field", f"{where} has no content list")
        messages.append(
            Message(
                role,
                tuple(
                    _part(p, f"{where}.content[{j}]", role, media_bytes, read_path)
                    for j, p in enumerate(content)
                ),
            )
        )
    meta = doc.get("meta", {})
    if not isinstance(meta, Mapping):
        raise SampleError("bad_field", "meta is not an object")
    return Sample(str(doc.get("id", key)), str(doc.get("source", source)), tuple(messages), meta)


def _part(p: Any, where: str, role: str, media_bytes, read_path) -> Part:
    if not isinstance(p, Mapping):
        raise SampleError("bad_field", f"{where} is not an object")
    kind = _require(p, "type", str, where)
    if kind == "text":
        return Part("text", text=_require(p, "text", str, where))
    generate = bool(p.get("generate", False))
    if generate and role != "assistant":
        raise SampleError("bad_field", f"{where} is a generation target outside an assistant message")
    if "media" in p:
        name = _require(p, "media", str, where)
        data = media_bytes(name)
        if data is None:
            raise SampleError("missing_media", f"{where} names inline media {name!r} that is not stored")
    elif "path" in p:
        name = _require(p, "path", str, where)
        try:
            data = read_path(name)
        except OSError as e:
            raise SampleError("missing_media", f"{where}: cannot read {name!r}: {e}") from None
    else:
        raise SampleError("missing_field", f"{where} ({kind}) has neither 'media' nor 'path'")
    return Part(kind, media=MediaItem(kind, name, data, generate))


def sample_to_doc(sample: Sample) -> dict[str, Any]:
    """The JSON document of a sample with media referenced by name (the writer stores the bytes)."""
    msgs = []
    for m in sample.messages:
        parts = []
        for p in m.content:
            if p.media is None:
                parts.append({"type": "text", "text": p.text})
            else:
                d = {"type": p.type, "media": p.media.name}
                if p.media.generate:
                    d["generate"] = True
                parts.append(d)
        msgs.append({"role": m.role, "content": parts})
    return {"id": sample.id, "source": sample.source, "messages": msgs, "meta": dict(sample.meta)}
