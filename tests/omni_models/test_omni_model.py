"""The composite omni model in one process: training, missing modalities, frozen parts, config, weights."""

from __future__ import annotations

import pytest
import torch

from omni_dist.weights import materialize_
from omni_models.config import ModelConfigError, OmniModelConfig, build_omni_model
from omni_models.omni import RunSettings
from omni_models.omni_weights import export_parts, init_omni_weights_, load_part_weights_
from omni_models.parallel import omni_plan
from tests.omni_models.omni_fixtures import (
    chat_processor,
    draw_sample,
    micro_batch,
    omni_config,
    omni_spec,
    sample,
)

MIXES = [("image", "audio"), ("video",), (), ("image",), ("audio", "video"), ("image", "video", "audio")]


def _model(cfg: OmniModelConfig, seed: int = 0, settings: RunSettings | None = None):
    with torch.device("meta"):
        model = build_omni_model(cfg, settings)
    materialize_(model, "cpu")
    init_omni_weights_(model, seed)
    return model


def _batches(model, n_batches: int = 3):
    proc = chat_processor(model)
    samples = [sample(i, MIXES[i % len(MIXES)]) for i in range(2 * n_batches)]
    return [micro_batch(proc, samples[2 * k : 2 * k + 2]) for k in range(n_batches)]


def test_omni_model_trains_and_the_loss_falls():
    torch.manual_seed(0)
    model = _model(omni_config())
    batches = _batches(model)
    assert {m for b in batches for m in b.media} == {"image", "video", "audio"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    tokens = sum(b.num_label_tokens for b in batches)
    losses = []
    for _ in range(30):
        total = 0.0
        for b in batches:
            loss = model(b).loss_sum / tokens
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    assert losses[-1] < 0.5 * losses[0], losses


def test_missing_modality_gives_exactly_zero_encoder_gradients():
    model = _model(omni_config())
    proc = chat_processor(model)
    batch = micro_batch(proc, [sample(0, ("image",)), sample(1, ())])
    assert "audio" not in batch.media and "video" not in batch.media
    model(batch).loss_sum.backward()
    audio = list(model.encoders["audio"].parameters()) + list(model.projectors["audio"].parameters())
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in audio)
    vision = [p.grad for p in model.encoders["vision"].parameters()]
    assert all(g is not None for g in vision) and any(torch.count_nonzero(g) > 0 for g in vision)


