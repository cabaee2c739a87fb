"""The wire encoding of micro-batches: exact round trips, malformed payloads refused, no pickle in balance."""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import pickle
import struct

import pytest
import torch

from omni_data import balance, wire
from omni_data.collate import collate, padding_batch
from omni_data.processor import ChatProcessor
from omni_data.schema import parse_sample
from omni_dist.packed import MediaBatch, PackedBatch
from tests.omni_data.fixtures import ToyImageProcessor, png, tokenizer


def _sample(i: int, messages: list[dict], files: dict[str, bytes]):
    return parse_sample(
        {"id": f"w{i}", "messages": messages},
        key=f"w{i}",
        source="t",
        media_bytes=files.get,
        read_path=lambda p: b"",
    )


def _batches() -> list[PackedBatch]:
    """Real collated batches: image inputs, an image generation target, SP padding, a filler batch."""
    proc = ChatProcessor(
        tokenizer(), media={"image": ToyImageProcessor()}, targets={"image": ToyImageProcessor()}
    )
    files = {"a.png": png(32, 16, 1), "b.png": png(16, 16, 2), "c.png": png(24, 16, 3)}
    understand = _sample(
        0,
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "what is"}, {"type": "image", "media": "a.png"}],
            },
            {"role": "assistant", "content": "a red cat"},
            {"role": "user", "content": [{"type": "image", "media": "b.png"}]},
            {"role": "assistant", "content": "a dog"},
        ],
        files,
    )
    generate = _sample(
        1,
        [
            {
                "role": "user",
                "content": [{"type": "image", "media": "b.png"}, {"type": "text", "text": "redraw"}],
            },
            {"role": "assistant", "content": [{"type": "image", "media": "c.png", "generate": True}]},
        ],
        files,
    )
    text = _sample(2, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}], files)
    processed = [proc.process(proc.measure(s)) for s in (understand, generate, text)]
    length = sum(int(p.input_ids.numel()) for p in processed)
    mixed = collate(processed, pad_to_multiple=length + 3)  # SP padding: its own last segment
    return [mixed, collate(processed[2:]), padding_batch(16)]


def _assert_same(a: PackedBatch, b: PackedBatch) -> None:
    for f in dataclasses.fields(PackedBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        elif isinstance(x, dict):
            assert list(x) == list(y), f.name
            for k in x:
                _assert_same_media(x[k], y[k], f"{f.name}.{k}")
        else:
            assert type(x) is type(y) and x == y, f.name


def _assert_same_media(a: MediaBatch, b: MediaBatch, where: str) -> None:
    assert a.sizes == b.sizes, where
    assert list(a.tensors) == list(b.tensors), where
    pairs = [(f"tensors.{k}", a.tensors[k], b.tensors[k]) for k in a.tensors]
    pairs += [(n, getattr(a, n), getattr(b, n)) for n in ("llm_tokens", "encoder_units", "positions")]
    for name, x, y in pairs:
        if x is None:
            assert y is None, f"{where}.{name}"
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), f"{where}.{name}"


def test_round_trip_of_collated_batches_with_media_targets_and_padding():
    batches = _batches()
    mixed = batches[0]
    assert set(mixed.media) == {"image"} and set(mixed.targets) == {"image"}
    assert mixed.num_tokens < mixed.length and batches[2].is_padding  # SP padding and a filler batch
    payload = wire.encode(batches)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    decoded = wire.decode(payload)
    assert len(decoded) == len(batches)
    for a, b in zip(batches, decoded, strict=True):
        _assert_same(a, b)
    # Fresh tensors, not views of the payload; an empty list and None encoder units survive too.
    payload.zero_()
    _assert_same(batches[0], decoded[0])
    assert wire.decode(wire.encode([])) == []
    odd = dataclasses.replace(
        mixed,
        media={"image": dataclasses.replace(mixed.media["image"], encoder_units=None)},
        position_ids=mixed.position_ids.expand(3, -1, -1).contiguous(),  # M-RoPE shaped
        labels=mixed.labels.to(torch.int32)[:, :0],
    )
    _assert_same(odd, wire.decode(wire.encode([odd]))[0])
    every = {n: torch.ones(2, 3, dtype=d) for n, d in wire.DTYPES.items()}
    mb = MediaBatch(every, {k: [1, 1] for k in every}, torch.tensor([1, 1]))
    rich = dataclasses.replace(padding_batch(4), targets={"x": mb})
    _assert_same(rich, wire.decode(wire.encode([rich]))[0])


def _header(payload: torch.Tensor) -> tuple[dict, int]:
    (n,) = struct.unpack("<Q", bytes(payload[8:16].numpy()))
    return json.loads(bytes(payload[16 : 16 + n].numpy())), n


