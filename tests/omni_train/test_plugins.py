"""A modality from outside the repository reaches the CLI (omni_train.plugins).

A separate package, written to a tmp dir (the sensor encoder and processor of
tests/omni_models/sensor_modality.py, and a `register` function), declares an `omniscale.plugins` entry
point. `uv pip install --target` installs it into a folder that only the commands of these tests see on
their PYTHONPATH: installed into the shared venv, every other omni-train process running meanwhile would
load it too. `--dry-run` and `plan` find it by its entry point; a two-rank `omni-train run` finds it by
the recipe's `plugins` key (the package's source on PYTHONPATH, not installed), in the driver and in each
spawned rank. The memory model reads only what the Encoder Protocol declares: the sensor encoder has no
HF config, so its activations are left out with a note, not an AttributeError.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from omni_data.processor import modality_tokens
from omni_models.memory import BlockShape
from omni_models.registry import ENCODERS, register_encoder
from omni_train.assembly import meta_model
from omni_train.config import ConfigError, load_config
from omni_train.memory import ModelFacts, estimate_memory, loss_head
from tests.omni_data.fixtures import train_tokenizer
from tests.omni_models.omni_fixtures import foundation_config
from tests.omni_models.sensor_modality import SensorEncoder

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = '''"""A sensor modality from outside OmniScale: `register` adds its encoder as `sensor_plugin`."""

from omni_models.registry import register_encoder
from omni_sensor.modality import SensorEncoder


def register() -> None:
    register_encoder("sensor_plugin", SensorEncoder)
'''
PYPROJECT = """[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "omni-sensor"
version = "0.1.0"

[project.entry-points."omniscale.plugins"]
sensor = "omni_sensor:register"
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> dict[str, Path]:
    """The package's source folder, the folder it is installed into, and a recipe using its encoder."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "pkg" / "src" / "omni_sensor"
    src.mkdir(parents=True)
    (root / "pkg" / "pyproject.toml").write_text(PYPROJECT)
    (src / "__init__.py").write_text(PLUGIN)
    shutil.copy(ROOT / "tests/omni_models/sensor_modality.py", src / "modality.py")
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH: it installs the plugin package")
    install = [uv, "pip", "install", "--python", sys.executable, "--offline", "--no-build-isolation"]
    install += ["--no-deps", "--target", str(root / "site"), str(root / "pkg")]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "site" / "omni_sensor-0.1.0.dist-info" / "entry_points.txt").exists()

    tok = train_tokenizer(("<|pad|>", "<|im_start|>", "<|im_end|>", *modality_tokens("sensor")))
    tok.save_pretrained(root / "tokenizer")
    with open(root / "data.jsonl", "w") as f:
        for i in range(24):
            readings = np.sin(np.arange(8 * (2 + i % 3)) * 0.3 + i).astype(np.float32).tobytes()
            doc = {
                "id": f"s{i:02d}",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "the signal "}, SENSOR]},
                    {"role": "assistant", "content": "rising" if i % 2 else "falling"},
                ],
                "files": {"s.f32": base64.b64encode(readings).decode()},
            }
            f.write(json.dumps(doc) + "\n")
    recipe = {
        "model": {
            "foundation": {"name": "qwen2", "config": foundation_config()},
            "encoders": {
                "sensor": {
                    "name": "sensor_plugin",
                    "modalities": ["sensor"],
                    "config": {"width": 12},
                    "freeze": False,
                }
            },
        },
        "data": {
            "tokenizer": str(root / "tokenizer"),
            "sources": [{"kind": "jsonl", "paths": str(root / "data.jsonl")}],
            "max_tokens": 64,
        },
        "train": {"steps": 3, "lr": 3e-3},
        "checkpoint": {"async_save": False, "save_final": False},
        "launcher": {"num_workers": 2},
        "logging": {"run_dir": str(root / "run"), "console": "none", "tensorboard": False},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "keyed.yaml").write_text(yaml.safe_dump({"plugins": ["omni_sensor:register"], **recipe}))
    return {"site": root / "site", "source": root / "pkg" / "src", "root": root}


def _cli(args: list[str], pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


SENSOR = {"type": "sensor", "media": "s.f32"}
NOTE = "note: encoders.sensor: activations not estimated (SensorEncoder has no block_shape()"


def test_an_installed_plugin_reaches_dry_run_and_plan(plugin):
    dry = _cli(["run", str(plugin["root"] / "recipe.yaml"), "--dry-run"], plugin["site"])
    assert "encoders.sensor: " in dry.stdout and "(trainable)" in dry.stdout
    assert NOTE in dry.stdout and "peak: " in dry.stdout
    planned = _cli(
        ["plan", str(plugin["root"] / "recipe.yaml"), "--gpus", "8", "--doc-sample", "8"], plugin["site"]
    )
    assert NOTE in planned.stdout and "--set " in planned.stdout, planned.stdout


def test_a_recipe_plugin_trains_on_two_ranks(plugin):
    _cli(["run", str(plugin["root"] / "keyed.yaml"), "--nproc", "2"], plugin["source"])
    records = [
        json.loads(line) for line in (plugin["root"] / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in steps)


@pytest.mark.parametrize(
    "plugins,message",
    [
        (["no_such_module_x"], "plugins[0]: cannot import 'no_such_module_x': ModuleNotFoundError"),
        (["json", "json:no_such_function"], "plugins[1]: cannot import 'json:no_such_function': Attribute"),
        (["json:dumps"], "plugins[0]: 'json:dumps' failed: TypeError"),
        ("json", "plugins: a list of modules"),
    ],
)
def test_a_plugin_that_does_not_load_is_a_config_error_naming_the_key(plugins, message):
    with pytest.raises(ConfigError) as err:
        load_config(data={"plugins": plugins, "model": {}, "data": {}})
    assert str(err.value).startswith(message), str(err.value)


class SensorWithBlocks(SensorEncoder):
    """The sensor encoder with the optional `block_shape()`: its MLP counted as one block."""

    def block_shape(self) -> tuple[int, BlockShape]:
        return 1, BlockShape(hidden=self.output_size, q_dim=0, kv_dim=0, intermediate=0, gated=False)


@pytest.mark.parametrize("cls", [SensorEncoder, SensorWithBlocks])
def test_the_memory_model_reads_only_what_the_encoder_protocol_declares(cls):
    name = f"facts_test_{uuid.uuid4().hex[:8]}"
    register_encoder(name, cls)
    try:
        recipe = {
            "model": {
                "foundation": {"name": "qwen2", "config": foundation_config()},
                "encoders": {
                    "sensor": {"name": name, "modalities": ["sensor"], "config": {}, "freeze": False}
                },
            },
            "data": {
                "tokenizer": "unused",
                "sources": [{"kind": "jsonl", "paths": "unused"}],
                "max_tokens": 64,
            },
        }
        cfg = load_config(data=recipe)
        facts = ModelFacts.of(meta_model(cfg.model_spec), cfg.model_spec)
    finally:
        ENCODERS.pop(name)
    estimate = estimate_memory(cfg, 1, facts, head=loss_head(cfg, liger=False))
    if cls is SensorEncoder:
        assert [f"note: {n}" for n in facts.notes] == [
            NOTE + " and no HF config with a width and depth; omni_models.modality.Encoder)"
        ]
        assert estimate.lines()[-1] == f"note: {facts.notes[0]}"
        assert "activations: encoders.sensor" not in estimate.forward_end
    else:
        assert facts.notes == () and facts.encoders["sensor"][0] == 1
        assert estimate.forward_end["activations: encoders.sensor"] > 0
