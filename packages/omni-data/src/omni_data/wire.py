"""Packed micro-batches as one uint8 tensor: how ranks exchange batches without pickle.

A payload is a flat uint8 tensor laid out as

    bytes 0..7     magic b"OMNIWIRE"
    bytes 8..15    header length H, unsigned 64-bit little-endian
    bytes 16..     the header: H bytes of UTF-8 JSON, then zero padding to a multiple of 16
    then           the data section: every tensor's raw bytes (C order, native little-endian),
                   each starting at a multiple of 16 (padding between them is zero)

The header is {"version": 1, "batches": [...]}, one entry per PackedBatch in order:

    {"max_seqlen": int, "num_tokens": int, "is_padding": bool, "sample_ids": [str, ...],
     "media":   {modality: {"sizes": {key: [int, ...]}}},
     "targets": {modality: {"sizes": {key: [int, ...]}}},
     "tensors": [{"field": [...], "dtype": str, "shape": [int, ...], "offset": int, "nbytes": int}]}

A tensor's field is its path in the batch: ["input_ids"], ["position_ids"], ["labels"],
["cu_seqlens"], or [group, modality, name] with group "media"/"targets" and name one of "llm_tokens",
"encoder_units" (absent when None), "positions", or ["tensors", key] for a processor output, e.g.
["media", "image", "tensors", "patches"]. Its dtype is one of DTYPES; its offset is relative to the
start of the data section. `decode` reads nothing but this: no code runs, whatever the bytes are, and a
payload that does not follow the layout (bad magic, truncated, unknown field or dtype, sizes that do
not add up) is a ValueError naming what is wrong.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch

from omni_dist.packed import MediaBatch, PackedBatch

MAGIC = b"OMNIWIRE"
VERSION = 1
_PREFIX = len(MAGIC) + 8
_ALIGN = 16

DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_BATCH_TENSORS = ("input_ids", "position_ids", "labels", "cu_seqlens")
_MEDIA_TENSORS = ("llm_tokens", "encoder_units", "positions")  # encoder_units may be absent
_GROUPS = ("media", "targets")


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def encode(batches: list[PackedBatch]) -> torch.Tensor:
    """Micro-batches -> one uint8 CPU tensor (see the module docstring for the layout)."""
    parts: list[torch.Tensor] = []
    size = 0

    def put(entries: list[dict[str, Any]], field: list[str], t: torch.Tensor) -> None:
        nonlocal size
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"wire: {'.'.join(field)} has dtype {t.dtype}, not one of {list(DTYPES)}")
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        offset = _aligned(size)
        if offset > size:
            parts.append(torch.zeros(offset - size, dtype=torch.uint8))
        parts.append(raw)
        size = offset + raw.numel()
        entries.append(
            {
                "field": field,
                "dtype": _DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "offset": offset,
                "nbytes": raw.numel(),
            }
        )

    header_batches = []
    for b in batches:
        entries: list[dict[str, Any]] = []
        for name in _BATCH_TENSORS:
            put(entries, [name], getattr(b, name))
        groups: dict[str, dict[str, Any]] = {}
        for group in _GROUPS:
            groups[group] = {}
            for modality, m in getattr(b, group).items():
                groups[group][modality] = {"sizes": {k: [int(x) for x in v] for k, v in m.sizes.items()}}
                for key, t in m.tensors.items():
                    put(entries, [group, modality, "tensors", key], t)
                for name in _MEDIA_TENSORS:
                    t = getattr(m, name)
                    if t is not None:
                        put(entries, [group, modality, name], t)
        header_batches.append(
            {
                "max_seqlen": int(b.max_seqlen),
                "num_tokens": int(b.num_tokens),
                "is_padding": bool(b.is_padding),
                "sample_ids": [str(s) for s in b.sample_ids],
                **groups,
                "tensors": entries,
            }
        )
    header = json.dumps({"version": VERSION, "batches": header_batches}, separators=(",", ":")).encode()
    start = _aligned(_PREFIX + len(header))
    head = bytearray(start)
    head[:_PREFIX] = MAGIC + struct.pack("<Q", len(header))
    head[_PREFIX : _PREFIX + len(header)] = header
    return torch.cat([torch.frombuffer(head, dtype=torch.uint8), *parts])


def _fail(what: str) -> ValueError:
    return ValueError(f"wire payload: {what}")


def _want(obj: Any, kind: type | tuple[type, ...], where: str) -> Any:
    # bool is an int in Python: a flag must be a bool and a count must not be one.
    bad = isinstance(obj, bool) and kind is int
    if bad or not isinstance(obj, kind):
        raise _fail(
            f"{where} is {type(obj).__name__} {obj!r:.80}, expected {getattr(kind, '__name__', kind)}"
        )
    return obj


def _int_list(obj: Any, where: str) -> list[int]:
    _want(obj, list, where)
    for i, x in enumerate(obj):
        _want(x, int, f"{where}[{i}]")
    return obj


def _keys(obj: dict, expected: set[str], where: str) -> None:
    if set(obj) != expected:
        unknown, missing = sorted(set(obj) - expected), sorted(expected - set(obj))
        raise _fail(f"{where} has unknown keys {unknown} / lacks keys {missing}")


def _tensor(data: torch.Tensor, entry: Any, where: str) -> tuple[list[str], torch.Tensor]:
    _want(entry, dict, where)
    _keys(entry, {"field", "dtype", "shape", "offset", "nbytes"}, where)
    field = _want(entry["field"], list, f"{where}.field")
    if not field or not all(isinstance(p, str) for p in field):
        raise _fail(f"{where}.field is {field!r}, expected a list of names")
    name = ".".join(field)
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise _fail(f"tensor {name} has dtype {entry['dtype']!r}, not one of {list(DTYPES)}")
    shape = _int_list(entry["shape"], f"tensor {name} shape")
    offset = _want(entry["offset"], int, f"tensor {name} offset")
    nbytes = _want(entry["nbytes"], int, f"tensor {name} nbytes")
    if any(d < 0 for d in shape) or offset < 0 or offset % _ALIGN:
        raise _fail(f"tensor {name} has shape {shape} at offset {offset}: not a valid layout")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if nbytes != math.prod(shape) * itemsize:
        raise _fail(f"tensor {name}: {nbytes} bytes for shape {shape} of {entry['dtype']}")
    if offset + nbytes > data.numel():
        raise _fail(
            f"truncated: tensor {name} needs bytes {offset}..{offset + nbytes} of the data section, "
            f"which has {data.numel()}"
        )
    if nbytes == 0:
        return field, torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(data.numpy(), dtype=torch.uint8, count=nbytes, offset=offset)
    return field, raw.view(dtype).reshape(shape).clone()


def _media(spec: Any, tensors: dict[tuple[str, ...], torch.Tensor], where: str) -> MediaBatch:
    _want(spec, dict, where)
    _keys(spec, {"sizes"}, where)
    sizes = _want(spec["sizes"], dict, f"{where}.sizes")
    for k, v in sizes.items():
        _int_list(v, f"{where}.sizes.{k}")
    found = {path[-1]: t for path, t in tensors.items() if path[:-1] == ("tensors",)}
    if set(found) != set(sizes):
        raise _fail(f"{where} has tensors {sorted(found)} but sizes for {sorted(sizes)}")
    for k, t in found.items():
        if t.dim() == 0 or sum(sizes[k]) != t.shape[0]:
            raise _fail(f"{where}.tensors.{k} has shape {list(t.shape)}, sizes add up to {sum(sizes[k])}")
    for name in ("llm_tokens", "positions"):
        if (name,) not in tensors:
            raise _fail(f"{where} lacks the tensor {name}")
    return MediaBatch(
        tensors=found,
        sizes=sizes,
        llm_tokens=tensors[("llm_tokens",)],
        encoder_units=tensors.get(("encoder_units",)),
        positions=tensors[("positions",)],
    )


def _field_known(field: list[str], groups: dict[str, dict]) -> bool:
    if len(field) == 1:
        return field[0] in _BATCH_TENSORS
    if field[0] not in _GROUPS or field[1] not in groups[field[0]]:
        return False
    return (len(field) == 3 and field[2] in _MEDIA_TENSORS) or (len(field) == 4 and field[2] == "tensors")


def _batch(spec: Any, data: torch.Tensor, where: str) -> PackedBatch:
    _want(spec, dict, where)
    _keys(spec, {"max_seqlen", "num_tokens", "is_padding", "sample_ids", *_GROUPS, "tensors"}, where)
    groups = {g: _want(spec[g], dict, f"{where}.{g}") for g in _GROUPS}
    sample_ids = _want(spec["sample_ids"], list, f"{where}.sample_ids")
    for i, s in enumerate(sample_ids):
        _want(s, str, f"{where}.sample_ids[{i}]")
    tensors: dict[tuple[str, ...], torch.Tensor] = {}
    for i, entry in enumerate(_want(spec["tensors"], list, f"{where}.tensors")):
        field, t = _tensor(data, entry, f"{where}.tensors[{i}]")
        if not _field_known(field, groups):
            raise _fail(f"{where} has a tensor for the unknown field {'.'.join(field)}")
        if tuple(field) in tensors:
            raise _fail(f"{where} has two tensors for {'.'.join(field)}")
        tensors[tuple(field)] = t
    for name in _BATCH_TENSORS:
        if (name,) not in tensors:
            raise _fail(f"{where} lacks the tensor {name}")
    media = {
        g: {
            m: _media(s, {p[2:]: t for p, t in tensors.items() if p[:2] == (g, m)}, f"{where}.{g}.{m}")
            for m, s in groups[g].items()
        }
        for g in _GROUPS
    }
    return PackedBatch(
        input_ids=tensors[("input_ids",)],
        position_ids=tensors[("position_ids",)],
        labels=tensors[("labels",)],
        cu_seqlens=tensors[("cu_seqlens",)],
        max_seqlen=_want(spec["max_seqlen"], int, f"{where}.max_seqlen"),
        media=media["media"],
        targets=media["targets"],
        sample_ids=sample_ids,
        num_tokens=_want(spec["num_tokens"], int, f"{where}.num_tokens"),
        is_padding=_want(spec["is_padding"], bool, f"{where}.is_padding"),
    )


def decode(payload: torch.Tensor) -> list[PackedBatch]:
    """One payload made by `encode` -> its micro-batches (fresh CPU tensors); ValueError if malformed."""
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise _fail(f"expected a 1-d uint8 tensor, got {payload.dtype} of shape {list(payload.shape)}")
    buf = payload.detach().cpu().contiguous()
    if buf.numel() < _PREFIX:
        raise _fail(f"truncated: {buf.numel()} bytes, shorter than the {_PREFIX}-byte prefix")
    prefix = bytes(buf[:_PREFIX].numpy())
    if prefix[: len(MAGIC)] != MAGIC:
        raise _fail(
            f"does not start with {MAGIC!r} (starts with {prefix[: len(MAGIC)]!r}): not made by encode"
        )
    (length,) = struct.unpack("<Q", prefix[len(MAGIC) :])
    start = _aligned(_PREFIX + length)
    if start > buf.numel():
        raise _fail(f"truncated: the header needs {start} bytes, the payload has {buf.numel()}")
    try:
        header = json.loads(bytes(buf[_PREFIX : _PREFIX + length].numpy()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(f"the header is not JSON ({e})") from None
    _want(header, dict, "header")
    _keys(header, {"version", "batches"}, "header")
    if header["version"] != VERSION:
        raise _fail(f"version {header['version']!r}, this reader knows {VERSION}")
    data = buf[start:]
    specs = _want(header["batches"], list, "header.batches")
    batches = [_batch(s, data, f"batch {i}") for i, s in enumerate(specs)]
    ends = [e["offset"] + e["nbytes"] for s in specs for e in s["tensors"]]
    if data.numel() != max(ends, default=0):
        raise _fail(f"the data section has {data.numel()} bytes, the header describes {max(ends, default=0)}")
    return batches