def test_frozen_parts_get_no_gradient_and_no_optimizer_state():
    model = _model(omni_config(freeze_encoders=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    for b in _batches(model, 2):
        model(b).loss_sum.backward()
    opt.step()
    frozen = list(model.encoders.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(p not in opt.state for p in frozen)
    assert all(p in opt.state for p in model.projectors.parameters())
    assert all(p in opt.state for p in model.foundation.parameters())


def test_a_decoder_loss_weight_scales_its_part_of_the_loss_only():
    """loss_sum = text + w * image codes; parts are reported unweighted; the decoder head's gradient
    (it reads the image-code loss alone) scales by w."""

    def run(weight):
        spec = omni_spec(decoder=True)
        spec["decoders"]["image_gen"]["loss_weight"] = weight
        model = _model(OmniModelConfig.from_dict(spec), seed=3)
        out = model(micro_batch(chat_processor(model), [draw_sample(0), sample(1, ("image",))]))
        out.loss_sum.backward()
        head = [p for n, p in model.decoders["image_gen"].named_parameters() if n.startswith("head.")]
        return out, torch.cat([p.grad.flatten() for p in head])

    (one, g1), (quarter, g4) = run(1.0), run(0.25)
    assert one.parts["image_gen"][1] > 0 and one.parts["text"][1] > 0
    for name in ("text", "image_gen"):
        assert quarter.parts[name][0].item() == pytest.approx(one.parts[name][0].item(), rel=1e-6)
    text, codes = one.parts["text"][0].item(), one.parts["image_gen"][0].item()
    assert quarter.loss_sum.item() == pytest.approx(text + 0.25 * codes, rel=1e-6)
    assert torch.allclose(g4, 0.25 * g1, rtol=1e-5, atol=1e-9)
    for bad in (0, -1.0, "x", float("nan")):
        spec = omni_spec(decoder=True)
        spec["decoders"]["image_gen"]["loss_weight"] = bad
        with pytest.raises(ModelConfigError, match="loss_weight must be a positive number"):
            OmniModelConfig.from_dict(spec)


def test_the_chunked_loss_head_equals_all_logits():
    """loss_chunk > 0 (the text head on the labelled positions' last hidden states, the decoder head
    through lm_loss, a few positions of logits at a time) == all logits at once: loss, parts and every
    parameter's gradient."""
    proc = chat_processor(_model(omni_config(decoder=True)))
    batch = micro_batch(proc, [draw_sample(0), sample(1, ("image", "audio")), draw_sample(3), sample(2, ())])

    def run(chunk):  # the same weights (seed 5) in every model
        model = _model(omni_config(decoder=True), seed=5, settings=RunSettings(loss_chunk=chunk))
        out = model(batch)
        out.loss_sum.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (full, want), (chunked, got) = run(0), run(3)
    assert full.parts["text"][1] > 3 and full.parts["image_gen"][1] > 3  # both heads run several chunks
    assert chunked.loss_sum.item() == pytest.approx(full.loss_sum.item(), rel=1e-6)
    for name, (value, n) in full.parts.items():
        assert chunked.parts[name][1] == n and chunked.parts[name][0].item() == pytest.approx(
            value.item(), rel=1e-6
        )
    assert got.keys() == want.keys() and len(want) > 20
    for name, g in want.items():  # fp32: only the order of the sums differs
        assert (got[name] - g).abs().max() <= 1e-5 * g.abs().max(), name


def test_config_is_validated():
    good = {"foundation": {"name": "qwen2"}, "encoders": {"v": {"name": "siglip", "modalities": ["image"]}}}
    OmniModelConfig.from_dict(good)
    with pytest.raises(ModelConfigError, match="did you mean 'encoders'"):
        OmniModelConfig.from_dict({**good, "encoder": {}})
    with pytest.raises(ModelConfigError, match="did you mean 'freeze'"):
        OmniModelConfig.from_dict(
            {**good, "encoders": {"v": {"name": "siglip", "modalities": ["image"], "frozen": 1}}}
        )
    with pytest.raises(ModelConfigError, match=r"unknown encoder 'clip'.*under the recipe's `plugins` key"):
        OmniModelConfig.from_dict({**good, "encoders": {"v": {"name": "clip", "modalities": ["image"]}}})
    with pytest.raises(ModelConfigError, match="unknown foundation 'gpt9'"):
        OmniModelConfig.from_dict({"foundation": {"name": "gpt9"}})
    two = {
        "a": {"name": "qwen2_vl_vision", "modalities": ["image"], "config": {"depth": 1}},
        "b": {"name": "siglip", "modalities": ["image"], "config": {"num_hidden_layers": 1}},
    }
    with torch.device("meta"), pytest.raises(ValueError, match="'image' is read by both 'a' and 'b'"):
        build_omni_model(
            OmniModelConfig.from_dict(
                {"foundation": {"name": "qwen2", "config": {"num_hidden_layers": 1}}, "encoders": two}
            )
        )


def test_plan_scopes_each_part():
    with torch.device("meta"):
        model = build_omni_model(omni_config())
    plan = omni_plan(model, omni_config())
    assert (
        "encoders.vision.tower.blocks.1" in plan.fsdp_units
        and "encoders.audio.tower.layers.0" in plan.fsdp_units
    )
    assert "foundation.model.layers.1" in plan.fsdp_units and "encoders.vision" in plan.fsdp_units
    assert "projectors.audio" in plan.fsdp_units and "foundation" in plan.fsdp_units
    assert "foundation.model.embed_tokens" in plan.fsdp_units


def test_parts_export_and_load_back(tmp_path):
    model = _model(omni_config(), seed=1)
    export_parts(model, tmp_path, dtype="float32")
    cfg = omni_config()
    paths = OmniModelConfig.from_dict(
        {
            "foundation": {
                "name": "qwen2",
                "config": dict(cfg.foundation.config),
                "path": str(tmp_path / "foundation"),
            },
            "encoders": {
                n: {
                    "name": e.name,
                    "modalities": list(e.modalities),
                    "config": dict(e.config),
                    "options": dict(e.options),
                    "path": str(tmp_path / "encoders" / n),
                }
                for n, e in cfg.encoders.items()
            },
        }
    )
    fresh = _model(paths, seed=2)
    loaded = load_part_weights_(fresh, paths)
    assert "foundation.model.embed_tokens.weight" in loaded and "encoders.audio.tower.conv1.weight" in loaded
    ref = model.state_dict()
    # Projectors have no path: they keep their own (different-seed) init, but for their LayerNorms, which
    # start at ones and zeros whatever the seed; every other part is loaded.
    norms = {
        f"projectors.{n}.{k}"
        for n, m in fresh.projectors.named_modules()
        if isinstance(m, torch.nn.LayerNorm)
        for k in ("weight", "bias")
    }
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, ref[name]) != (name.startswith("projectors") and name not in norms), name
    fresh.projectors.load_state_dict(model.projectors.state_dict())
    batch = _batches(model, 1)[0]
    assert torch.equal(fresh(batch).loss_sum, model(batch).loss_sum)
    assert {p.name for p in (tmp_path / "encoders" / "vision").iterdir()} >= {
        "config.json",
        "model.safetensors.index.json",
    }


def test_flops_cover_every_part():
    model = _model(omni_config())
    batch = _batches(model, 1)[0]
    flops = model.flops(batch)
    assert set(flops) == {"foundation", "vision", "audio"} and all(v > 0 for v in flops.values())


def test_vision_part_loads_from_a_full_model_checkpoint_by_prefix(tmp_path):
    from safetensors.torch import save_file

    source = _model(omni_config(), seed=3)
    tower = {
        f"model.visual.{k}": v.contiguous() for k, v in source.encoders["vision"].tower.state_dict().items()
    }
    save_file(
        {**tower, "model.language_model.other.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors")
    )
    cfg = omni_config()
    vision = cfg.encoders["vision"]
    with_path = OmniModelConfig(
        cfg.foundation,
        {
            **cfg.encoders,
            "vision": type(vision)(
                **{
                    **vision.__dict__,
                    "path": str(tmp_path),
                    "options": {**vision.options, "checkpoint_prefix": "model.visual."},
                }
            ),
        },
    )
    model = _model(with_path, seed=4)
    loaded = load_part_weights_(model, with_path)
    assert loaded and all(n.startswith("encoders.vision.tower.") for n in loaded)
    for k, v in source.encoders["vision"].tower.state_dict().items():
        assert torch.equal(model.encoders["vision"].tower.state_dict()[k], v), k
