"""A pretrained Qwen2-VL / Qwen2.5-VL / Qwen2.5-Omni thinker / Qwen3-VL (DeepStack; dense and MoE)
directory trains exactly as HF's own `...ForConditionalGeneration` computes it.

One packed micro-batch (images of different sizes, videos, an image + video sample, text only; audio of
different lengths for the Omni thinker) through our composite (family expansion, M-RoPE positions from
the data side, packed attention) vs HF's class run on each sample alone with the same labels: the loss
and the gradient of every trainable parameter agree (fp32), with the vision tower trained and frozen,
with untied and tied embeddings; each sample's positions are HF's; greedy generation is HF's. A MoE
foundation's load-balancing loss is HF's function over the packed micro-batch (the trainer's).
"""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from transformers import AutoTokenizer

from omni_models.config import ModelConfigError, OmniModelConfig
from omni_train.assembly import chat_processor
from tests.omni_models.hf_dirs import FAMILIES, janus_dir, qwen_vl_dir
from tests.omni_models.hf_families import (
    assert_grads_equal,
    build,
    draw_sample,
    hf_inputs,
    hf_loss,
    hf_positions,
    janus_reference_loss,
    pack,
    processed,
    referee,
    vl_sample,
)

RTOL = 1e-5
VL_DOCS = [
    vl_sample(0, ("image",), (16, 8)),
    vl_sample(1, ("image", "video"), (8, 24)),
    vl_sample(2, ()),
    vl_sample(3, ("video",)),
    vl_sample(4, ("image",), (24, 24)),
]
DOCS = {
    "qwen2_vl": VL_DOCS,
    "qwen2_5_vl": VL_DOCS,
    "qwen2_5_omni_thinker": [
        *VL_DOCS,
        vl_sample(5, ("audio",)),
        vl_sample(6, ("image", "audio", "audio")),
        vl_sample(7, ("audio", "video")),
    ],
}
DOCS["qwen2_5_omni"] = DOCS["qwen2_5_omni_thinker"]
DOCS["qwen3_vl"] = DOCS["qwen3_vl_moe"] = VL_DOCS
# use_audio_in_video: videos with their audio tracks interleaved (one across two 2 s chunks), beside
# images, standalone audio and text
AV_DOCS = [
    vl_sample(8, ("av",)),
    vl_sample(9, ("image", "av", "audio")),
    vl_sample(2, ()),
    vl_sample(5, ("audio",)),
]
# (family, tied embeddings, frozen parts, use_audio_in_video); the whole Qwen2.5-Omni once: it differs
# from its thinker only in the directory's layout (thinker.*) and its speech parts, which are left alone
CASES = [(f, tie, freeze, False) for f in FAMILIES for tie, freeze in [(False, ()), (True, ("vision",))]]
CASES += [("qwen2_5_omni", False, ("audio",), False), ("qwen2_5_omni_thinker", False, (), True)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {(f, tie): qwen_vl_dir(root, f, tie=tie) for f, tie, _, _ in CASES}


@pytest.mark.parametrize("family,tie,freeze,av", CASES)
def test_loss_and_every_gradient_equal_hf(dirs, family, tie, freeze, av):
    path = dirs[family, tie]
    options = {"use_audio_in_video": True} if av else {}
    spec = OmniModelConfig.from_dict({"pretrained": str(path), "freeze": list(freeze), **options})
    model, loaded = build(spec)
    params = dict(model.named_parameters())
    assert set(params) <= loaded, sorted(set(params) - loaded)  # every weight is the pretrained one
    docs = AV_DOCS if av else DOCS[family]
    samples = processed(chat_processor(model, spec, AutoTokenizer.from_pretrained(path)), docs)
    batch = pack(samples)
    assert batch.position_ids.shape == (3, 1, batch.length)
    assert {m.modality for s in samples for m in s.media} == set(model.modality_encoder)
    # placeholders that are not one run: Omni's interleaved audio, Qwen3-VL's frames between timestamps
    interleaved = av or (family.startswith("qwen3_vl") and "video" in batch.media)
    assert any(m.offsets is not None for s in samples for m in s.media) == interleaved
    n = batch.num_label_tokens
    out = model(batch)
    loss = out.loss_sum / n
    if out.aux_loss is not None:  # MoE: the micro-batch's load-balancing loss, as the trainer adds it
        loss = loss + out.aux_loss_coef * out.aux_loss
    loss.backward()

    hf = referee(family, path)
    start = 0
    for s in samples:  # each sample's positions are HF's, restarting at 0 in the pack
        end = start + s.input_ids.numel()
        want = hf_positions(hf, hf_inputs(s, family, av), family)
        torch.testing.assert_close(batch.position_ids[:, :, start:end], want, rtol=0, atol=0)
        start = end
    for part in freeze:
        getattr(hf.model, {"vision": "visual", "audio": "audio_tower"}[part]).requires_grad_(False)
    ref, aux = hf_loss(hf, family, samples, n, av)
    ref.backward()
    assert (aux is None) == (out.aux_loss is None)
    if aux is not None:
        torch.testing.assert_close(out.aux_loss, aux, rtol=RTOL, atol=0)
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=0)
    checked = assert_grads_equal(family, model, hf, RTOL)
    assert checked >= sum(p.requires_grad for p in hf.parameters()) - 1  # Omni: audio_bos_eos_token unused
    for name, encoder in model.encoders.items():
        assert (name in freeze) == all(not p.requires_grad for p in encoder.parameters())