def _with_header(payload: torch.Tensor, header: dict) -> torch.Tensor:
    """The same data section behind another header (re-aligned as encode does)."""
    _, n = _header(payload)
    data = payload[-(-(16 + n) // 16) * 16 :]
    text = json.dumps(header).encode()
    head = bytearray(-(-(16 + len(text)) // 16) * 16)
    head[:16] = b"OMNIWIRE" + struct.pack("<Q", len(text))
    head[16 : 16 + len(text)] = text
    return torch.cat([torch.frombuffer(head, dtype=torch.uint8), data])


def _edit(payload: torch.Tensor, change) -> torch.Tensor:
    header, _ = _header(payload)
    change(header)
    return _with_header(payload, header)


def _set_tensor(path: list[str], **kw):
    def change(h):
        for e in h["batches"][0]["tensors"]:
            if e["field"] == path:
                e.update(kw)

    return change


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: p[:10], "shorter than the 16-byte prefix"),
        (lambda p: p[:40], "truncated: the header needs"),
        (lambda p: p[:-3], "truncated: tensor"),
        (lambda p: torch.cat([p, torch.zeros(5, dtype=torch.uint8)]), "the data section has"),
        (
            lambda p: torch.cat([torch.tensor([0], dtype=torch.uint8), p[1:]]),
            "does not start with b'OMNIWIRE'",
        ),
        (lambda p: p.to(torch.int32), "expected a 1-d uint8 tensor"),
        (lambda p: _edit(p, _set_tensor(["labels"], dtype="complex64")), "labels has dtype 'complex64'"),
        (lambda p: _edit(p, _set_tensor(["labels"], dtype="object")), "not one of"),
        (lambda p: _edit(p, _set_tensor(["labels"], field=["grad_fn"])), "unknown field grad_fn"),
        (
            lambda p: _edit(
                p, _set_tensor(["media", "image", "tensors", "patches"], field=["media", "sound", "x"])
            ),
            "unknown field media.sound.x",
        ),
        (lambda p: _edit(p, _set_tensor(["labels"], shape=[1, 3])), "bytes for shape [1, 3]"),
        (lambda p: _edit(p, _set_tensor(["labels"], offset=3)), "not a valid layout"),
        (lambda p: _edit(p, _set_tensor(["labels"], offset=10**12)), "truncated: tensor labels"),
        (lambda p: _edit(p, lambda h: h["batches"][0].pop("num_tokens")), "lacks keys ['num_tokens']"),
        (lambda p: _edit(p, lambda h: h["batches"][0].update(code="os.system")), "unknown keys ['code']"),
        (lambda p: _edit(p, lambda h: h["batches"][0].update(max_seqlen="9")), "max_seqlen is str"),
        (lambda p: _edit(p, lambda h: h["batches"][0].update(is_padding=1)), "is_padding is int"),
        (lambda p: _edit(p, lambda h: h["batches"][0].update(sample_ids=[3])), "sample_ids[0] is int"),
        (
            lambda p: _edit(p, lambda h: h["batches"][0]["media"]["image"]["sizes"].update(patches=[1])),
            "sizes add up to 1",
        ),
        (lambda p: _edit(p, lambda h: h.update(version=2)), "version 2"),
        (
            lambda p: _edit(p, lambda h: h["batches"][0]["tensors"].pop(0)),
            "lacks the tensor input_ids",
        ),
    ],
)
def test_malformed_payloads_are_value_errors_naming_the_problem(corrupt, message):
    payload = wire.encode(_batches()[:1])
    with pytest.raises(ValueError) as e:
        wire.decode(corrupt(payload))
    assert message in str(e.value)


def test_a_pickle_or_non_json_header_is_refused():
    buf = io.BytesIO()
    torch.save(_batches(), buf)  # what balance used to send
    pickled = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not start with b'OMNIWIRE'"):
        wire.decode(pickled)
    raw = bytearray(pickle.dumps(_batches()[2]))  # a plain pickle stream
    with pytest.raises(ValueError, match="does not start with b'OMNIWIRE'"):
        wire.decode(torch.frombuffer(raw, dtype=torch.uint8))
    bad = bytearray(b"OMNIWIRE" + struct.pack("<Q", 4) + b"\x80\x04K\x00" + bytes(12))  # pickle as header
    with pytest.raises(ValueError, match="the header is not JSON"):
        wire.decode(torch.frombuffer(bad, dtype=torch.uint8))


def test_encode_refuses_a_dtype_outside_the_whitelist():
    batch = dataclasses.replace(padding_batch(4), labels=torch.zeros(1, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"labels has dtype torch\.complex64"):
        wire.encode([batch])


def test_balance_no_longer_unpickles():
    src = inspect.getsource(balance)
    assert "pickle" not in src and "torch.load" not in src and "weights_only" not in src
    assert "wire.decode" in src and "wire.encode" in src
    # The wire covers every field of the batch types: a new field must be added to the encoding.
    assert {f.name for f in dataclasses.fields(PackedBatch)} == {
        "input_ids", "position_ids", "labels", "cu_seqlens", "max_seqlen", "media", "targets",
        "sample_ids", "num_tokens", "is_padding",
    }  # fmt: skip
    assert {f.name for f in dataclasses.fields(MediaBatch)} == {
        "tensors",
        "sizes",
        "llm_tokens",
        "encoder_units",
        "positions",
    }
