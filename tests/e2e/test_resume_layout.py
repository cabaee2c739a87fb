"""A run saved on 2 ranks mid-epoch resumes on 1 rank, on 4 (dp=4) and on dp=1 x sp=2; over the epoch, the
sample ids trained (logging.sample_ids) have no duplicate and no gap. The runs are `omni-train run`'s
(omni_train.local.run_local) with ranks forked from the test harness's forkserver; test_train's kill and
resume goes through the CLI itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omni_train.config import load_config
from omni_train.local import run_local
from tests.e2e.conftest import RECIPE, _single
from tests.harness import PRELOAD, run_ranks

SAMPLES = 60


def _data(root: Path) -> Path:
    path = root / "text.jsonl"
    with path.open("w") as f:
        for i in range(SAMPLES):
            a, b = i % 10, (3 * i) % 10
            doc = {
                "id": f"t{i:03d}",
                "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
                ],
            }
            f.write(json.dumps(doc) + "\n")
    return path


def _run(data: Path, jsonl: Path, run_dir: Path, nproc: int, steps: int, extra: list[str]) -> None:
    sets = [
        f"data.tokenizer={data / 'tokenizer'}",
        f"model.decoders.image_gen.path={data / 'vq'}",
        f"data.sources=[{{kind: jsonl, paths: '{jsonl}'}}]",
        "data.eval_sources=[]",
        "data.prepare=null",
        "data.max_tokens=128",
        "data.num_workers=1",
        "data.shuffle_buffer=8",
        f"train.steps={steps}",
        "checkpoint.interval=0",  # only the final one: the 2-step run's is where the others resume
        "checkpoint.async_save=false",
        f"logging.run_dir={run_dir}",
        "logging.console=none",
        "logging.tensorboard=false",
        "logging.sample_ids=true",
        *extra,
    ]
    cfg = load_config(RECIPE, sets)
    if nproc == 1:  # in a rank of its own, as the CLI would: not in the test process
        run_ranks(_single, 1, cfg.model_dump(mode="json"), init_process_group=False)
    else:
        run_local(cfg, nproc, preload=PRELOAD)


def _epoch0_ids(run_dir: Path) -> list[str]:
    ids = []
    for log in sorted((run_dir / "samples").glob("dp*.jsonl")):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record["epoch"] == 0:
                ids += record["ids"]
    return ids


def test_resume_on_other_layouts_trains_every_sample_of_the_epoch_once(quickstart_data, tmp_path):
    data, _ = quickstart_data
    jsonl = _data(tmp_path)
    saved = tmp_path / "saved"
    _run(data, jsonl, saved, 2, steps=2, extra=["parallel.dp_shard=2"])  # stops mid-epoch
    assert 0 < len(_epoch0_ids(saved)) < SAMPLES
    everything = sorted(f"t{i:03d}" for i in range(SAMPLES))
    layouts = {
        "dp1": (1, ["parallel.dp_shard=1"]),
        "dp4": (4, ["parallel.dp_shard=4"]),
        "dp1_sp2": (2, ["parallel.dp_shard=1", "parallel.sp=2"]),
    }
    for name, (nproc, extra) in layouts.items():
        run_dir = tmp_path / name
        shutil.copytree(saved, run_dir)
        _run(data, jsonl, run_dir, nproc, steps=14, extra=extra)  # well past the end of epoch 0
        assert sorted(_epoch0_ids(run_dir)) == everything, name