def test_pretrained_config_errors(dirs):
    path = str(dirs["qwen2_vl", False])
    with pytest.raises(ModelConfigError, match=r"did you mean 'vision'"):
        OmniModelConfig.from_dict({"pretrained": path, "freeze": ["visoin"]})
    with pytest.raises(ModelConfigError, match="exclude each other"):
        OmniModelConfig.from_dict({"pretrained": path, "foundation": {"name": "qwen2"}})
    with pytest.raises(ModelConfigError, match=r"already come from model\.pretrained"):
        OmniModelConfig.from_dict({"pretrained": path, "encoders": {"vision": {"name": "siglip"}}})
    with pytest.raises(ModelConfigError, match=r"no config\.json"):
        OmniModelConfig.from_dict({"pretrained": path + "/missing"})
    with pytest.raises(ModelConfigError, match=r"unknown key model\.use_audio_in_video"):  # Omni's only
        OmniModelConfig.from_dict({"pretrained": path, "use_audio_in_video": True})
    omni = str(dirs["qwen2_5_omni", False])
    with pytest.raises(ModelConfigError, match=r"use_audio_in_video must be true or false, got 'yes'"):
        OmniModelConfig.from_dict({"pretrained": omni, "use_audio_in_video": "yes"})
    spec = OmniModelConfig.from_dict({"pretrained": path})
    assert spec.foundation.name == "qwen2_vl_text" and spec.encoders["vision"].projector == "identity"
    assert not spec.foundation.freeze and not spec.encoders["vision"].freeze


GENERATE = [(f, m) for f in FAMILIES for m in [("image",), ("video", "image")]]
GENERATE += [
    ("qwen2_5_omni_thinker", ("audio", "image")),
    ("qwen2_5_omni_thinker", ("av",)),
    ("janus", ("image",)),
]


@pytest.mark.parametrize("family,media", GENERATE)
def test_greedy_generation_equals_hf_generate(dirs, tmp_path, family, media):
    path = janus_dir(tmp_path) if family == "janus" else dirs[family, False]
    av = "av" in media  # a video with its audio track: use_audio_in_video on both sides
    spec = OmniModelConfig.from_dict(
        {"pretrained": str(path), **({"use_audio_in_video": True} if av else {})}
    )
    model, _ = build(spec)
    tok = AutoTokenizer.from_pretrained(path)
    proc = chat_processor(model, spec, tok)
    doc, files = vl_sample(7, media, (24, 16))
    doc = {**doc, "messages": doc["messages"][:1]}  # the user turn; the answer is generated
    (sample,) = processed(proc, [(doc, files)])
    ids = torch.cat([sample.input_ids, torch.tensor(tok("<|im_start|>assistant\n")["input_ids"])])
    positions = proc.positions(ids, sample.media) if proc.positions is not None else None  # Janus: 1-D
    batch = pack([sample])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ours = model.generate(ids, {}, batch.media, max_new_tokens=8, eos_id=eos, position_ids=positions)

    hf = referee(family, path)
    x = hf_inputs(dataclasses.replace(sample, input_ids=ids), family, av)  # the prompt, generation prompt too
    x.pop("labels")
    out = hf.generate(**x, do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=eos)
    assert ours.tokens == out[0, ids.numel() :].tolist()


