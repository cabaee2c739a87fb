"""The quickstart dataset: real handwritten digits (scikit-learn's bundled scans) as images, videos of
digit sequences, DTMF audio of dialed digits, arithmetic text and "draw the digit" image-generation
targets.

    uv run python apps/quickstart/make_data.py [--out data/quickstart] [--model apps/quickstart/recipe.yaml]

Writes raw media + JSONL manifests under OUT/raw (quickstart.jsonl for training; heldout.jsonl, made from
every fifth scan and its own recordings, for apps/quickstart/evaluate.py), trains a byte-level BPE
tokenizer (with the chat template and modality tokens) into OUT/tokenizer and the image tokenizer (the
recipe's VQ-VAE, vq_tokenizer.py) into OUT/vq, then runs the preprocessing job (a local Ray cluster) into
OUT/shards: WebDataset tars, index.parquet, errors.jsonl. Deterministic (seeded); re-running skips
finished shards.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits.py, vq_tokenizer.py beside this file
from digits import digit_image, heldout_scan

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DTMF = {
    1: (697, 1209),
    2: (697, 1336),
    3: (697, 1477),
    4: (770, 1209),
    5: (770, 1336),
    6: (770, 1477),
    7: (852, 1209),
    8: (852, 1336),
    9: (852, 1477),
    0: (941, 1336),
}
RATE = 16000
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODALITIES = ("image", "video", "audio")
# Training samples per task; the data teach what the held-out split tests (see evaluate.py)
COUNTS = {"image_qa": 1800, "video_qa": 2400, "audio_qa": 2400, "text_qa": 2400, "draw": 1200}
SHARDS = 10  # the recipe trains on shards 0-8 and evaluates on shard 9
HELDOUT = {"image_qa": 100, "video_qa": 40, "audio_qa": 60, "text_qa": 100, "draw": 0}
# Drawings are taught from the most typical scans of each digit (nearest its mean scan), as image-generation
# data is filtered for quality: the full spread of handwriting left the tiny model's drawings illegible
DRAW_EXEMPLARS = 5
VQ_STEPS = 300  # ~18 s on 2 cores (batches of 32); held-out reconstructions are then read as their digit ~96%


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames: list, fps: int = 4) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].size[0], frames[0].size[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_image(f)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def dtmf_wav(digits: list[int], rng: random.Random) -> bytes:
    """The digits dialed: each tone pair 0.2-0.3 s at a random level, pauses of 0.04-0.08 s, light noise."""
    import soundfile as sf

    parts = []
    for d in digits:
        lo, hi = DTMF[d]
        t = np.arange(int(rng.uniform(0.2, 0.3) * RATE)) / RATE
        level = rng.uniform(0.25, 0.45)
        parts += [level * (np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t))]
        parts += [np.zeros(int(rng.uniform(0.04, 0.08) * RATE))]
    wave = np.concatenate(parts)
    wave += np.random.default_rng(rng.randrange(2**32)).normal(0, 0.01, wave.shape)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), RATE, format="WAV")
    return buf.getvalue()


def chat(user: list[dict], answer: list[dict] | str, i: int, source: str) -> dict:
    return {
        "id": f"{source}-{i:05d}",
        "source": source,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
    }


def _typical(images: np.ndarray, ids: list[int]) -> list[int]:
    """The DRAW_EXEMPLARS scans of one digit nearest its mean scan."""
    distance = ((images - images.mean(axis=0)) ** 2).sum(axis=(1, 2))
    return [ids[i] for i in np.argsort(distance, kind="stable")[:DRAW_EXEMPLARS]]


def make_docs(raw: Path, split: str, counts: dict[str, int], seed: int) -> list[dict]:
    """The samples of one split (`train` or `heldout`): digit scans of that split only, fresh DTMF
    recordings (random tone lengths, levels and noise), every task by `counts`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    scans = [k for k in range(len(digits.target)) if heldout_scan(k) == (split == "heldout")]
    by_digit = {d: [k for k in scans if digits.target[k] == d] for d in range(10)}
    typical = [k for d in range(10) for k in _typical(digits.images[by_digit[d]], by_digit[d])]
    for sub in ("images", "videos", "audio"):
        (raw / sub).mkdir(parents=True, exist_ok=True)

    def image(k: int) -> str:
        name = f"images/{k}.png"
        if not (raw / name).exists():
            (raw / name).write_bytes(png_bytes(digit_image(digits.images[k])))
        return name

    docs: list[dict] = []
    for i in range(counts["image_qa"]):
        k = rng.choice(scans)
        q = rng.choice(["What digit is this?", "Which number is written here?", "Read the digit."])
        user = [{"type": "image", "path": image(k)}, {"type": "text", "text": q}]
        docs.append(chat(user, f"It is {WORDS[digits.target[k]]}.", i, "image_qa"))
    for i in range(counts["video_qa"]):
        seq = [rng.randrange(10) for _ in range(4)]
        name = f"videos/{split}-{i}.mp4"
        frames = [digit_image(digits.images[rng.choice(by_digit[d])]) for d in seq]
        (raw / name).write_bytes(mp4_bytes(frames))
        user = [{"type": "video", "path": name}, {"type": "text", "text": "Which digits appear, in order?"}]
        docs.append(chat(user, " ".join(WORDS[d] for d in seq), i, "video_qa"))
    for i in range(counts["audio_qa"]):
        seq = [rng.randrange(10) for _ in range(rng.randint(1, 3))]
        name = f"audio/{split}-{i}.wav"
        (raw / name).write_bytes(dtmf_wav(seq, rng))
        user = [{"type": "audio", "path": name}, {"type": "text", "text": "Which digits were dialed?"}]
        docs.append(chat(user, " ".join(WORDS[d] for d in seq), i, "audio_qa"))
    for i in range(counts["text_qa"]):
        a, b = rng.randrange(10), rng.randrange(10)
        if a + b < 10:
            q, ans = f"What is {WORDS[a]} plus {WORDS[b]}?", WORDS[a + b]
        else:
            q, ans = f"Is {WORDS[a]} larger than {WORDS[b]}?", "yes" if a > b else "no"
        docs.append(chat([{"type": "text", "text": q}], ans, i, "text_qa"))
    for i in range(counts["draw"]):
        k = rng.choice(typical)
        user = [{"type": "text", "text": f"Draw the digit {WORDS[digits.target[k]]}."}]
        docs.append(chat(user, [{"type": "image", "path": image(k), "generate": True}], i, "draw"))
    return [{**d, "id": f"{split}-{d['id']}"} for d in docs]


