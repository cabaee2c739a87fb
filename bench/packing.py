"""Packing efficiency and loader throughput (one core).

    uv run python bench/packing.py [--samples 20000] [--budget 8192] [--shards 8]

Prints one JSON object.
- packing: real tokens / budget per micro-batch on a long-tailed mix (lognormal text lengths, 10%
  image samples of 256-1024 tokens, 2% video samples of 2-6k tokens) for pad-to-longest, next-fit and
  ours (oldest-first + first-fit-decreasing over a bounded buffer), with ratios to next-fit.
- loader: samples/s and tokens/s of the full omni-data pipeline (parse, tokenize with the chat
  template, decode images, pack, collate) in-process, against reading the same shards with plain
  webdataset (a) raw and (b) doing the same decoding and tokenization without packing.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' synthetic data and tokenizer

from omni_data.config import DataConfig
from omni_data.loader import OmniLoader
from omni_data.packing import Budget, take_batch
from tests.omni_data.fixtures import processor, tokenizer, write_wds


@dataclass
class _Len:
    llm_tokens: int
    encoder_units: int = 0
    media_items: int = 0


def long_tailed_lengths(n: int, budget: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.02:
            length = rng.randint(2000, 6000)
        elif u < 0.12:
            length = rng.randint(256, 1024) + int(rng.lognormvariate(4, 1))
        else:
            length = int(rng.lognormvariate(5.5, 1.0)) + 8
        out.append(min(length, budget))  # over-budget samples are truncated by the loader
    return out


def pad_to_longest(lengths: list[int], budget: int) -> float:
    """Batches in arrival order while batch_size x longest <= budget; compute is the padded size."""
    real = batches = 0
    i = 0
    while i < len(lengths):
        longest, j = lengths[i], i + 1
        while j < len(lengths) and (j - i + 1) * max(longest, lengths[j]) <= budget:
            longest = max(longest, lengths[j])
            j += 1
        real += sum(lengths[i:j])
        batches += 1
        i = j
    return real / (batches * budget)


def next_fit(lengths: list[int], budget: int) -> float:
    fill, batches = 0, 1
    for n in lengths:
        if fill + n > budget:
            batches += 1
            fill = 0
        fill += n
    return sum(lengths) / (batches * budget)


def ours(lengths: list[int], budget: int, buffer: int) -> float:
    b = Budget(budget)
    pending = [_Len(n) for n in lengths]
    pending.reverse()
    buf: list[_Len] = []
    batches = 0
    while pending or buf:
        while pending and len(buf) < buffer:
            buf.append(pending.pop())
        take_batch(buf, b)
        batches += 1
    return sum(lengths) / (batches * budget)


def loader_throughput(shard_dir: str, budget: int) -> dict:
    import webdataset as wds
    from PIL import Image

    urls = sorted(str(p) for p in Path(shard_dir).glob("shard-*.tar"))
    t0 = time.perf_counter()
    raw = sum(1 for _ in wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only))
    raw_s = time.perf_counter() - t0

    tok = tokenizer()
    t0 = time.perf_counter()
    n = tokens = 0
    for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only):
        doc = json.loads(s["json"])
        text = [
            {"role": m["role"], "content": "".join(p.get("text", "<|image|>") for p in m["content"])}
            for m in doc["messages"]
        ]
        tokens += len(
            tok(tok.apply_chat_template(text, tokenize=False), add_special_tokens=False)["input_ids"]
        )
        if "0.png" in s:
            with Image.open(io.BytesIO(s["0.png"])) as im:
                torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
        n += 1
    same_work_s = time.perf_counter() - t0

    cfg = DataConfig.from_dict(
        {
            "sources": [{"kind": "webdataset", "paths": urls}],
            "max_tokens": budget,
            "epochs": 1,
            "pack_buffer": 64,
            "shuffle_shards": False,
        }
    )
    t0 = time.perf_counter()
    ours_n = ours_tokens = 0
    for step in OmniLoader(cfg, processor()):
        for b in step.micro_batches:
            ours_n += b.num_samples
            ours_tokens += b.num_tokens
    ours_s = time.perf_counter() - t0
    assert ours_n == raw == n, (ours_n, raw, n)
    return {
        "samples": n,
        "plain_webdataset_raw": {"samples_per_s": raw / raw_s},
        "plain_webdataset_same_work": {
            "samples_per_s": n / same_work_s,
            "tokens_per_s": tokens / same_work_s,
        },
        "omni_data": {"samples_per_s": ours_n / ours_s, "tokens_per_s": ours_tokens / ours_s},
        "ratio_vs_same_work": (ours_n / ours_s) / (n / same_work_s),
        "ratio_vs_raw": (ours_n / ours_s) / (raw / raw_s),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--loader-samples", type=int, default=4000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lengths = long_tailed_lengths(args.samples, args.budget)
    nf = next_fit(lengths, args.budget)
    packing = {"pad_to_longest": pad_to_longest(lengths, args.budget), "next_fit": nf}
    for buf in (16, 64, 256):
        packing[f"ours_buffer_{buf}"] = ours(lengths, args.budget, buf)
    packing["ratio_ours64_vs_next_fit"] = packing["ours_buffer_64"] / nf
    with tempfile.TemporaryDirectory() as d:
        per = args.loader_samples // args.shards
        write_wds(d, [per] * args.shards, image_every=4)
        loader = loader_throughput(d, 1024)
    print(
        json.dumps(
            {
                "bench": "packing_and_loader",
                "device": "cpu, 1 thread",
                "budget_tokens": args.budget,
                "length_mix": {
                    "samples": len(lengths),
                    "mean": sum(lengths) / len(lengths),
                    "max": max(lengths),
                },
                "packing_efficiency": packing,
                "loader_budget_tokens": 1024,
                "loader": loader,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
