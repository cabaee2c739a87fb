"""The quickstart dataset: real handwritten digits (scikit-learn's bundled scans) as images, videos of
digit sequences, DTMF audio of dialed digits, arithmetic text and "draw the digit" image-generation
targets.

    uv run python apps/quickstart/make_data.py [--out data/quickstart] [--model apps/quickstart/recipe.yaml]

Writes raw media + JSONL manifests under OUT/raw, trains a byte-level BPE tokenizer (with the chat
template and modality tokens) into OUT/tokenizer, then runs the preprocessing job (a local Ray
cluster) into OUT/shards: WebDataset tars, index.parquet, errors.jsonl. Deterministic (seeded);
re-running skips finished shards.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from pathlib import Path

import numpy as np

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
COUNTS = {"image_qa": 600, "video_qa": 150, "audio_qa": 200, "text_qa": 200, "draw": 300}


def digit_image(pixels: np.ndarray, size: int = 32):
    from PIL import Image

    gray = (pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


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


def dtmf_wav(digits: list[int]) -> bytes:
    import soundfile as sf

    t = np.arange(int(0.25 * RATE)) / RATE
    parts = []
    for d in digits:
        lo, hi = DTMF[d]
        parts += [0.4 * (np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t)), np.zeros(int(0.05 * RATE))]
    buf = io.BytesIO()
    sf.write(buf, np.concatenate(parts).astype(np.float32), RATE, format="WAV")
    return buf.getvalue()


def chat(user: list[dict], answer: list[dict] | str, i: int, source: str) -> dict:
    return {
        "id": f"{source}-{i:05d}",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
    }


def make_raw(out: Path, seed: int = 0) -> dict[str, Path]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    by_digit = {d: [i for i, t in enumerate(digits.target) if t == d] for d in range(10)}
    raw = out / "raw"
    for sub in ("images", "videos", "audio"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    manifests: dict[str, list[dict]] = {k: [] for k in COUNTS}
    for i in range(COUNTS["image_qa"]):
        k = rng.randrange(len(digits.target))
        name = f"images/{k}.png"
        if not (raw / name).exists():
            (raw / name).write_bytes(png_bytes(digit_image(digits.images[k])))
        q = rng.choice(["What digit is this?", "Which number is written here?", "Read the digit."])
        manifests["image_qa"].append(
            chat(
                [{"type": "image", "path": name}, {"type": "text", "text": q}],
                f"It is {WORDS[digits.target[k]]}.",
                i,
                "image_qa",
            )
        )
    for i in range(COUNTS["video_qa"]):
        seq = [rng.randrange(10) for _ in range(4)]
        frames = [digit_image(digits.images[rng.choice(by_digit[d])]) for d in seq]
        name = f"videos/{i}.mp4"
        (raw / name).write_bytes(mp4_bytes(frames))
        manifests["video_qa"].append(
            chat(
                [{"type": "video", "path": name}, {"type": "text", "text": "Which digits appear, in order?"}],
                " ".join(WORDS[d] for d in seq),
                i,
                "video_qa",
            )
        )
    for i in range(COUNTS["audio_qa"]):
        seq = [rng.randrange(10) for _ in range(rng.randint(1, 3))]
        name = f"audio/{i}.wav"
        (raw / name).write_bytes(dtmf_wav(seq))
        manifests["audio_qa"].append(
            chat(
                [{"type": "audio", "path": name}, {"type": "text", "text": "Which digits were dialed?"}],
                " ".join(WORDS[d] for d in seq),
                i,
                "audio_qa",
            )
        )
    for i in range(COUNTS["text_qa"]):
        a, b = rng.randrange(10), rng.randrange(10)
        if a + b < 10:
            q, ans = f"What is {WORDS[a]} plus {WORDS[b]}?", WORDS[a + b]
        else:
            q, ans = f"Is {WORDS[a]} larger than {WORDS[b]}?", "yes" if a > b else "no"
        manifests["text_qa"].append(chat([{"type": "text", "text": q}], ans, i, "text_qa"))
    for i in range(COUNTS["draw"]):
        k = rng.randrange(len(digits.target))
        name = f"images/{k}.png"
        if not (raw / name).exists():
            (raw / name).write_bytes(png_bytes(digit_image(digits.images[k])))
        manifests["draw"].append(
            chat(
                [{"type": "text", "text": f"Draw the digit {WORDS[digits.target[k]]}."}],
                [{"type": "image", "path": name, "generate": True}],
                i,
                "draw",
            )
        )
    # One shuffled manifest, so every shard mixes understanding and generation samples.
    mixed = [{**d, "source": source} for source, docs in manifests.items() for d in docs]
    rng.shuffle(mixed)
    path = raw / "quickstart.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in mixed))
    return {"quickstart": path}


def train_tokenizer(out: Path, manifests: dict[str, Path]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for path in manifests.values():
        for line in path.read_text().splitlines():
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
            "shard_samples": 150,
            "processor": {
                "factory": "omni_train.assembly:preprocessing_processor",
                "options": {"model": str(Path(model).resolve()), "tokenizer": str(tokenizer.resolve())},
            },
            **overrides,
        }
    )


def build(
    out: str = "data/quickstart", model: str = "apps/quickstart/recipe.yaml", num_cpus: int | None = None
):
    from omni_data.preprocess.job import run_preprocess

    root = Path(out)
    manifests = make_raw(root)
    tokenizer = train_tokenizer(root, manifests)
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
