"""Data-test helpers: a tokenizer trained in a second, a toy image processor, shard writers."""

from __future__ import annotations

import functools
import io
import json
import os
import random

import torch
from PIL import Image

from omni_data.processor import ChatProcessor, modality_tokens
from omni_data.schema import MediaItem
from omni_dist.media import MediaCount

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "red",
    "blue",
    "green",
    "image",
    "sound",
    "video",
    "describe",
    "what",
    "is",
    "in",
    "this",
    "picture",
]


@functools.lru_cache(maxsize=1)
def tokenizer():
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    for m in ("image", "audio", "video"):
        specials += list(modality_tokens(m))
    return train_tokenizer(tuple(specials))


def train_tokenizer(specials: tuple[str, ...]):
    """A byte-level BPE tokenizer trained in about a second, with `specials` (the first is the pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = random.Random(0)
    tok.train_from_iterator([" ".join(rng.choices(WORDS, k=30)) for _ in range(300)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=specials[0],
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=list(specials[1:]),
    )


class ToyImageProcessor:
    """8x8 patches of an RGB image; one LLM token per 2x2 patches."""

    patch = 8

    def count(self, item: MediaItem) -> MediaCount:
        try:
            with Image.open(io.BytesIO(item.data)) as im:
                w, h = im.size
        except OSError as e:  # PIL's "cannot identify image file"
            raise ValueError(str(e)) from None
        units = (h // self.patch) * (w // self.patch)
        return MediaCount(max(1, units // 4), units)

    def process(self, item: MediaItem) -> dict[str, torch.Tensor]:
        try:
            with Image.open(io.BytesIO(item.data)) as im:
                arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
                w, h = im.size
        except OSError as e:  # PIL's "cannot identify image file"
            raise ValueError(str(e)) from None
        p = self.patch
        x = arr.view(h, w, 3)[: h // p * p, : w // p * p].float() / 255
        patches = x.view(h // p, p, w // p, p, 3).permute(0, 2, 1, 3, 4).reshape(-1, p * p * 3)
        return {"patches": patches, "grid": torch.tensor([[h // p, w // p]])}


class ToyAudioProcessor:
    """One LLM token per 0.1 s of audio (any format libsndfile reads)."""

    def count(self, item: MediaItem) -> MediaCount:
        import soundfile as sf

        try:
            info = sf.info(io.BytesIO(item.data))
        except (sf.LibsndfileError, RuntimeError) as e:
            raise ValueError(str(e)) from None
        n = max(1, int(info.duration * 10))
        return MediaCount(n, n)

    def process(self, item: MediaItem) -> dict[str, torch.Tensor]:
        import soundfile as sf

        wave, _ = sf.read(io.BytesIO(item.data), dtype="float32")
        n = self.count(item).llm_tokens
        return {"wave": torch.from_numpy(wave)[: n * (len(wave) // n)].view(n, -1)}


def processor(**kw) -> ChatProcessor:
    return ChatProcessor(
        tokenizer(), media={"image": ToyImageProcessor(), "audio": ToyAudioProcessor()}, **kw
    )


def png(w: int, h: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(data.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def sample_doc(i: int, rng: random.Random, image: bool) -> tuple[dict, dict[str, bytes]]:
    """A conversation (text lengths long-tailed) and its inline media."""
    n = max(1, int(rng.lognormvariate(2.5, 0.8)))
    user = [{"type": "text", "text": " ".join(rng.choices(WORDS, k=n))}]
    files = {}
    if image:
        user.append({"type": "image", "media": "0.png"})
        files["0.png"] = png(8 * rng.randint(2, 6), 8 * rng.randint(2, 6), i)
    answer = " ".join(rng.choices(WORDS, k=max(1, n // 2)))
    doc = {
        "id": f"s{i:05d}",
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }
    return doc, files


def write_wds(
    directory: str, counts: list[int], *, start: int = 0, image_every: int = 3, seed: int = 0
) -> list[str]:
    """Tar shards written with webdataset's TarWriter; sample ids are global and unique."""
    import webdataset as wds

    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    paths, i = [], start
    for s, n in enumerate(counts):
        path = os.path.join(directory, f"shard-{s:04d}.tar")
        with wds.TarWriter(path) as w:
            for _ in range(n):
                doc, files = sample_doc(i, rng, image_every > 0 and i % image_every == 0)
                w.write({"__key__": doc["id"], "json": json.dumps(doc).encode(), **files})
                i += 1
        paths.append(path)
    return paths


def uniform_doc(i: int, rng: random.Random, image: bool) -> tuple[dict, dict[str, bytes]]:
    """A conversation of fixed word counts (records of similar size) and, if `image`, a 16x16 PNG."""
    user = [{"type": "text", "text": " ".join(rng.choices(WORDS, k=12))}]
    files = {}
    if image:
        user.append({"type": "image", "media": "0.png"})
        files["0.png"] = png(16, 16, i)
    doc = {
        "id": f"s{i:05d}",
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": " ".join(rng.choices(WORDS, k=6))}]},
        ],
    }
    return doc, files


def uniform_docs(
    n: int, *, start: int = 0, image_every: int = 5, seed: int = 0
) -> list[tuple[dict, dict[str, bytes]]]:
    rng = random.Random(seed)
    return [uniform_doc(i, rng, image_every > 0 and i % image_every == 0) for i in range(start, start + n)]


def write_jsonl(path: str, n: int, *, start: int = 0, image_every: int = 5, seed: int = 0) -> str:
    """One JSONL file of `n` similar-sized samples (ids from s{start:05d}), inline PNGs as base64 `files`."""
    import base64

    with open(path, "w") as f:
        for doc, files in uniform_docs(n, start=start, image_every=image_every, seed=seed):
            b64 = {k: base64.b64encode(v).decode() for k, v in files.items()}
            f.write(json.dumps({**doc, "files": b64}) + "\n")
    return path


def write_parquet(
    path: str,
    n: int,
    *,
    start: int = 0,
    row_group_size: int | None = None,
    image_every: int = 5,
    seed: int = 0,
) -> str:
    """One Parquet file of `n` samples (`json` + `media` columns); one row group unless `row_group_size`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = uniform_docs(n, start=start, image_every=image_every, seed=seed)
    table = pa.table(
        {
            "json": [json.dumps(d) for d, _ in docs],
            "media": [[{"name": k, "data": v} for k, v in f.items()] for _, f in docs],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size or max(1, n))
    return path
