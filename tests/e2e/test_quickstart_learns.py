"""The quickstart learns what its data teach: the README's recipe, trained as it is (one local process, no
Ray), then asked about held-out digits it never saw (apps/quickstart/evaluate.py, greedy answers) and to
draw every digit. Seeded; the bounds sit well above chance and below the lowest of the runs measured with
this recipe (image 0.86-0.98, video positions 0.53-0.94, audio digits 0.98-1.00, arithmetic 0.73-1.00;
drawings read as the digit asked for, taught from each digit's typical scans: greedy 1.0, sampled 0.97)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from omni_train.config import load_config
from omni_train.local import run_local
from tests.e2e.conftest import RECIPE, ROOT

# (task, lowest held-out accuracy, chance)
BOUNDS = [("image_qa", 0.7, 0.1), ("video_qa", 0.3, 0.1), ("audio_qa", 0.8, 0.1), ("text_qa", 0.6, 0.3)]
DRAW_BOUNDS = {"greedy": 0.7, "sampled": 0.5}  # of 10 drawings each, chance 0.1


def _module(name: str):
    sys.path.insert(0, str(ROOT / "apps/quickstart"))
    spec = importlib.util.spec_from_file_location(name, ROOT / f"apps/quickstart/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_image_tokenizer_reconstructs_held_out_digits(quickstart_data):
    """make_data.py's VQ-VAE: held-out scans, encoded and decoded, are still read as their digit."""
    from transformers.models.janus.modeling_janus import JanusVQVAE

    data, _ = quickstart_data
    digits, vq_tokenizer = _module("digits"), _module("vq_tokenizer")
    vq = JanusVQVAE.from_pretrained(data / "vq").eval()
    scans, labels = digits.scans("heldout")
    with torch.no_grad():
        codes = vq.encode(vq_tokenizer._images(scans, vq_tokenizer.image_size(vq.config))).image_tokens.view(
            len(scans), -1
        )
        pixels = ((vq.decode(codes) + 1) / 2).clamp(0, 1).numpy()
    read = digits.DigitClassifier().predict(np.stack([digits.to_scan(p) for p in pixels]))
    assert (read == labels).mean() >= 0.9
    assert codes.unique().numel() > vq.config.num_embeddings // 2  # the codebook is used, not collapsed


@pytest.mark.slow
def test_the_quickstart_recipe_learns_every_modality(quickstart_data, tmp_path):
    data, _ = quickstart_data
    overrides = [
        f"data.tokenizer={data / 'tokenizer'}",
        f"data.sources=[{{kind: webdataset, paths: '{data}/shards/shard-{{000000..000008}}.tar'}}]",
        f"data.eval_sources=[{{kind: webdataset, paths: '{data}/shards/shard-000009.tar'}}]",
        f"model.decoders.image_gen.path={data / 'vq'}",
        f"logging.run_dir={tmp_path / 'run'}",
        "logging.console=none",
    ]
    cfg = load_config(RECIPE, overrides)
    run_local(cfg, 1)
    results = _module("evaluate").evaluate(tmp_path / "run", data, sampled=1, echo=lambda _: None)
    for task, low, chance in BOUNDS:
        assert results[task]["chance"] <= chance, task
        assert results[task]["accuracy"] >= low, (task, results[task])
    draw = results["draw"]  # 10 greedy and 10 sampled drawings, read by the digit classifier
    for mode, low in DRAW_BOUNDS.items():
        assert draw[mode]["of"] == 10 and draw[mode]["accuracy"] >= low, (mode, draw)
    assert (tmp_path / "run/draw_grid.png").is_file()
