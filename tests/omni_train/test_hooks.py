"""The trainer's hooks as Trainer._hooks builds them from a config and Trainer.train calls them: which steps
evaluate, checkpoint, log and profile, and in which order (a step's metrics line, then its evaluation, then
its checkpoint; the final checkpoint at the end, none when resumed at the end)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from omni_data.loader import Step
from omni_train.config import TrainConfig
from omni_train.hooks import StepState
from omni_train.trainer import Trainer


def _config(run_dir, steps: int, log_every: int = 1, **train) -> TrainConfig:
    foundation = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    return TrainConfig.model_validate(
        {
            "model": {"foundation": {"name": "qwen2", "config": foundation}},
            "data": {
                "tokenizer": "unused",
                "sources": [{"kind": "jsonl", "paths": "train.jsonl"}],
                "eval_sources": [{"kind": "jsonl", "paths": "eval.jsonl"}],
                "max_tokens": 64,
            },
            "train": {"steps": steps, **train},
            "checkpoint": {"interval": 2, "save_final": True},
            "logging": {
                "run_dir": str(run_dir),
                "console": "none",
                "tensorboard": False,
                "sample_ids": True,
                "log_every": log_every,
            },
        }
    )


class _Run:
    """What Trainer._hooks reads of a trainer, recording what the hooks do with it."""

    def __init__(self, cfg: TrainConfig):
        self.events: list[tuple[str, int]] = []
        self.cfg, self.device, self.rank0 = cfg, torch.device("cpu"), True
        self.env, self.sp, self.mesh = SimpleNamespace(rank=0), None, SimpleNamespace(dp_rank=0)
        self.parts = {}
        self.checkpoints = SimpleNamespace(save=lambda step, parts: self.events.append(("save", step)))
        self.step = 0

    def on_progress(self, step: int, loss: float | None) -> None:
        self.step = step
        self.events.append(("progress", step))

    def evaluate(self) -> dict[str, float]:
        self.events.append(("eval", self.step))
        return {"eval/loss": 1.0 / self.step}

    def train(self, resumed_at: int = 0) -> None:
        """The calls Trainer.train makes, with a small model's steps in place of the real ones."""
        hooks = Trainer._hooks(self, resumed_at)
        model = torch.nn.Linear(8, 1)
        try:
            for n in range(resumed_at + 1, self.cfg.train.steps + 1):
                for hook in hooks:
                    hook.before_step(n)
                loss = model(torch.randn(4, 8)).square().mean()
                loss.backward()
                batch = Step([SimpleNamespace(sample_ids=[f"s{n}a", f"s{n}b"])], epoch=0)
                record = {"step": n, "loss": loss.item(), "tokens_per_s": 1.0}
                for hook in hooks:
                    hook.after_step(StepState(n, batch, record))
            for hook in hooks:
                hook.on_end(self.cfg.train.steps)
        finally:
            for hook in hooks:
                hook.close()


def test_hooks_run_in_their_order_at_their_steps(tmp_path):
    run = _Run(_config(tmp_path, steps=5, eval_every=2, profile={"steps": (2, 4)}))
    run.train()
    p, e, s = "progress", "eval", "save"
    assert run.events == [
        (p, 1), (p, 2), (e, 2), (s, 2), (p, 3), (p, 4), (e, 4), (s, 4), (p, 5), (s, 5),
    ]  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval/loss" in r) for r in lines] == [
        (1, False), (2, False), (2, True), (3, False), (4, False), (4, True), (5, False),
    ]  # fmt: skip
    samples = [json.loads(x) for x in (tmp_path / "samples" / "dp0.jsonl").read_text().splitlines()]
    assert samples[1] == {"step": 2, "epoch": 0, "ids": ["s2a", "s2b"]} and len(samples) == 5
    summary = json.loads((tmp_path / "profile" / "summary_rank0.json").read_text())
    assert summary["steps"] == [2, 3]


def test_log_every_final_checkpoint_and_resumed_at_the_end(tmp_path):
    run = _Run(_config(tmp_path / "a", steps=5, log_every=3, eval_every=0))
    run.train()
    assert run.events == [("progress", n) for n in (1, 2)] + [("save", 2)] + [
        ("progress", n) for n in (3, 4)
    ] + [("save", 4), ("progress", 5), ("save", 5)]  # no eval: eval_every 0
    lines = [json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [3, 5]  # every 3rd step and the last
    assert not (tmp_path / "a" / "profile").exists()  # no train.profile: no profiler hook

    resumed = _Run(_config(tmp_path / "b", steps=4, eval_every=2))
    resumed.train(resumed_at=4)
    assert resumed.events == []  # resumed at the end: no step, nothing new to save
