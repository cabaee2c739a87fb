"""Our trainer's step vs a plain FSDP2 + HF loop on the same GPU, in the same run.

    python bench/gpu_step.py [--workload text omni] [--tokens 8192] [--steps 10] [--small]

Workloads (random weights, bf16 compute, fp32 master weights and reduction, AdamW, no recompute):
- text: a ~1.3B dense Qwen2-like foundation (hidden 2048, 16 layers, GQA 16/2, vocab 151,936).
- omni: a Qwen2-VL-2B-sized model (text 1536 x 28 layers; vision tower 1280 x 32 blocks) with 448x448
  images (256 LLM tokens each), written by HF's save_pretrained and trained through `model.pretrained`.
Ours: `omni-train run RECIPE --nproc 1` (`--kernels`: its parallel.kernels, default auto) on generated JSONL documents of 300-3000 tokens packed into
`--tokens`-token micro-batches, attention per document (the backend `auto` picks: omni_dist.attention.AUTO_ORDER);
metrics.jsonl gives tokens/s, MFU and peak memory (medians after 3 warm-up steps).
Plain: HF's own class with fully_shard on every decoder layer / vision block and the root, one
`--tokens`-long sequence per step (SDPA causal over the whole sequence; omni: the same number of images
in it), timed with CUDA synchronisation. One step of it runs under torch's FlopCounterMode; the FLOPs
our MFU formula (omni_models.flops) gives for that step are printed beside it. The counter counts
attention as full (non-causal) products (on CPU through the math SDPA, as it has no formula for the CPU
kernel); torch < 2.13 cannot count grouped-query SDPA (then the counted FLOPs are null).
--kernels auto torch: one run of ours per setting, all against one plain run (one JSON object each).
--profile DIR: ours runs 2 profiled steps after the timed ones (train.profile: trace and
summary_rank0.json in DIR/WORKLOAD_KERNELS); the summary goes into the JSON object as ours' "profile".
--small: small dims in fp32 on CPU (text: hidden 256 x 4 layers, vocab 4096; use --tokens 1024): the
script's check, and the CPU comparison at those dims; `--nproc 2` runs both on 2 ranks (gloo, the cores
shared), each rank's micro-batch `--tokens` long; tokens/s are per rank.
Prints one JSON object per workload and kernel setting with ours/plain ratios.
On a machine without the project's environment, run it from the source tree (PYTHONPATH=packages/*/src
and the repo root) with the pure-Python packages it lacks installed from wheels: pydantic (+ pydantic-core,
annotated-types, typing-inspection, typing-extensions), torchdata, webdataset, braceexpand, and the locked
transformers: bench/gpu_wheels.py downloads them, bench/gpu_pass.py installs them and runs this bench.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
OMNI_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
OMNI_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 1536,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
SMALL_TEXT = {  # the CPU comparison of the faster-steps issue: hidden 256, 4 layers, fp32
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
}
SMALL_VISION = {
    "depth": 2,
    "embed_dim": 32,
    "hidden_size": SMALL_TEXT["hidden_size"],  # the merger's output is the LM's width
    "num_heads": 2,
    "mlp_ratio": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
IMAGE_PX = 448  # 32 x 32 patches of 14 px -> 256 tokens after the 2x2 merge
# Both loops' hyperparameters: ours gets them as recipe keys (train.lr, train.grad_clip), the plain loop
# passes them to torch itself.
LR, GRAD_CLIP = 1e-5, 1.0
WARMUP = 3
PROFILED = 2  # --profile: steps after the timed ones


def _dims(workload: str, small: bool) -> dict:
    if workload == "text":
        return {**TEXT, **SMALL_TEXT} if small else TEXT
    text = {**OMNI_TEXT, **SMALL_TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}
    return {"text": text if small else OMNI_TEXT, "vision": SMALL_VISION if small else OMNI_VISION}


# -- data and model directories --------------------------------------------------------------
def _documents(n: int, with_image: bool, seed: int = 0) -> list[dict]:
    from tests.omni_data.fixtures import WORDS

    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = " ".join(rng.choices(WORDS, k=rng.randint(300, 3000)))
        user = [{"type": "text", "text": words[: len(words) // 2]}]
        if with_image:
            user.append({"type": "image", "path": f"img{i % 8}.png"})
        docs.append(
            {
                "id": f"d{i}",
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": words[len(words) // 2 :]},
                ],
            }
        )
    return docs


def _write_data(root: Path, workload: str) -> Path:
    from tests.omni_models.omni_fixtures import png

    root.mkdir(parents=True, exist_ok=True)
    for k in range(8):
        (root / f"img{k}.png").write_bytes(png(IMAGE_PX, IMAGE_PX, seed=k))
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in _documents(400, workload == "omni")))
    return path


def _tokenizer_dir(root: Path) -> Path:
    from tests.omni_data.fixtures import train_tokenizer

    path = root / "tokenizer"
    train_tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>")).save_pretrained(path)
    return path


def _omni_dir(root: Path, small: bool, device: torch.device) -> Path:
    from tests.omni_models.hf_dirs import qwen_vl_dir

    dims = _dims("omni", small)
    with device:  # building 2B random weights is quicker on the GPU; save_pretrained writes them out
        return qwen_vl_dir(
            root, "qwen2_vl", init=0.02, text_dims=dims["text"], vision=dims["vision"], max_pixels=IMAGE_PX**2
        )


# -- ours: the CLI on a recipe -------------------------------------------------------------------
def _backend(device: torch.device) -> str:
    """The packed-attention backend `auto` picks on this device (omni_dist.attention.AUTO_ORDER)."""
    from omni_dist.attention.backends import resolve_backend

    return resolve_backend("auto", device.type)[0]


def _ours(
    workload: str, kernels: str, args, work: Path, data: Path, model_dir: Path | None, device: torch.device
) -> dict:
    import yaml

    backend = _backend(device)
    if workload == "text":
        config = {**_dims("text", args.small), "dtype": "float32"}
        model = {
            "foundation": {"name": "qwen2", "config": config, "attention": backend},
        }
        tokenizer = str(_tokenizer_dir(work))
    else:
        model, tokenizer = {"pretrained": str(model_dir), "attention": backend}, str(model_dir)
    run_dir = work / f"ours_{workload}_{kernels}"
    timed_steps = WARMUP + args.steps
    train = {"steps": timed_steps, "lr": LR, "grad_clip": GRAD_CLIP, "warmup_steps": 1, "eval_every": 0}
    profile_dir = args.profile / f"{workload}_{kernels}" if args.profile else None
    if profile_dir:  # profiled steps after the timed ones: the profiler does not touch the timing
        train["steps"] = timed_steps + PROFILED  # train.profile.steps [a, b): 1-based, b exclusive
        train["profile"] = {"steps": [timed_steps + 1, timed_steps + 1 + PROFILED], "dir": str(profile_dir)}
    recipe = {
        "model": model,
        "data": {
            "tokenizer": tokenizer,
            "sources": [{"kind": "jsonl", "paths": str(data)}],
            "max_tokens": args.tokens,
            "num_workers": 1,
            "shuffle_buffer": 16,
        },
        "parallel": {
            "param_dtype": "float32" if args.small else "bfloat16",
            "kernels": kernels.removesuffix("+compile"),
            "compile": kernels.endswith("+compile"),
        },
        "train": train,
        "checkpoint": {"interval": 0, "resume": "none", "save_final": False},
        "logging": {"run_dir": str(run_dir), "console": "none", "tensorboard": False},
    }
    path = work / f"{workload}_{kernels}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "omni_train.cli", "run", str(path), "--nproc", str(args.nproc)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(
            f"omni-train run failed ({workload}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and WARMUP < r["step"] <= timed_steps]
    med = lambda key: statistics.median(r[key] for r in timed) if timed[0].get(key) is not None else None  # noqa: E731
    out = {
        "attention": backend,
        "kernels": kernels,
        "tokens_per_step": med("tokens"),
        "tokens_per_s": med("tokens_per_s_per_device"),
        "mfu": med("mfu"),
        "peak_mem_gb": max(r["mem_gb"] for r in timed),
    }
    if profile_dir:
        summary = profile_dir / "summary_rank0.json"
        missing = {"missing": f"the run wrote no {summary}"}
        out["profile"] = json.loads(summary.read_text()) if summary.exists() else missing
    if args.predict:  # the planner's step for this recipe and layout vs the timed steps
        from omni_train.calibrate import compare_run

        name = torch.cuda.get_device_name() if device.type == "cuda" else "h100"
        try:
            out["planner"] = compare_run(run_dir, name, (WARMUP + 1, timed_steps))
        except (ValueError, OSError, RuntimeError) as e:  # the measurements stand without it
            out["planner"] = {"error": f"{type(e).__name__}: {e}"}
    return out


# -- plain: HF class + fully_shard, one long sequence ---------------------------------------------
def _plain_inputs(workload: str, model, tokens: int, device: torch.device, model_dir: Path | None) -> dict:
    g = torch.Generator().manual_seed(0)
    if workload == "text":
        ids = torch.randint(32, 400, (1, tokens), generator=g)
        return {"input_ids": ids.to(device), "labels": ids.to(device)}
    from transformers import AutoImageProcessor

    from tests.omni_models.omni_fixtures import png

    cfg = model.config
    images = max(1, tokens // 1400)  # about the image share of the packed documents (1 per ~1400 tokens)
    proc = AutoImageProcessor.from_pretrained(model_dir)
    import io

    from PIL import Image

    pixels = proc(images=[Image.open(io.BytesIO(png(IMAGE_PX, IMAGE_PX, seed=k))) for k in range(images)])
    grid = torch.as_tensor(pixels["image_grid_thw"])
    per_image = int(grid[0].prod()) // 4
    text = (tokens - images * (per_image + 2)) // images
    pieces = []
    for _ in range(images):
        pieces += [torch.randint(32, 400, (text,), generator=g), torch.tensor([cfg.vision_start_token_id])]
        pieces += [torch.full((per_image,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id])]
    ids = torch.cat(pieces)
    ids = torch.cat([ids, torch.randint(32, 400, (tokens - ids.numel(),), generator=g)])[None]
    return {
        "input_ids": ids.to(device),
        "labels": ids.masked_fill(ids == cfg.image_token_id, -100).to(device),
        "mm_token_type_ids": (ids == cfg.image_token_id).int().to(device),
        "pixel_values": torch.as_tensor(pixels["pixel_values"]).to(device),
        "image_grid_thw": grid.to(device),
    }


def _plain(workload: str, args, model_dir: Path | None) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLForConditionalGeneration

    from omni_models.flops import transformer_flops

    device = torch.device("cpu") if args.small else torch.device("cuda", 0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if device.type == "cpu":  # the cores shared by the ranks, as omni-train run shares them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group("gloo" if args.small else "nccl", device_id=None if args.small else device)
    if workload == "text":
        model = Qwen2ForCausalLM(Qwen2Config(**_dims("text", args.small), attn_implementation="sdpa"))
        lm, blocks = model.model, list(model.model.layers)
    else:
        model = Qwen2VLForConditionalGeneration.from_pretrained(
            model_dir, attn_implementation="sdpa", dtype=torch.float32
        )
        lm, blocks = (
            model.model.language_model,
            [*model.model.visual.blocks, *model.model.language_model.layers],
        )
    model.to(device)
    mp = MixedPrecisionPolicy(
        param_dtype=torch.float32 if args.small else torch.bfloat16, reduce_dtype=torch.float32
    )
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # The baseline stays plain torch: its AdamW (foreach), not ours (assembly.build_optimizer: fused AdamW
    # that can skip a non-finite step on the device).
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
    inputs = _plain_inputs(workload, model, args.tokens, device, model_dir)

    def step():
        model(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    # CPU: the math SDPA, whose matmuls the counter sees (it has no formula for the CPU flash kernel)
    math = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
    try:
        with counter, math:
            model(**inputs).loss.backward()
        counted = counter.get_total_flops()
        by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    except AssertionError as e:  # torch < 2.13: its SDPA formula rejects grouped-query shapes
        counted, by_op = None, {"error": str(e)}
    opt.zero_grad(set_to_none=True)
    for _ in range(WARMUP):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    cfg = lm.config
    width = cfg.num_attention_heads * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    )
    block_params = sum(p.numel() for p in lm.layers.parameters())
    formula = transformer_flops(block_params, [args.tokens], cfg.num_hidden_layers, width, causal=True)
    formula += 6.0 * cfg.vocab_size * cfg.hidden_size * args.tokens  # the LM head
    seconds = statistics.median(times)
    out = {
        "tokens_per_s": args.tokens / seconds,
        "step_s": seconds,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "foundation_flops_formula": formula,
        "flops_counted": counted,
        "counted_over_formula": counted / formula if counted else None,
        "flops_counted_by_op": by_op,
    }
    if device.type == "cuda" and counted:
        from omni_train.hardware import peak_flops

        out["mfu_counted"] = counted / seconds / peak_flops(device, torch.bfloat16)
    dist.destroy_process_group()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", nargs="+", choices=["text", "omni"], default=["text", "omni"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--nproc", type=int, default=1, help="ranks of both runs (CPU, --small: gloo)")
    ap.add_argument(
        "--kernels",
        nargs="+",
        choices=[f"{k}{c}" for k in ("auto", "liger", "torch") for c in ("", "+compile")],
        default=["auto"],
        help="ours: parallel.kernels (+compile: and parallel.compile); several: one run of ours each, "
        "against one plain run",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="ours: profile 2 steps after the timed ones (train.profile), trace and summary in "
        "DIR/WORKLOAD_KERNELS, the summary in the JSON",
    )
    ap.add_argument(
        "--predict", action="store_true", help="ours: the planner's predicted step beside the measured one"
    )
    ap.add_argument("--plain", choices=["text", "omni"], help=argparse.SUPPRESS)  # the plain loop's process
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=29517, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.plain:
        print(json.dumps(_plain(args.plain, args, args.model_dir)))
        return
    device = torch.device("cpu" if args.small else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --small to check the script on CPU")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    work = Path(tempfile.mkdtemp(prefix="omni-gpu-step-"))
    for workload in args.workload:
        head = {
            "bench": f"gpu_step {workload}: omni-train run vs plain FSDP2 + HF loop",
            "workload": workload,
            "device": name,
            "tokens_per_micro_batch": args.tokens,
        }
        results = {k: dict(head) for k in args.kernels}  # one JSON object per setting of ours, one plain run
        _compare(workload, args, work, device, results)  # prints each result as it comes


def _compare(workload: str, args, work: Path, device: torch.device, results: dict[str, dict]) -> None:
    """The plain loop first, then ours per kernel setting, each result printed as soon as it is known (a
    run cut short by a time limit still reports what finished)."""
    model_dir = _omni_dir(work, args.small, device) if workload == "omni" else None
    data = _write_data(work / f"data_{workload}", workload)
    cmd = [sys.executable, __file__, "--plain", workload, "--tokens", str(args.tokens)]
    cmd += ["--steps", str(args.steps), *(["--small"] if args.small else [])]
    cmd += ["--model-dir", str(model_dir)] if model_dir else []
    ranks = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(args.nproc)},
        )
        for r in range(args.nproc)
    ]
    outputs = [p.communicate() for p in ranks]
    failed = [(r, err) for r, (p, (_, err)) in enumerate(zip(ranks, outputs, strict=True)) if p.returncode]
    plain = None
    if failed:
        error = f"plain loop failed ({workload}, rank {failed[0][0]}):\n{failed[0][1][-6000:]}"
    else:
        plain = json.loads(outputs[0][0].strip().splitlines()[-1])
    for kernels, result in results.items():
        if plain is None:
            result["error"] = error
        else:
            result["plain"] = plain
        try:
            result["ours"] = _ours(workload, kernels, args, work, data, model_dir, device)
            if plain is not None:
                result["ours_over_plain_tokens_per_s"] = (
                    result["ours"]["tokens_per_s"] / plain["tokens_per_s"]
                )
        except RuntimeError as e:  # the other settings still run
            result["error"] = str(e)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
