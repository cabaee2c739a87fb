"""The planner against measurements: attention from the data's document lengths (packed as omni-data packs
them), per-micro-batch fixed costs, calibration from a run's metrics.jsonl, and the memory of the loss
head that runs (torch's or liger's chunk kernel)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_train.calibrate import calibrate, read_run
from omni_train.cli import app
from omni_train.config import dump, load_config
from omni_train.documents import given_lengths, packed_micro_batches, sample_lengths
from omni_train.memory import GIB, LossHead, ModelFacts, estimate_memory, loss_head
from omni_train.planner import DEVICES, layout_of, plan, predict
from tests.omni_data.fixtures import WORDS, tokenizer

# bench/gpu_step.py's text workload: a 1.3B Qwen2-like foundation
TEXT_1B3 = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _recipe(data: str, tok: str, dims: dict, max_tokens: int, **extra) -> dict:
    return {
        "model": {"foundation": {"name": "qwen2", "config": {**dims, "dtype": "float32"}}},
        "data": {"tokenizer": tok, "sources": [{"kind": "jsonl", "paths": data}], "max_tokens": max_tokens},
        "parallel": {"param_dtype": "bfloat16", "kernels": "torch"},
        **extra,
    }


def _write_documents(path: Path, n: int, words: tuple[int, int], seed: int = 0) -> Path:
    """Chat documents of a user turn and an answer, `words` words in all (uniform)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choices(WORDS, k=rng.randint(*words)))
            half = len(text) // 2
            messages = [
                {"role": "user", "content": text[:half]},
                {"role": "assistant", "content": text[half:]},
            ]
            f.write(json.dumps({"id": f"d{i}", "messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def text_1b3():
    """The 1.3B recipe (its data is never read here) and its model facts."""
    from omni_train.assembly import meta_model

    cfg = load_config(data=_recipe("/nonexistent/train.jsonl", "/nonexistent/tok", TEXT_1B3, 8192))
    return cfg, ModelFacts.of(meta_model(cfg.model_spec), cfg.model_spec)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A tokenizer directory, 300 documents of 20-400 words and the tiny recipe's YAML reading them."""
    root = tmp_path_factory.mktemp("docs")
    tok = root / "tokenizer"
    tokenizer().save_pretrained(tok)
    data = _write_documents(root / "train.jsonl", 300, (20, 400))
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps(_recipe(str(data), str(tok), TINY, 1024)))
    return root, recipe


# -- the document-length model ----------------------------------------------------------------------
def test_packing_documents_longer_than_the_budget():
    """Each is cut to the budget and fills a micro-batch alone: T^2 per micro-batch; dropped, nothing fits."""
    p = packed_micro_batches([5000, 9000, 7000] * 20, 4096)
    assert (p.tokens, p.sum_sq) == (4096, 4096**2)
    with pytest.raises(ValueError, match="no document of the sample fits"):
        packed_micro_batches([5000, 9000], 4096, overlong="drop")
    kept = packed_micro_batches([5000, 1024] * 50, 4096, overlong="drop")  # the long ones are dropped
    assert (kept.tokens, kept.sum_sq) == (4096, 4 * 1024**2)


def test_packing_short_equal_documents():
    """T / L documents of L: T x L per micro-batch, as long as the packer's buffer holds that many."""
    p = packed_micro_batches([128] * 500, 4096)
    assert (p.tokens, p.sum_sq) == (4096, 4096 * 128)
    # the packer chooses from pack_buffer candidates: 64 documents of 32 tokens fill half of 4096
    few = packed_micro_batches([32] * 2000, 4096, pack_buffer=64)
    assert (few.tokens, few.sum_sq) == (64 * 32, 64 * 32**2)


def test_packing_a_mix():
    exact = packed_micro_batches([6, 2] * 300, 8)  # each micro-batch: one 6 and one 2
    assert (exact.tokens, exact.sum_sq) == (8, 6**2 + 2**2)
    rng = random.Random(1)
    lengths = [rng.randint(300, 3000) for _ in range(400)]
    per_token = sum(n * n for n in lengths) / sum(
        lengths
    )  # E[l^2] / E[l]: what packing whole documents gives
    at = {t: packed_micro_batches(lengths, t) for t in (8192, 4096, 2048)}
    for t in (8192, 4096):
        assert at[t].tokens > 0.95 * t  # the packer fills the budget
        assert at[t].sum_sq / at[t].tokens == pytest.approx(per_token, rel=0.03)
    # attention work per token does not shrink from 8192 to 4096 (one document per micro-batch: it halves);
    # at 2048 the documents over 2048 are cut, so it shrinks by the cut only
    assert at[4096].sum_sq / 4096 == pytest.approx(at[8192].sum_sq / 8192, rel=0.03)
    cut = [min(n, 2048) for n in lengths]
    assert at[2048].sum_sq / at[2048].tokens == pytest.approx(sum(n * n for n in cut) / sum(cut), rel=0.03)


def test_model_matches_the_loader_on_sampled_documents(tiny_data):
    """Lengths sampled through the trainer's processor are the chat-rendered token counts, and the packing
    model's tokens and sum of l_i^2 per micro-batch match omni-data's loader on the same data."""
    from omni_data.dataset import StreamingDataset
    from omni_train.assembly import chat_processor, meta_model
    from omni_train.assembly import tokenizer as recipe_tokenizer

    root, recipe = tiny_data
    cfg = load_config(recipe)
    docs = sample_lengths(cfg, limit=1000)
    assert docs.warning is None and docs.origin.startswith(f"sampled 300 documents from {root}/train.jsonl")
    tok = recipe_tokenizer(cfg)
    lines = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    rendered = [tok.apply_chat_template(d["messages"], tokenize=False) for d in lines]
    assert list(docs.lengths) == [len(tok(r, add_special_tokens=False)["input_ids"]) for r in rendered]
    assert 0.3 < docs.labelled < 0.7  # the answers: about half of each document

    model = meta_model(cfg.model_spec)
    data = cfg.data_config()
    dataset = StreamingDataset(data, chat_processor(model, cfg.model_spec, tok), dp_rank=0, dp_size=1)
    batches = [item.batch for item in dataset if item.batch is not None]
    lengths = [
        [b - a for a, b in zip(x.cu_seqlens[:-1].tolist(), x.cu_seqlens[1:].tolist(), strict=True)]
        for x in batches
    ]
    full = lengths[: len(lengths) * 3 // 4]  # the end of the stream drains the packer's buffer
    model_says = docs.packing(data.max_tokens, data.pack_buffer, data.overlong)
    assert model_says.tokens == pytest.approx(sum(map(sum, full)) / len(full), rel=0.03)
    assert model_says.sum_sq == pytest.approx(sum(n * n for b in full for n in b) / len(full), rel=0.05)


# -- the planner --------------------------------------------------------------------------------------
def _by_tokens(candidates, recompute="none"):
    """Rank (0 first) and candidate of each micro-batch size, among those without recompute and offload."""
    plain = [c for c in candidates if c.layout.recompute == recompute and c.layout.offload == "none"]
    return {c.layout.max_tokens: (i, c) for i, c in enumerate(plain)}


def test_plan_ranks_micro_batches_by_the_documents_and_their_fixed_costs(text_1b3):
    cfg, facts = text_1b3
    h200 = DEVICES["h200"]
    one_doc = _by_tokens(plan(cfg, 1, h200, facts=facts)[0])
    # one document per micro-batch: smaller micro-batches save attention, so 4096 x 2 ranks above 8192 x 1
    assert one_doc[4096][0] < one_doc[8192][0]
    # documents of 300-3000 tokens: attention per token is the same at 8192 and 4096; 8192 x 1 ranks first
    mixed = _by_tokens(plan(cfg, 1, h200, given_lengths("300-3000"), facts=facts)[0])
    assert mixed[8192][0] == 0 and mixed[8192][0] < mixed[4096][0] < mixed[2048][0]
    # equal short documents: the same compute per token; each micro-batch costs micro_batch_s more
    short = _by_tokens(plan(cfg, 1, h200, given_lengths("512"), facts=facts)[0])
    one, four = short[8192][1], short[2048][1]
    assert four.times["compute"] == pytest.approx(one.times["compute"], rel=1e-9)
    assert four.times["fixed"] - one.times["fixed"] == pytest.approx(3 * h200.micro_batch_s)
    assert one.tokens_per_s_per_device > four.tokens_per_s_per_device


def test_plan_command_says_where_the_lengths_came_from(tiny_data):
    root, recipe = tiny_data
    run = lambda *a: CliRunner().invoke(app, ["plan", str(recipe), "--gpus", "2", *a])  # noqa: E731
    sampled = run("--doc-sample", "40")
    assert sampled.exit_code == 0, sampled.output
    assert f"document lengths: sampled 40 documents from {root}/train.jsonl" in sampled.output
    assert "warning" not in sampled.output
    given = run("--doc-tokens", "300-3000")
    assert "document lengths: given: --doc-tokens 300-3000; tokens per document: mean 1650" in given.output
    missing = run("--set", f"data.sources=[{{kind: jsonl, paths: {root}/missing.jsonl}}]")
    assert missing.exit_code == 0, missing.output
    assert "document lengths: fallback: one document per micro-batch" in missing.output
    assert "\nwarning: data.sources unreadable here (FileNotFoundError" in missing.output
    bad = run("--doc-tokens", "3000-300")
    assert bad.exit_code == 2 and "--doc-tokens '3000-300'" in bad.output


# -- calibration from a run ---------------------------------------------------------------------------
def _run_dir(root: Path, recipe: Path, step_s: float, tokens: int, wait: float = 0.0) -> Path:
    """A run directory as the trainer leaves it: config.yaml and metrics.jsonl (3 slow warm-up steps)."""
    run = root / f"run-{step_s}"
    run.mkdir()
    (run / "config.yaml").write_text(dump(load_config(recipe)))
    records = []
    for step in range(1, 11):
        seconds = step_s * (5 if step <= 3 else 1) / (1 - wait)
        rate = tokens / seconds
        records.append(
            {"step": step, "loss": 3.0, "tokens": tokens, "label_tokens": tokens // 2, "tokens_per_s": rate}
            | {"tokens_per_s_per_device": rate / 2, "mfu": None, "data_wait_frac": wait}
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_calibration_fits_the_efficiency_to_a_measured_run(tiny_data):
    root, recipe = tiny_data
    h100 = DEVICES["h100"]
    run = read_run(_run_dir(root, recipe, 0.05, 1900, wait=0.1))
    assert (run.world_size, run.steps) == (2, (4, 10))  # the warm-up steps are left out
    assert run.step_s == pytest.approx(0.05) and run.data_wait == pytest.approx(0.1)  # wait excluded
    docs = sample_lengths(run.cfg, 64)
    fit = calibrate(run, h100, docs)
    assert fit.factor < 1 and fit.device.efficiency == pytest.approx(h100.efficiency * fit.factor)
    # the fitted device predicts the run's own layout as measured (its real tokens and loss rows)
    per_micro_batch = run.tokens / 2
    packing = replace(docs.packing(1024, 64, "truncate").with_tokens(per_micro_batch), labelled=0.5)
    from omni_train.assembly import meta_model

    facts = ModelFacts.of(meta_model(run.cfg.model_spec), run.cfg.model_spec)
    step, _ = predict(run.cfg, layout_of(run.cfg, 2), fit.device, facts, packing)
    assert step == pytest.approx(0.05, rel=1e-9)

    out = CliRunner().invoke(app, ["plan", str(recipe), "--gpus", "2", "--calibrate", str(root / "run-0.05")])
    assert out.exit_code == 0, out.output
    assert (
        f"calibrated on {root}/run-0.05/metrics.jsonl (2 ranks, steps 4-10): measured 0.050 s" in out.output
    )
    assert f"(x{fit.factor:.2f})" in out.output
    # a step shorter than the fixed costs cannot be fitted by the efficiency
    fast = CliRunner().invoke(
        app, ["plan", str(recipe), "--gpus", "2", "--calibrate", str(_run_dir(root, recipe, 0.001, 1900))]
    )
    assert fast.exit_code == 2 and "efficiency cannot account for it" in fast.output


# -- the loss head's memory ---------------------------------------------------------------------------
def test_loss_head_memory(text_1b3):
    cfg, facts = text_1b3
    v, h = facts.head
    torch_head, liger_head = loss_head(cfg, liger=False), loss_head(cfg, liger=True)
    assert (torch_head, liger_head) == (LossHead(4096, "torch"), LossHead(4096, "liger"))
    # the transient is the chunk's logits: 12 bytes a logit with torch's kernel, the param dtype's with liger's
    assert torch_head.memory(8192, v, h, 2)[1] == 4096 * v * 12
    assert liger_head.memory(8192, v, h, 2)[1] == max(4096 * v * 2, v * h * 6)
    assert LossHead(1024).memory(8192, v, h, 2)[1] * 4 == torch_head.memory(8192, v, h, 2)[1]
    assert LossHead(0).memory(100, v, h, 2)[1] == max(100 * v * 12, v * h * 6)  # all rows: one chunk

    # one H200, bench/gpu_step.py's text run (8192 tokens, bf16): measured peak 33.35 GiB with torch kernels
    torch_peak = estimate_memory(cfg, 1, facts, head=torch_head)
    assert torch_peak.peak / GIB == pytest.approx(33.35, rel=0.015)
    assert estimate_memory(cfg, 1, facts, head=liger_head).peak < torch_peak.peak
