"""Generate from a trained run: text answers, and images written to PNG files.

    uv run python apps/generate.py runs/quickstart --prompt "Draw the digit seven." --out outputs/gen

Loads RUN_DIR/config.yaml, the tokenizer and the newest checkpoint (or --step), renders the prompt
with the chat template, and generates with a KV cache (greedy unless --temperature > 0). With
--image the answer is started with the image start marker, so the model must draw.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    from PIL import Image

    from omni_train.assembly import chat_processor
    from omni_train.inference import load_trained

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompt", action="append", required=True, help="repeatable")
    ap.add_argument("--out", default="outputs/generated")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--image", action="store_true", help="start the answer with an image")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--cfg-scale", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model, tok, cfg = load_trained(args.run_dir, args.step)
    processor = chat_processor(model, cfg.model_spec, tok)  # the model's own marker tokens
    markers = {m: processor.marker_ids(m) for m in model.modality_decoder}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    for i, prompt in enumerate(args.prompt):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if args.image:
            ids.append(markers["image"][0])
        result = model.generate(
            torch.tensor(ids),
            markers,
            max_new_tokens=args.max_new_tokens,
            eos_id=tok.eos_token_id,
            temperature=args.temperature,
            top_k=args.top_k,
            cfg_scale=args.cfg_scale,
            generator=generator,
        )
        placeholders = {ids_[1] for ids_ in markers.values()}
        answer = tok.decode([t for t in result.tokens if t not in placeholders], skip_special_tokens=False)
        print(f"[{i}] {prompt!r} -> {answer!r}")
        for j, image in enumerate(result.images):
            pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
            path = out / f"{i:03d}-{j}.png"
            Image.fromarray(pixels).save(path)
            print(f"    image {tuple(image.shape[1:])} -> {path}")


if __name__ == "__main__":
    main()