def test_image_tensors_and_counts_equal_the_directorys_hf_image_processor(dirs):
    """The encoder's image processor (settings read from preprocessor_config.json) gives HF's own
    Qwen2-VL image processor's pixel values and grid, and the packer's token count, for sizes that need
    resizing up, down and not at all."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from omni_data.schema import MediaItem
    from tests.omni_models.omni_fixtures import png

    path = dirs["qwen2_vl", False]
    model, _ = build(OmniModelConfig.from_dict({"pretrained": str(path)}))
    ours = model.encoders["vision"].processor("image")
    hf = AutoImageProcessor.from_pretrained(path)
    for w, h in [(16, 8), (50, 37), (7, 5), (100, 20), (64, 64)]:
        data = png(w, h, seed=w * h)
        item = MediaItem("image", "x.png", data)
        got, want = ours.process(item), hf(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
        torch.testing.assert_close(got["grid_thw"], want["image_grid_thw"], rtol=0, atol=0)
        torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-5)
        merge = hf.merge_size**2
        assert ours.count(item).llm_tokens == hf.get_number_of_image_patches(h, w, {}) // merge


def test_the_whole_omni_exports_its_trained_thinker_and_its_speech_parts_unchanged(dirs, tmp_path):
    from transformers import Qwen2_5OmniForConditionalGeneration

    from omni_models.families.export import export_pretrained
    from tests.omni_models.hf_families import hf_name

    path = dirs["qwen2_5_omni", False]
    spec = OmniModelConfig.from_dict({"pretrained": str(path)})
    model, _ = build(spec)
    with torch.no_grad():  # stands for training
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_pretrained(model, spec.pretrained, tmp_path / "out", dtype="float32")
    source = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    exported = Qwen2_5OmniForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    thinker = dict(exported.thinker.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(thinker[hf_name("qwen2_5_omni", name)], p, rtol=0, atol=0)
    speech = [n for n, _ in exported.named_parameters() if n.startswith(("talker.", "token2wav."))]
    assert speech
    theirs = dict(source.named_parameters())
    for name, p in exported.named_parameters():
        if name.startswith(("talker.", "token2wav.")):
            torch.testing.assert_close(p, theirs[name], rtol=0, atol=0)
    again, _ = build(OmniModelConfig.from_dict({"pretrained": str(tmp_path / "out")}))
    for (name, a), b in zip(again.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


JANUS_DOCS = [
    vl_sample(0, ("image",), (16, 8)),
    draw_sample(1),
    vl_sample(2, ()),
    vl_sample(3, ("image", "image"), (24, 24)),
    draw_sample(2),
]


@pytest.mark.parametrize("tie,freeze", [(False, ()), (True, ("vision",))])
def test_janus_understanding_and_generation_equal_hf(tmp_path, tie, freeze):
    """Understanding samples vs HF's JanusForConditionalGeneration; generated images vs the training
    loss built from HF's own Janus modules (HF ships none for generation)."""
    from omni_dist.rank_slice import RankSlice

    path = janus_dir(tmp_path, tie=tie)
    spec = OmniModelConfig.from_dict({"pretrained": str(path), "freeze": list(freeze)})
    model, loaded = build(spec)
    assert {n for n, _ in model.named_parameters()} <= loaded
    samples = processed(chat_processor(model, spec, AutoTokenizer.from_pretrained(path)), JANUS_DOCS)
    batch = pack(samples)
    assert set(batch.media) == {"image"} and set(batch.targets) == {"image"}
    n = RankSlice.of(batch).loss_tokens
    loss = model(batch).loss_sum / n
    loss.backward()

    hf = referee("janus", path)
    hf.model.vqmodel.requires_grad_(False)  # the VQ-VAE only tokenizes targets: it never trains
    if "vision" in freeze:
        hf.model.vision_model.requires_grad_(False)
        hf.model.aligner.requires_grad_(False)
    ref = sum(
        janus_reference_loss(hf, s, n)
        if any(m.generate for m in s.media)
        else hf(**hf_inputs(s, "janus"), num_items_in_batch=n).loss
        for s in samples
    )
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=0)
    assert assert_grads_equal("janus", model, hf, RTOL) == sum(p.requires_grad for p in hf.parameters())


def test_janus_image_generation_with_guidance_equals_hf(tmp_path):
    """Greedy image tokens with classifier-free guidance == HF's generate(generation_mode="image"), whose
    unconditional prompt pads every token but BOS and the image start."""
    path = janus_dir(tmp_path)
    spec = OmniModelConfig.from_dict({"pretrained": str(path)})
    model, _ = build(spec)
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "draw 3"}], tokenize=False, add_generation_prompt=True
    )
    boi, placeholder, eoi = (tok.convert_tokens_to_ids(t) for t in spec.pretrained.family.markers["image"])
    ids = torch.tensor([*tok(text, add_special_tokens=False)["input_ids"], boi])
    bos, pad = model.foundation.config.bos_token_id, tok.pad_token_id
    uncond = torch.where((ids == bos) | (ids == boi), ids, torch.full_like(ids, pad))
    decoder = model.decoders["image_gen"]
    ours = model.generate(
        ids,
        {"image": (boi, placeholder, eoi)},
        max_new_tokens=decoder.tokens,
        cfg_scale=3.0,
        uncond_ids=uncond,
    )
    hf = referee("janus", path)
    config = copy.deepcopy(hf.generation_config)
    config.update(do_sample=False, guidance_scale=3.0, bos_token_id=bos, pad_token_id=pad)
    config.generation_kwargs = {"boi_token_id": boi}
    out = hf.generate(
        ids[None],
        attention_mask=torch.ones_like(ids[None]),
        generation_mode="image",
        generation_config=config,
    )
    assert ours.codes[0].tolist() == out[0].tolist()
