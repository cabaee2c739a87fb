"""A pretrained Qwen3-Omni directory (the thinker alone, or the whole model with its talker and code2wav)
trains exactly as HF's own Qwen3OmniMoeThinkerForConditionalGeneration computes it.

One packed micro-batch (images of non-square sizes, a video, text only, audio items of different lengths;
with use_audio_in_video, videos with their audio tracks interleaved) through our composite (family
expansion, the thinker's M-RoPE positions from the data side, DeepStack, packed attention) vs HF's class
run on each sample alone with the same labels: the loss (the MoE's load-balancing loss as HF's function
computes it over the packed micro-batch, the trainer's) and every trainable parameter's gradient agree
(fp32); each sample's positions are HF's get_rope_index; greedy generation with media is HF's; the whole
model exports its trained thinker beside its speech parts, unchanged.

HF's thinker takes Qwen2.5-Omni's keyword arguments, so the referee helpers run with that family's name.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from functools import partial

import pytest
import torch
from transformers import AutoTokenizer

from omni_models.config import OmniModelConfig
from omni_train.assembly import chat_processor
from tests.omni_data.fixtures import WORDS
from tests.omni_models.hf_families import (
    assert_grads_equal,
    build,
    hf_inputs,
    hf_loss,
    hf_name,
    hf_positions,
    pack,
    processed,
)
from tests.omni_models.omni_fixtures import mp4, png, wav
from tests.omni_models.qwen3_omni_dirs import NAMED, TEXT, qwen3_omni_dir

RTOL = 1e-5
AS = "qwen2_5_omni_thinker"  # the helpers' name for an Omni thinker's inputs, positions and parameter names
inputs = partial(hf_inputs, family=AS)


def omni_sample(i: int, media: list[tuple]) -> tuple[dict, dict]:
    """A user turn with `media` and text, and an answer: ("image", (w, h)); ("video",): 2 s, 2 temporal
    patches; ("av",): a 3 s video with its audio track; ("audio", seconds)."""
    rng = random.Random(i)
    content, files = [{"type": "text", "text": f"look {i} "}], {}
    for k, (kind, *arg) in enumerate(media):
        seed = i * 10 + k
        if kind == "image":
            name, data = f"{k}.png", png(*arg[0], seed=seed)
        elif kind == "video":
            name, data = f"{k}.mp4", mp4(8, seed=seed)
        elif kind == "av":
            kind, name, data = "video", f"{k}.mp4", mp4(12, seed=seed, audio_rate=16000)
        else:
            name, data = f"{k}.wav", wav(arg[0], seed)
        files[name] = data
        content += [{"type": kind, "media": name}, {"type": "text", "text": " and"}]
    answer = " ".join(rng.choice(WORDS) for _ in range(5))
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {"id": f"s{i}", "messages": messages}, files


# Every sample with audio has an item of at least 1 s (a whole 100-frame chunk): HF then pads every chunk
# to a whole one, as our encoder always does (see encoders/qwen3_omni_audio.py)
DOCS = [
    omni_sample(0, [("image", (64, 32))]),
    omni_sample(1, [("image", (48, 96)), ("video",)]),
    omni_sample(2, []),
    omni_sample(3, [("audio", 1.3), ("audio", 2.6)]),
    omni_sample(4, [("audio", 0.4), ("image", (96, 64)), ("audio", 1.1)]),
]
AV_DOCS = [
    omni_sample(5, [("av",)]),
    omni_sample(6, [("image", (64, 32)), ("av",), ("audio", 1.2)]),
    omni_sample(2, []),
]
# (whole model, tied embeddings, frozen parts, use_audio_in_video)
CASES = [(False, False, (), False), (False, True, ("vision",), True), (True, False, ("audio",), False)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_omni")
    return {(whole, tie): qwen3_omni_dir(root, whole=whole, tie=tie) for whole, tie, _, _ in CASES}


def referee(path, whole: bool):
    """HF's thinker from `path` (the whole model's: its thinker), fp32, sdpa."""
    import transformers

    cls = (
        transformers.Qwen3OmniMoeForConditionalGeneration
        if whole
        else transformers.Qwen3OmniMoeThinkerForConditionalGeneration
    )
    hf = cls.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    return hf.thinker if whole else hf


@pytest.mark.parametrize("whole,tie,freeze,av", CASES)
def test_loss_and_every_gradient_equal_hf(dirs, whole, tie, freeze, av):
    path = dirs[whole, tie]
    options = {"use_audio_in_video": True} if av else {}
    spec = OmniModelConfig.from_dict({"pretrained": str(path), "freeze": list(freeze), **options})
    assert spec.pretrained.family.name == ("qwen3_omni_moe" if whole else "qwen3_omni_moe_thinker")
    model, loaded = build(spec)
    params = dict(model.named_parameters())
    assert set(params) <= loaded, sorted(set(params) - loaded)  # every weight is the pretrained one
    samples = processed(
        chat_processor(model, spec, AutoTokenizer.from_pretrained(path)), AV_DOCS if av else DOCS
    )
    batch = pack(samples)
    assert batch.position_ids.shape == (3, 1, batch.length)
    assert set(batch.media) == {"image", "video", "audio"}
    assert any(m.offsets is not None for s in samples for m in s.media) == av  # audio interleaved in video
    n = batch.num_label_tokens
    out = model(batch)
    loss = out.loss_sum / n + out.aux_loss_coef * out.aux_loss  # as the trainer adds the MoE's aux loss
    loss.backward()

    hf = referee(path, whole)
    start = 0
    for s in samples:  # each sample's positions are HF's, restarting at 0 in the pack
        end = start + s.input_ids.numel()
        want = hf_positions(hf, inputs(s, audio_in_video=av), AS)
        torch.testing.assert_close(batch.position_ids[:, :, start:end], want, rtol=0, atol=0)
        start = end
    for part in freeze:
        getattr(hf.model, {"vision": "visual", "audio": "audio_tower"}[part]).requires_grad_(False)
    ref, aux = hf_loss(hf, AS, samples, n, av)
    ref.backward()
    torch.testing.assert_close(out.aux_loss, aux, rtol=RTOL, atol=0)
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=0)
    checked = assert_grads_equal(AS, model, hf, RTOL)
    assert checked == sum(p.requires_grad for p in hf.parameters())
    for name, encoder in model.encoders.items():
        assert (name in freeze) == all(not p.requires_grad for p in encoder.parameters())


def test_markers_are_the_processors_named_tokens(dirs):
    """The family's markers are the tokens the directory's Qwen3OmniMoeProcessor lays media out with."""
    from transformers import AutoProcessor

    path = dirs[False, False]
    proc = AutoProcessor.from_pretrained(path)
    spec = OmniModelConfig.from_dict({"pretrained": str(path)})
    vision, audio = (
        (proc.vision_bos_token, proc.vision_eos_token),
        (proc.audio_bos_token, proc.audio_eos_token),
    )
    assert dict(spec.pretrained.family.markers) == {
        "image": (vision[0], proc.image_token, vision[1]),
        "video": (vision[0], proc.video_token, vision[1]),
        "audio": (audio[0], proc.audio_token, audio[1]),
    }
    assert {k: getattr(proc, k) for k in NAMED} == NAMED


@pytest.mark.parametrize("media", [[("audio", 1.2), ("image", (64, 32))], [("av",)]])
def test_greedy_generation_equals_hf_generate(dirs, media):
    path = dirs[False, False]
    av = media == [("av",)]  # a video with its audio track: use_audio_in_video on both sides
    spec = OmniModelConfig.from_dict(
        {"pretrained": str(path), **({"use_audio_in_video": True} if av else {})}
    )
    model, _ = build(spec)
    tok = AutoTokenizer.from_pretrained(path)
    proc = chat_processor(model, spec, tok)
    doc, files = omni_sample(7, media)
    doc = {**doc, "messages": doc["messages"][:1]}  # the user turn; the answer is generated
    (sample,) = processed(proc, [(doc, files)])
    ids = torch.cat([sample.input_ids, torch.tensor(tok("<|im_start|>assistant\n")["input_ids"])])
    positions = proc.positions(ids, sample.media)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ours = model.generate(ids, {}, pack([sample]).media, max_new_tokens=8, eos_id=eos, position_ids=positions)

    hf = referee(path, whole=False)
    x = inputs(dataclasses.replace(sample, input_ids=ids), audio_in_video=av)  # the generation prompt too
    x.pop("labels")
    out = hf.generate(**x, do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=eos)
    assert ours.tokens == out[0, ids.numel() :].tolist()


def test_the_whole_model_exports_its_trained_thinker_and_its_speech_parts_unchanged(dirs, tmp_path):
    """Experts go back one tensor per expert (as save_pretrained writes them); HF's class loads the export."""
    from safetensors import safe_open
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from omni_models.families.export import export_pretrained

    path = dirs[True, False]
    spec = OmniModelConfig.from_dict({"pretrained": str(path)})
    model, _ = build(spec)
    with torch.no_grad():  # stands for training
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path / "out"
    export_pretrained(model, spec.pretrained, out, dtype="float32")
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as reader:
            keys |= set(reader.keys())
    assert "thinker.model.layers.0.mlp.experts.3.gate_proj.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)
    source = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    exported = Qwen3OmniMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    thinker = dict(exported.thinker.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(thinker[hf_name(AS, name)], p, rtol=0, atol=0)
    theirs = dict(source.named_parameters())
    speech = [n for n in theirs if n.startswith(("talker.", "code2wav."))]
    assert speech
    for name, p in exported.named_parameters():
        if name.startswith(("talker.", "code2wav.")):
            torch.testing.assert_close(p, theirs[name], rtol=0, atol=0, msg=name)
    again, _ = build(OmniModelConfig.from_dict({"pretrained": str(out)}))
    for (name, a), b in zip(again.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_plan_names_the_experts_and_its_kernel_swaps_compute_what_hf_computes():
    """The foundation's plan: blocks as units, the fused expert tensors split over EP; its kernel swaps
    (RMSNorms incl. q/k and the final norm, M-RoPE attention), with torch formulas in the kernels'
    place, give HF's loss and gradients."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig

    from omni_dist.kernel_swap import swap_kernels
    from omni_models.foundations.qwen3_omni import Qwen3OmniMoeThinkerTextForCausalLM
    from omni_models.hf_plans import plan_for
    from omni_models.kernel_modules import KernelRMSNorm, RotaryAttention
    from tests.omni_models.kernel_refs import TORCH_FORMULAS

    torch.manual_seed(0)
    cfg = Qwen3OmniMoeTextConfig(**TEXT, attn_implementation="sdpa")
    hf = Qwen3OmniMoeThinkerTextForCausalLM(cfg).float()
    plan = plan_for(hf)
    layers = [f"model.layers.{i}" for i in range(TEXT["num_hidden_layers"])]
    assert [f for f, _ in plan.match_modules(hf, "fsdp_units")] == layers
    assert [f for f, _ in plan.match_modules(hf, "experts")] == [f"{x}.mlp.experts" for x in layers]
    assert sorted(plan.match_expert_params(hf)) == [
        f"{x}.mlp.experts.{n}" for x in layers for n in ("down_proj", "gate_up_proj")
    ]
    ours = copy.deepcopy(hf)
    swapped = swap_kernels(ours, plan.match_kernels(ours), TORCH_FORMULAS.swaps())
    assert {type(ours.get_submodule(f)) for f in swapped} == {KernelRMSNorm, RotaryAttention}
    assert sum(isinstance(m, KernelRMSNorm) for m in ours.modules()) == 4 * TEXT["num_hidden_layers"] + 1
    ids, t = torch.randint(0, TEXT["vocab_size"], (1, 24)), torch.arange(24)
    positions = torch.stack([t, t % 5, t // 5])[:, None]  # distinct t/h/w rows, as an image's tokens have

    def loss_and_grads(model):
        embeds = model.get_input_embeddings()(ids)
        logits = model(inputs_embeds=embeds, position_ids=positions).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    (want, want_grads), (got, grads) = loss_and_grads(hf), loss_and_grads(ours)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_an_audio_items_features_do_not_depend_on_the_items_beside_it(dirs):
    """Chunks are padded to a whole chunk whatever else is encoded: a 0.4 s item alone (HF would pad it
    only to itself) equals the same item encoded beside a 2.6 s one; the dummy input is one token."""
    from omni_data.schema import MediaItem
    from omni_dist.packed import MediaBatch

    spec = OmniModelConfig.from_dict({"pretrained": str(dirs[False, False])})
    model, _ = build(spec)
    encoder = model.encoders["audio"]
    proc = encoder.processor("audio")
    short, long = (proc.process(MediaItem("audio", "a.wav", wav(s, 3))) for s in (0.4, 2.6))
    counts = [proc.tokens(int(x["feature_lens"])) for x in (short, long)]
    alone = encoder.lm_encode({"audio": MediaBatch.of([short], counts[:1])})["audio"]
    both = encoder.lm_encode({"audio": MediaBatch.of([short, long], counts)})["audio"]
    assert alone.shape == (counts[0], TEXT["hidden_size"]) and both.shape[0] == sum(counts)
    torch.testing.assert_close(both[: counts[0]], alone, rtol=0, atol=1e-6)
    assert encoder.lm_encode(encoder.dummy_media())["audio"].shape == (1, TEXT["hidden_size"])


@pytest.mark.parametrize("av", [False, True])
def test_data_path_equals_the_directorys_qwen3_omni_processor(dirs, tmp_path, av):
    """Our input ids (placeholders expanded; with use_audio_in_video each video's frames and audio track
    interleaved), pixel values, grids, seconds per temporal patch, audio frame counts and features are
    what the directory's Qwen3OmniMoeProcessor makes of the same conversation. HF extracts a sample's
    audio items as one padded batch, which changes a shorter item's last frames (the STFT reads the
    padding): features are compared for each sample's longest item, which it leaves unpadded."""
    from transformers import AutoProcessor

    from omni_train.assembly import meta_model
    from tests.omni_models.test_pretrained_processor import KEYS, _hf_reference

    path = dirs[False, False]
    spec = OmniModelConfig.from_dict(
        {"pretrained": str(path), **({"use_audio_in_video": True} if av else {})}
    )
    ours_proc = chat_processor(meta_model(spec), spec, AutoTokenizer.from_pretrained(path))
    hf = AutoProcessor.from_pretrained(path)
    assert type(hf).__name__ == "Qwen3OmniMoeProcessor"
    (tmp_path / "media").mkdir()
    docs = AV_DOCS if av else DOCS
    for (doc, files), ours in zip(docs, processed(ours_proc, docs), strict=True):
        want = _hf_reference(hf, doc, files, tmp_path / "media", av)
        assert ours.input_ids.tolist() == want["input_ids"][0].tolist(), doc["id"]
        for kind, (feats, grid) in KEYS.items():
            items = [m for m in ours.media if m.modality == kind]
            if not items:
                continue
            if kind == "audio":
                lens = want[grid].sum(-1).tolist()
                assert [int(m.tensors["feature_lens"]) for m in items] == lens, doc["id"]
                m, f = max(
                    zip(items, want[feats], strict=True), key=lambda x: int(x[0].tensors["feature_lens"])
                )
                n = int(m.tensors["feature_lens"])
                torch.testing.assert_close(m.tensors["input_features"], f[:, :n].T, rtol=0, atol=0)
                continue
            torch.testing.assert_close(torch.cat([m.tensors["pixel_values"] for m in items]), want[feats])
            assert torch.cat([m.tensors["grid_thw"] for m in items]).tolist() == want[grid].tolist()
            if kind == "video":
                got = torch.cat([m.tensors["second_per_grid_ts"] for m in items]).tolist()
                assert got == pytest.approx(torch.as_tensor(want["video_second_per_grid"]).tolist())


# Four micro-batches of one global batch: audio on two ranks of four (the others run the audio tower's
# dummy), one video, images and text
PARALLEL_BATCHES = [
    [(10, [("image", (64, 64))]), (2, [])],
    [(11, [("video",)])],
    [(12, [("audio", 1.3), ("image", (64, 32))])],
    [(13, [("audio", 2.6)]), (14, [])],
]
LAYOUTS = [{"dp_shard": 4}, {"dp_shard": 2, "sp": 2, "ep": 2}]


def _parallel_batches(path: str, model, spec, indices) -> list:
    proc = chat_processor(model, spec, AutoTokenizer.from_pretrained(path))
    return [pack(processed(proc, [omni_sample(*x) for x in PARALLEL_BATCHES[k]]), pad_to=2) for k in indices]


def _parallel_rank(path: str) -> list[dict]:
    import torch.distributed as dist

    from omni_dist import ParallelDims, ParallelMesh
    from omni_dist.attention import SequenceParallel
    from tests.omni_models.test_omni_parity import _train

    torch.set_num_threads(1)
    spec = OmniModelConfig.from_dict({"pretrained": path})
    results = []
    for layout in LAYOUTS:
        mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), **layout), device_type="cpu")
        model, _ = build(spec, mesh)
        if mesh.dims.ep > 1:  # every experts module runs split over ep
            experts = [m for n, m in model.named_modules() if n.endswith(".mlp.experts")]
            assert experts and all(getattr(m, "_omni_expert_parallel", False) for m in experts)
        sp = SequenceParallel.from_mesh(mesh["sp"]) if mesh.dims.sp > 1 else None
        per_rank = len(PARALLEL_BATCHES) // mesh.dims.dp
        batches = _parallel_batches(
            path, model, spec, range(mesh.dp_rank * per_rank, (mesh.dp_rank + 1) * per_rank)
        )
        results.append(
            _train(model, batches, [p for p in model.parameters() if p.requires_grad], sp, mesh["loss"])
        )
    return results


def test_fsdp_and_ulysses_with_expert_parallel_match_one_process(dirs):
    """Loss and grad norm over 3 AdamW steps: dp_shard=4, and dp_shard=2 x sp=2 with the experts split
    over the SP pair (ep=2; loaded from the per-expert keys into EP shards), equal one process."""
    from tests.harness import run_ranks
    from tests.omni_models.test_omni_parity import _close, _train

    path = str(dirs[False, False])
    results = run_ranks(_parallel_rank, 4, path)
    spec = OmniModelConfig.from_dict({"pretrained": path})
    model, _ = build(spec)
    batches = _parallel_batches(path, model, spec, range(len(PARALLEL_BATCHES)))
    ref = _train(model, batches, [p for p in model.parameters() if p.requires_grad])
    assert ref["loss"][-1] < ref["loss"][0]
    for rank_results in results:
        for layout, r in zip(LAYOUTS, rank_results, strict=True):
            assert _close(r["loss"], ref["loss"]), (layout, r["loss"], ref["loss"])
            assert _close(r["grad_norm"], ref["grad_norm"]), (layout, r["grad_norm"], ref["grad_norm"])
