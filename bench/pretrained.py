"""A pretrained Qwen2.5-VL or Qwen2-VL (small random weights, save_pretrained directory) trained through
our composite vs HF's own `...ForConditionalGeneration` in a plain loop, on the same samples, same run.

    uv run python bench/pretrained.py [--family qwen2_5_vl|qwen2_vl] [--steps 8] [--samples 8]

Ours: `model.pretrained` expanded into parts, built as `omni-train run` builds it from a recipe
(omni_train.assembly on a one-process mesh: FSDP, the default loss chunking, the trainer's fused AdamW)
and stepped by the trainer's forward_backward, the samples packed into one micro-batch (packed attention,
M-RoPE positions from the data side). HF: the usual plain loop, the samples right-padded into one batch
with an attention mask, torch's AdamW. Both run forward + backward + AdamW in fp32 on CPU (sdpa). Prints one JSON
object: seconds per step (median after 2 warm-up steps), real and padded tokens, and hf_s / ours_s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

VISION = {
    "qwen2_vl": {"depth": 4, "embed_dim": 128, "hidden_size": 256, "num_heads": 4, "mlp_ratio": 2,
                 "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "qwen2_5_vl": {"depth": 4, "hidden_size": 128, "intermediate_size": 256, "num_heads": 4, "out_hidden_size": 256,
                   "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 32,
                   "fullatt_block_indexes": [3]},
}  # fmt: skip
CLASSES = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}


def _model_dir(root: Path, family: str):
    import transformers

    cfg = getattr(transformers, f"{CLASSES[family]}Config")(
        text_config={"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                     "num_attention_heads": 8, "num_key_value_heads": 2,
                     "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}, "bos_token_id": 0, "eos_token_id": 1},
        vision_config=VISION[family],
        image_token_id=2001, video_token_id=2002, vision_start_token_id=2003, vision_end_token_id=2004,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_class = getattr(transformers, f"{CLASSES[family]}ForConditionalGeneration")
    hf_class(cfg).save_pretrained(root)
    return root, hf_class


def _samples(n: int, cfg, positions):
    """ProcessedSamples: text, one image (64x64 px -> 64 tokens), an answer with labels."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    from omni_data.processor import ProcessedMedia, ProcessedSample

    processor = Qwen2VLImageProcessor(min_pixels=64 * 64, max_pixels=64 * 64, patch_size=4, merge_size=2)
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 2000, (int(torch.randint(40, 200, (1,), generator=g)),), generator=g)
        answer = torch.randint(0, 2000, (30,), generator=g)
        pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        hf = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
        image = {"pixel_values": hf["pixel_values"], "grid_thw": hf["image_grid_thw"]}
        tokens = int(image["grid_thw"].prod()) // 4
        ids = torch.cat([prompt, torch.tensor([2003] + [2001] * tokens + [2004]), answer])
        labels = torch.full_like(ids, -100)
        labels[-answer.numel() :] = answer
        media = [ProcessedMedia("image", False, image, tokens, tokens * 4, prompt.numel() + 1)]
        out.append(ProcessedSample(f"s{i}", "bench", ids, labels, media, positions(ids, media)))
    return out


def _recipe(path: Path, samples: int):
    """A training recipe of the pretrained directory: ours is built from it as `omni-train run` builds it
    (the samples are made here, so the data section only bounds the micro-batch)."""
    from omni_train.config import load_config

    data = {"sources": [{"kind": "jsonl", "paths": "unused.jsonl"}], "max_tokens": 512 * samples}
    return load_config(data={"model": {"pretrained": str(path)}, "data": data, "train": {"lr": 1e-5}})


def _time(step, steps: int) -> float:
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(CLASSES), default="qwen2_5_vl")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    from omni_data.collate import collate
    from omni_dist import ParallelMesh, distributed
    from omni_train.assembly import build_model, build_optimizer
    from omni_train.trainer import forward_backward

    torch.set_num_threads(2)
    path, hf_class = _model_dir(Path(tempfile.mkdtemp()), args.family)
    cfg = _recipe(path, args.samples)
    spec = cfg.model_spec
    samples = _samples(
        args.samples, spec.pretrained.hf_config, spec.pretrained.family.positions(spec.pretrained.hf_config)
    )
    batch = collate(samples)
    with distributed():  # one process: ours is the model, optimizer and step the trainer builds
        mesh = ParallelMesh.build(cfg.dims(1), device_type="cpu")
        ours = build_model(cfg, mesh, torch.device("cpu")).model
        opt, _ = build_optimizer(cfg, ours, torch.device("cpu"))

        def ours_step():
            forward_backward(ours, [batch], mesh, None, torch.device("cpu"))
            opt.step()
            opt.zero_grad(set_to_none=True)

        ours_s = _time(ours_step, args.steps)
    hf = hf_class.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    length = max(s.input_ids.numel() for s in samples)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, length - x.numel()), value=v)  # noqa: E731
    types = []
    for s in samples:
        t = torch.zeros_like(s.input_ids, dtype=torch.int32)
        t[s.input_ids == 2001] = 1
        types.append(pad(t, 0))
    inputs = {
        "input_ids": torch.stack([pad(s.input_ids, 0) for s in samples]),
        "attention_mask": torch.stack([pad(torch.ones_like(s.input_ids), 0) for s in samples]),
        "labels": torch.stack([pad(s.labels, -100) for s in samples]),
        "mm_token_type_ids": torch.stack(types),
        "pixel_values": torch.cat([s.media[0].tensors["pixel_values"] for s in samples]),
        "image_grid_thw": torch.cat([s.media[0].tensors["grid_thw"] for s in samples]),
    }
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)

    def hf_step():
        hf(**inputs).loss.backward()
        hf_opt.step()
        hf_opt.zero_grad()

    hf_s = _time(hf_step, args.steps)
    print(
        json.dumps(
            {
                "bench": f"pretrained {args.family} step: ours (packed) vs HF plain loop (padded)",
                "device": "cpu (2 threads), fp32, sdpa",
                "samples": args.samples,
                "tokens": batch.num_tokens,
                "padded_tokens": int(inputs["input_ids"].numel()),
                "ours_s": round(ours_s, 4),
                "hf_s": round(hf_s, 4),
                "hf_over_ours": round(hf_s / ours_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
