"""Image generation: a VQ decoder trained end to end with understanding, then sampled with a KV cache."""

from __future__ import annotations

import pytest
import torch

from omni_data.processor import modality_tokens
from omni_models.config import build_omni_model
from omni_models.omni_weights import init_omni_weights_
from tests.omni_data.fixtures import tokenizer
from tests.omni_models.omni_fixtures import chat_processor, draw_sample, micro_batch, omni_config, sample


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = build_omni_model(omni_config(decoder=True))
    init_omni_weights_(model, 0)
    proc = chat_processor(model)
    # Understanding (image / audio questions) and generation ("draw d") in the same micro-batches.
    batches = [
        micro_batch(proc, [draw_sample(0), sample(1, ("image",))]),
        micro_batch(proc, [draw_sample(1), draw_sample(2), sample(2, ("audio",))]),
        micro_batch(proc, [draw_sample(3), sample(3, ())]),
    ]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(100):
        sums: dict[str, list[float]] = {}
        tokens = sum(b.num_label_tokens + int(b.targets["image"].llm_tokens.sum()) for b in batches)
        for b in batches:
            out = model(b)
            (out.loss_sum / tokens).backward()
            for part, (value, n) in out.parts.items():
                acc = sums.setdefault(part, [0.0, 0])
                acc[0] += value.item()
                acc[1] += n
        opt.step()
        opt.zero_grad()
        history.append({part: s / n for part, (s, n) in sums.items()})
    return model, history


def _prompt(d: int, with_start: bool = True) -> torch.Tensor:
    tok = tokenizer()
    text = tok.apply_chat_template(
        [{"role": "user", "content": f"draw {['zero', 'one', 'two', 'three'][d]}"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if with_start:
        ids.append(tok.convert_tokens_to_ids(modality_tokens("image")[0]))
    return torch.tensor(ids)


def _markers():
    tok = tokenizer()
    return {"image": tuple(tok.convert_tokens_to_ids(t) for t in modality_tokens("image"))}


def test_image_token_loss_falls_while_understanding_trains_too(trained):
    _, history = trained
    first, last = history[0], history[-1]
    assert first["image_gen"] > 3.9  # ~ln(64): a uniform guess over the codebook
    assert last["image_gen"] < 0.35 * first["image_gen"], (first, last)
    assert last["text"] < 0.5 * first["text"], (first, last)


def test_greedy_generation_is_deterministic_and_exact_and_caching_changes_nothing(trained):
    model, _ = trained
    markers = _markers()
    _, placeholder, end = markers["image"]
    runs = [model.generate(_prompt(2), markers, max_new_tokens=24, use_cache=c) for c in (True, True, False)]
    a, b, uncached = runs
    assert a.tokens == b.tokens and torch.equal(a.codes[0], b.codes[0])
    assert a.tokens == uncached.tokens and torch.equal(a.codes[0], uncached.codes[0])  # KV cache = recompute
    decoder = model.decoders["image_gen"]
    assert a.tokens[: decoder.tokens] == [placeholder] * decoder.tokens and a.tokens[decoder.tokens] == end
    assert a.codes[0].shape == (decoder.tokens,) and a.images[0].shape == (3, 16, 16)
    assert float(a.images[0].min()) >= 0 and float(a.images[0].max()) <= 1
    # The trained model draws the code grid it was taught for "draw two".
    taught = model.decoders["image_gen"].codes(
        micro_batch(chat_processor(model), [draw_sample(2)]).targets["image"]
    )
    assert (a.codes[0] == taught[0]).float().mean() > 0.5


def test_the_model_opens_the_image_itself_and_sampling_options_run(trained):
    model, _ = trained
    markers = _markers()
    out = model.generate(_prompt(1, with_start=False), markers, max_new_tokens=20)
    assert out.tokens[0] == markers["image"][0] and len(out.images) == 1  # it learned to emit <|image_start|>
    g = torch.Generator().manual_seed(3)
    sampled = model.generate(_prompt(3), markers, max_new_tokens=17, temperature=1.0, top_k=8, generator=g)
    g = torch.Generator().manual_seed(3)
    again = model.generate(_prompt(3), markers, max_new_tokens=17, temperature=1.0, top_k=8, generator=g)
    assert torch.equal(sampled.codes[0], again.codes[0])
    guided = model.generate(_prompt(3), markers, max_new_tokens=17, cfg_scale=3.0)
    assert guided.images[0].shape == (3, 16, 16)


def test_decoder_loads_a_janus_layout_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from omni_models.decoders.janus_vq import JanusVQImageDecoder
    from tests.omni_models.omni_fixtures import VQ

    torch.manual_seed(1)
    source = JanusVQImageDecoder(VQ, hidden_size=32)
    renamed = {}
    for name, t in source.state_dict().items():
        (key,) = source.__class__(VQ, hidden_size=32, checkpoint_layout="janus").checkpoint_keys(name, t) or {
            name: t
        }
        renamed[key] = t.contiguous()
    assert (
        "model.generation_head.vision_head.weight" in renamed
        and "model.vqmodel.quantize.embedding.weight" in renamed
    )
    save_file(renamed, str(tmp_path / "model.safetensors"))
    cfg = omni_config(decoder=True)
    model_cfg = type(cfg)(
        cfg.foundation,
        cfg.encoders,
        {
            "image_gen": type(cfg.decoders["image_gen"])(
                name="janus_vq",
                modalities=("image",),
                config=VQ,
                options={"checkpoint_layout": "janus"},
                path=str(tmp_path),
            ),
        },
    )
    from omni_models.omni_weights import load_part_weights_

    model = build_omni_model(model_cfg)
    loaded = load_part_weights_(model, model_cfg)
    assert any(n.startswith("decoders.image_gen.tower.") for n in loaded)
    for name, t in source.state_dict().items():
        assert torch.equal(model.decoders["image_gen"].state_dict()[name], t), name
