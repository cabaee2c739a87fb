"""Loading a pretrained directory is exact or fails with one error naming the keys: a tensor the model
needs and the directory lacks, a tensor no part reads, a shape or an int/float mismatch."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_dist.hf_load import CheckpointMismatchError
from omni_models.config import OmniModelConfig
from tests.omni_models.hf_dirs import qwen_vl_dir, released_expert_layout
from tests.omni_models.hf_families import build, hf_name, referee


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return qwen_vl_dir(tmp_path_factory.mktemp("loading"))


def _tampered(source, tmp_path, edit) -> str:
    out = tmp_path / "tampered"
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            r"not in .*model\.layers\.1\.mlp\.up_proj\.weight",
        ),
        (
            lambda t: t.update({"visual.extra.weight": torch.zeros(2)}),
            r"belong to no part.*visual\.extra\.weight",
        ),
        (
            lambda t: t.update({"visual.merger.mlp.0.bias": torch.zeros(3)}),
            r"visual\.merger\.mlp\.0\.bias: the model needs shape \(64,\), the checkpoint has \(3,\)",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.zeros(32, dtype=torch.int32)}),
            r"model\.norm\.weight: the model needs a torch\.float32 tensor, the checkpoint has torch\.int32",
        ),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_a_mismatching_directory_is_one_error_naming_the_key(source, tmp_path, edit, message):
    path = _tampered(source, tmp_path, edit)
    with pytest.raises(CheckpointMismatchError, match=message):
        build(OmniModelConfig.from_dict({"pretrained": path}))


def test_an_untouched_directory_fills_every_tensor(source):
    model, loaded = build(OmniModelConfig.from_dict({"pretrained": str(source)}))
    assert {n for n, _ in model.named_parameters()} <= loaded


def test_fused_experts_stored_transposed_load_as_transformers_loads_them(tmp_path):
    """Qwen3-VL-MoE's released checkpoints hold (E, H, 2I) / (E, I, H) experts: every weight ours reads
    from such a directory is the one HF's from_pretrained reads (it transposes them by their shapes), and
    so is every weight of our export (written as in memory, as save_pretrained writes them)."""
    from omni_models.families.export import export_pretrained

    path = released_expert_layout(qwen_vl_dir(tmp_path, "qwen3_vl_moe"))
    spec = OmniModelConfig.from_dict({"pretrained": str(path)})
    model, loaded = build(spec)
    params = dict(model.named_parameters())
    assert set(params) <= loaded
    export_pretrained(model, spec.pretrained, tmp_path / "out", dtype="float32")
    for directory in (path, tmp_path / "out"):
        theirs = dict(referee("qwen3_vl_moe", directory).named_parameters())
        assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in theirs
        for name, p in params.items():
            torch.testing.assert_close(p, theirs[hf_name("qwen3_vl_moe", name)], rtol=0, atol=0, msg=name)