def make_raw(out: Path, seed: int = 0) -> dict[str, Path]:
    """OUT/raw: media, the training manifest (quickstart.jsonl, shuffled so every shard mixes tasks) and
    the held-out manifest (heldout.jsonl: scans and recordings no training sample uses; not sharded)."""
    raw = out / "raw"
    train = make_docs(raw, "train", COUNTS, seed)
    random.Random(seed).shuffle(train)
    paths = {"quickstart": raw / "quickstart.jsonl", "heldout": raw / "heldout.jsonl"}
    paths["quickstart"].write_text("".join(json.dumps(d) + "\n" for d in train))
    held = make_docs(raw, "heldout", HELDOUT, seed + 1)
    paths["heldout"].write_text("".join(json.dumps(d) + "\n" for d in held))
    return paths


def train_tokenizer(out: Path, manifests: dict[str, Path]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in manifests["quickstart"].read_text().splitlines():  # the training texts only
        for m in json.loads(line)["messages"]:
            c = m["content"]
            texts.append(c if isinstance(c, str) else " ".join(p.get("text", "") for p in c))
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    for m in MODALITIES:
        specials += [f"<|{m}_start|>", f"<|{m}|>", f"<|{m}_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*texts, "user assistant system"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=specials[1:],
    )
    fast.save_pretrained(out / "tokenizer")
    return out / "tokenizer"


def preprocess_spec(root: Path, manifests: dict[str, Path], tokenizer: Path, model: str, **overrides):
    """The preprocessing job over the quickstart manifest (the bench reuses it with other sizes)."""
    from omni_data.preprocess.spec import PreprocessSpec

    return PreprocessSpec.from_dict(
        {
            "inputs": [
                {
                    "kind": "jsonl",
                    "paths": str(manifests["quickstart"]),
                    "source": "quickstart",
                    "media_root": str(root / "raw"),
                }
            ],
            "output": str(root / "shards"),
            "shard_samples": -(-sum(COUNTS.values()) // SHARDS),
            "processor": {
                "factory": "omni_train.assembly:preprocessing_processor",
                "options": {"model": str(Path(model).resolve()), "tokenizer": str(tokenizer.resolve())},
            },
            **overrides,
        }
    )


def train_image_tokenizer(root: Path, model: str) -> Path:
    """OUT/vq: the VQ-VAE of the recipe's image decoder, trained on the training scans (its `path`)."""
    from vq_tokenizer import train_vq

    with open(model) as f:
        decoder = yaml.safe_load(f)["model"]["decoders"]["image_gen"]
    print("training the image tokenizer (VQ-VAE) on the training digits")
    return train_vq(decoder["config"], root / "vq", steps=VQ_STEPS)


def build(
    out: str = "data/quickstart", model: str = "apps/quickstart/recipe.yaml", num_cpus: int | None = None
):
    from omni_data.preprocess.job import run_preprocess

    root = Path(out)
    manifests = make_raw(root)
    tokenizer = train_tokenizer(root, manifests)
    train_image_tokenizer(root, model)
    return run_preprocess(preprocess_spec(root, manifests, tokenizer, model, ray={"num_cpus": num_cpus}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/quickstart")
    ap.add_argument("--model", default="apps/quickstart/recipe.yaml")
    ap.add_argument("--num-cpus", type=int, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    summary = build(args.out, args.model, args.num_cpus)
    print(summary.text())
    print(f"quickstart dataset in {args.out} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
