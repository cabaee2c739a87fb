"""The quickstart dataset, built once per test session through the real preprocessing job."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from omni_train.config import load_config
from omni_train.local import run_local
from tests.harness import PRELOAD, run_ranks
from tests.omni_dist.tiny import RTOL

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "apps/quickstart/recipe.yaml"


def load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "apps/quickstart/make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    summary = load_make_data().build(str(out), str(RECIPE), num_cpus=2)
    return out, summary


STEPS = 12


def overrides(data: Path, run_dir: Path, extra: list[str] = ()) -> list[str]:
    return [
        f"data.tokenizer={data / 'tokenizer'}",
        f"model.decoders.image_gen.path={data / 'vq'}",
        f"data.sources=[{{kind: webdataset, paths: '{data}/shards/shard-{{000000..000008}}.tar'}}]",
        f"data.eval_sources=[{{kind: webdataset, paths: '{data}/shards/shard-000009.tar'}}]",
        "data.streams=2",
        "data.max_tokens=512",  # small micro-batches: parity at 1e-5 over a few steps, quick runs
        f"train.steps={STEPS}",
        "train.lr=3e-3",  # the recipe's lr is for 900 steps: in 12 it barely moves the loss
        "train.eval_every=6",
        "train.eval_steps=2",  # an eval of the whole shard outlasts the 12 steps; the fsdp run of `runs` keeps it
        "checkpoint.interval=2",
        "checkpoint.async_save=false",
        f"logging.run_dir={run_dir}",
        "logging.console=none",
        "logging.sample_ids=true",
        *extra,
    ]


def read_metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record  # a resumed run's records replace the killed run's
    return out


def close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * abs(b)


@pytest.fixture(scope="session")
def runs(quickstart_data, tmp_path_factory):
    data, _ = quickstart_data
    root = tmp_path_factory.mktemp("runs")
    whole_eval = "train.eval_steps=0"  # test_train checks the eval losses of the whole shard, by part
    layouts = {
        "single": (1, []),
        "fsdp": (2, ["parallel.dp_shard=2", whole_eval]),
        "sp": (2, ["parallel.sp=2"]),
    }
    out = {}
    for name, (n, extra) in layouts.items():
        cfg = load_config(RECIPE, overrides(data, root / name, extra))
        results = (
            run_local(cfg, n, preload=PRELOAD)
            if n > 1
            else run_ranks(_single, 1, cfg.model_dump(mode="json"), init_process_group=False)
        )
        out[name] = (root / name, results)
    return data, root, out


def _single(config: dict):
    from omni_train.local import _rank_entry

    return _rank_entry(config)
