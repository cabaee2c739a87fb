"""Chat processing, token-budget packing and the collator, checked by unpacking."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest
import torch

from omni_data.collate import collate, padding_batch
from omni_data.packing import Budget, take_batch
from omni_data.processor import ChatProcessor, modality_tokens
from omni_data.schema import SampleError, parse_sample
from omni_dist.media import MediaCount
from omni_dist.sequence import IGNORE_INDEX
from tests.omni_data.fixtures import ToyAudioProcessor, ToyImageProcessor, png, processor, tokenizer


def _sample(messages, files):
    return parse_sample(
        {"id": "x", "messages": messages}, key="x", source="t", media_bytes=files.get, read_path=lambda p: b""
    )


def _conversation():
    files = {"0.png": png(32, 16, 1), "1.png": png(16, 16, 2)}
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "what is "}, {"type": "image", "media": "0.png"}],
        },
        {"role": "assistant", "content": "a red cat"},
        {
            "role": "user",
            "content": [{"type": "image", "media": "1.png"}, {"type": "text", "text": "and this"}],
        },
        {"role": "assistant", "content": "a dog"},
    ]
    return _sample(messages, files)


def test_chat_processor_labels_assistant_turns_and_expands_media():
    tok = tokenizer()
    proc = processor()
    m = proc.measure(_conversation())
    start, ph, end = (tok.convert_tokens_to_ids(t) for t in modality_tokens("image"))
    assert [s.count.llm_tokens for s in m.media] == [2, 1]  # (2x4 patches)/4, (2x2)/4
    assert m.text_tokens == m.llm_tokens - 3
    ids = list(m.input_ids)
    for span in m.media:
        n = span.count.llm_tokens
        assert ids[span.marker_start] == start and ids[span.start : span.start + n] == [ph] * n
        assert ids[span.start + n] == end
    labelled = tok.decode([t for t, lab in zip(m.input_ids, m.labels, strict=True) if lab != IGNORE_INDEX])
    assert labelled == "a red cat<|im_end|>\na dog<|im_end|>\n"
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(m.input_ids, m.labels, strict=True))
    # Truncation never splits an image: cutting inside the second one drops it whole.
    second = m.media[1]
    cut = m.truncate(second.start + 1)
    assert cut.llm_tokens == second.marker_start and len(cut.media) == 1 and cut.truncated
    # Recorded counts (from preprocessing) are used without opening the image.
    recorded = parse_sample(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "media": "0.png"}]},
                {"role": "assistant", "content": "x"},
            ],
            "meta": {"tokens": {"image": [[5, 20]]}},
        },
        key="r",
        source="t",
        media_bytes={"0.png": b"not an image"}.get,
        read_path=None,
    )
    assert proc.measure(recorded).media[0].count.llm_tokens == 5
    with pytest.raises(ValueError, match="lacks the 'sensor' tokens"):
        ChatProcessor(tok, media={"sensor": ToyImageProcessor()})


def test_generation_target_keeps_only_its_start_marker_label():
    proc = ChatProcessor(tokenizer(), media={}, targets={"image": ToyImageProcessor()})
    s = _sample(
        [
            {"role": "user", "content": "draw a cat"},
            {"role": "assistant", "content": [{"type": "image", "media": "0.png", "generate": True}]},
        ],
        {"0.png": png(16, 16, 3)},
    )
    m = proc.measure(s)
    span = m.media[0]
    assert m.labels[span.marker_start] == m.input_ids[span.marker_start]
    assert set(m.labels[span.start : span.start + span.count.llm_tokens + 1]) == {IGNORE_INDEX}
    batch = collate([proc.process(m)])
    assert list(batch.targets) == ["image"] and not batch.media


@dataclass
class _Item:
    llm_tokens: int
    encoder_units: int
    media_items: int


def test_take_batch_respects_every_budget_and_keeps_the_oldest_first():
    rng = random.Random(0)
    budget = Budget(max_tokens=512, max_encoder_units=300, max_media_items=3)
    buffer = []
    taken = []
    for _ in range(2000):
        media = rng.random() < 0.3
        buffer.append(
            _Item(
                min(512, int(rng.lognormvariate(4.5, 0.8)) + 1),
                rng.randint(10, 200) if media else 0,
                int(media),
            )
        )
        if len(buffer) == 32:
            oldest = buffer[0]
            batch = take_batch(buffer, budget)
            assert batch[0] is oldest
            assert sum(b.llm_tokens for b in batch) <= 512 and sum(b.encoder_units for b in batch) <= 300
            assert sum(b.media_items for b in batch) <= 3
            taken.append(batch)
    fill = sum(b.llm_tokens for batch in taken for b in batch) / (512 * len(taken))
    assert fill > 0.9, fill


def test_collate_unpacks_to_the_processed_samples():
    proc = processor()
    rng = random.Random(1)
    samples = []
    for i in range(5):
        content = [{"type": "text", "text": "describe " * rng.randint(1, 5)}]
        files = {}
        if i % 2 == 0:
            content.append({"type": "image", "media": "0.png"})
            files["0.png"] = png(8 * rng.randint(2, 4), 16, i)
        samples.append(
            proc.process(
                proc.measure(
                    _sample(
                        [
                            {"role": "user", "content": content},
                            {"role": "assistant", "content": "cat " * (i + 1)},
                        ],
                        files,
                    )
                )
            )
        )
    b = collate(samples, pad_to_multiple=4, pad_id=7)
    cu = b.cu_seqlens.tolist()
    total = sum(int(s.input_ids.numel()) for s in samples)
    assert b.input_ids.shape == (1, cu[-1]) and cu[-1] % 4 == 0 and b.num_tokens == total
    assert b.max_seqlen == max(cu[i + 1] - cu[i] for i in range(len(cu) - 1))
    for k, s in enumerate(samples):
        a, e = cu[k], cu[k + 1]
        assert torch.equal(b.input_ids[0, a:e], s.input_ids)
        assert torch.equal(b.position_ids[0, a:e], torch.arange(e - a))
        assert torch.equal(b.labels[0, a : e - 1], s.labels[1:]) and b.labels[0, e - 1] == IGNORE_INDEX
    assert (b.input_ids[0, total:] == 7).all() and (b.labels[0, total:] == IGNORE_INDEX).all()
    img = b.media["image"]
    ph = tokenizer().convert_tokens_to_ids("<|image|>")
    assert torch.equal(torch.nonzero(b.input_ids[0] == ph).flatten(), img.positions)
    assert img.num_items == 3 and int(img.llm_tokens.sum()) == img.positions.numel()
    assert img.sizes["patches"] == img.encoder_units.tolist()
    assert img.tensors["patches"].shape[0] == int(img.encoder_units.sum())
    pad = padding_batch(4)
    assert (
        pad.is_padding
        and pad.num_label_tokens == 0
        and pad.num_samples == 0
        and pad.input_ids.shape == (1, 4)
    )


class _ImageWithSound(ToyImageProcessor):
    """An interleaved item: an image whose patches alternate with one sound token per half, in the
    image's span (as Qwen2.5-Omni's video with its audio track)."""

    def count(self, item):
        image = super().count(item)
        half = image.llm_tokens // 2
        layout = (
            ("<|image|>", half),
            ("<|audio|>", 1),
            ("<|image|>", image.llm_tokens - half),
            ("<|audio|>", 1),
        )
        units = (("image", image.encoder_units), ("audio", 2))
        return MediaCount(image.llm_tokens + 2, image.encoder_units + 2, layout, units)

    def process(self, item):
        return {"image": super().process(item), "audio": {"wave": torch.ones(2, 3)}}


def test_an_interleaved_item_places_each_part_at_its_own_placeholders():
    tok = tokenizer()
    proc = ChatProcessor(tok, media={"image": _ImageWithSound(), "audio": ToyAudioProcessor()})
    content = [{"type": "text", "text": "what is "}, {"type": "image", "media": "0.png"}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "a cat"}]
    measured = proc.measure(_sample(messages, {"0.png": png(64, 32, 1)}))  # 8 image tokens, 2 sounds
    (span,) = measured.media
    ids = list(measured.input_ids)
    start, image, end = proc.marker_ids("image")
    sound = proc.marker_ids("audio")[1]
    inner = [image] * 4 + [sound] + [image] * 4 + [sound]
    assert ids[span.marker_start : span.start + 10 + 1] == [start, *inner, end]
    assert set(measured.labels[span.marker_start : span.start + 11]) == {IGNORE_INDEX}
    sample = proc.process(measured)
    assert [m.modality for m in sample.media] == ["image", "audio"]
    b = collate([sample, sample])
    n = sample.input_ids.numel()
    for modality, ph, units in (("image", image, 8), ("audio", sound, 2)):
        got = b.media[modality]
        assert torch.equal(torch.nonzero(b.input_ids[0] == ph).flatten(), got.positions)
        assert (
            got.llm_tokens.tolist() == [units] * 2 and int(got.positions[units]) >= n
        )  # the second sample's
    # Counts recorded without the layout (an older preprocessing) cannot place the parts: a clear error.
    recorded = _sample(messages, {"0.png": png(64, 32, 1)})
    recorded = dataclasses.replace(recorded, meta={"tokens": {"image": [[8, 32]]}})
    with pytest.raises(SampleError, match="interleaved parts, but its count has no layout"):
        proc.process(proc.measure(recorded))
