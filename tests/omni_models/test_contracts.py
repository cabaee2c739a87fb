"""Every registered part satisfies its Protocol (omni_models.modality), and the check catches a part
that lacks a member or has a signature the framework cannot call, at build, naming the part.

Adding a registration without a tiny config here fails `test_every_registered_part_...`: add one to
TINY below.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, get_type_hints

import pytest
import torch
from torch import nn

from omni_dist.media import MediaCount, MediaProcessor
from omni_dist.packed import MediaBatch, pack
from omni_dist.plan import ParallelPlan
from omni_models.config import ModelConfigError, OmniModelConfig, build_omni_model
from omni_models.contracts import ContractError, check_contract, contract_problems
from omni_models.decoders.janus_vq import JanusVQImageDecoder
from omni_models.modality import Decoder, Encoder, Foundation
from omni_models.registry import DECODERS, ENCODERS, FOUNDATIONS, register_decoder, register_encoder
from tests.omni_models.hf_dirs import AUDIO as FAMILY_AUDIO
from tests.omni_models.hf_dirs import TEXT as FAMILY_TEXT
from tests.omni_models.hf_dirs import VISION as FAMILY_VISION
from tests.omni_models.omni_fixtures import VISION, VQ, WHISPER, foundation_config
from tests.omni_models.qwen3_omni_dirs import AUDIO as OMNI3_AUDIO
from tests.omni_models.qwen3_omni_dirs import TEXT as OMNI3_TEXT
from tests.omni_models.qwen3_omni_dirs import VISION as OMNI3_VISION

SIGLIP = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 4,
}


def _qwen_vision(config: dict) -> dict:
    return {
        "config": config,
        "modalities": ["image", "video"],
        "options": {"min_pixels": 64, "max_pixels": 1024},
    }


MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}

# A tiny spec per registered name: {"config": ..., "modalities": [...], "options": {...}} for encoders
# and decoders, the HF config fields for foundations.
TINY: dict[str, dict[str, dict[str, Any]]] = {
    "encoders": {
        "qwen2_vl_vision": _qwen_vision(VISION),
        "qwen2_5_vl_vision": _qwen_vision(FAMILY_VISION["qwen2_5_vl"]),
        "qwen2_5_omni_vision": _qwen_vision(FAMILY_VISION["qwen2_5_omni_thinker"]),
        "qwen2_5_omni_audio": {"config": FAMILY_AUDIO, "modalities": ["audio"]},
        "qwen3_vl_vision": _qwen_vision(FAMILY_VISION["qwen3_vl"]),
        "qwen3_vl_moe_vision": _qwen_vision(FAMILY_VISION["qwen3_vl_moe"]),
        "qwen3_omni_moe_vision": _qwen_vision(OMNI3_VISION),
        "qwen3_omni_moe_audio": {"config": OMNI3_AUDIO, "modalities": ["audio"]},
        "janus_vision": {
            "config": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 16,
                "patch_size": 4,
                "projection_dim": 32,
                "depth": 2,
            },
            "modalities": ["image"],
        },
        "siglip": {"config": SIGLIP, "modalities": ["image"]},
        "whisper": {"config": WHISPER, "modalities": ["audio"]},
    },
    "decoders": {"janus_vq": {"config": VQ, "modalities": ["image"]}},
    "foundations": {
        "llama": foundation_config(),
        "qwen2": foundation_config(),
        "qwen3": foundation_config(),
        "qwen3_moe": foundation_config(**MOE),
        "qwen2_vl_text": foundation_config(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        "qwen2_5_vl_text": foundation_config(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        "qwen2_5_omni_text": foundation_config(
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6}
        ),
        "qwen3_vl_text": foundation_config(**FAMILY_TEXT["qwen3_vl"]),
        "qwen3_vl_moe_text": foundation_config(**FAMILY_TEXT["qwen3_vl_moe"]),
        "qwen3_omni_moe_text": foundation_config(**OMNI3_TEXT),
    },
}
REGISTRIES: dict[str, MutableMapping[str, Any]] = {
    "encoders": ENCODERS,
    "decoders": DECODERS,
    "foundations": FOUNDATIONS,
}


def _shipped(kind: str) -> list[str]:
    """The registered names, less those another test registered (its class lives under tests.)."""
    registry = REGISTRIES[kind]
    return sorted(n for n, f in registry.items() if not getattr(f, "__module__", "").startswith("tests."))


def _spec(
    encoders: dict[str, dict] | None = None,
    decoders: dict[str, dict] | None = None,
    foundation: tuple[str, dict] = ("qwen2", foundation_config()),
) -> OmniModelConfig:
    return OmniModelConfig.from_dict(
        {
            "foundation": {"name": foundation[0], "config": foundation[1]},
            "encoders": encoders or {},
            "decoders": decoders or {},
        }
    )


def _build(cfg: OmniModelConfig):
    with torch.device("meta"):
        return build_omni_model(cfg)


@pytest.mark.parametrize("kind,name", [(k, n) for k in REGISTRIES for n in _shipped(k)])
def test_every_registered_part_builds_from_a_tiny_config_and_satisfies_its_protocol(kind, name):
    assert name in TINY[kind], (
        f"{kind[:-1]} {name!r} is registered but tests/omni_models/test_contracts.py has no tiny config "
        f"for it: add one to TINY[{kind!r}]"
    )
    tiny = TINY[kind][name]
    if kind == "foundations":
        model = _build(_spec(foundation=(name, tiny)))
        assert contract_problems(model.foundation, Foundation) == []
        return
    spec = {"name": name, **tiny}
    model = _build(_spec(**{kind: {"part": spec}}))
    part, protocol = (model.encoders, Encoder) if kind == "encoders" else (model.decoders, Decoder)
    assert contract_problems(part["part"], protocol) == []
    assert isinstance(part["part"], protocol)
    for m in tiny["modalities"]:
        assert contract_problems(part["part"].processor(m), MediaProcessor) == []
    assert contract_problems(model.foundation, Foundation) == []


def test_every_tiny_config_names_a_registered_part():
    for kind, specs in TINY.items():
        stale = sorted(set(specs) - set(REGISTRIES[kind]))
        assert not stale, f"TINY[{kind!r}] has configs for unregistered names {stale}"


# A toy encoder with every Encoder member (ToyEncoder) and variants that lack one or get one wrong.


class ToyProcessor:
    def count(self, item) -> MediaCount:
        return MediaCount(1, 1)

    def process(self, item) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(1, 4)}


class CountOnlyProcessor:
    def count(self, item) -> MediaCount:
        return MediaCount(1, 1)


class _AllButDummyMedia(nn.Module):
    def __init__(self, config: dict, modalities: tuple[str, ...] = ("toy",)):
        super().__init__()
        self.modalities = tuple(modalities)
        self.output_size = 8
        self.net = nn.Linear(4, 8)

    def lm_encode(self, media):
        (m,) = [k for k in self.modalities if k in media]
        return {m: self.net(media[m].tensors["x"])}

    def processor(self, modality: str):
        return ToyProcessor()

    def plan(self) -> ParallelPlan:
        return ParallelPlan()

    def flops(self, media) -> float:
        return 0.0


class ToyEncoder(_AllButDummyMedia):
    def dummy_media(self):
        return {self.modalities[0]: MediaBatch.of([{"x": torch.zeros(1, 4)}], [1])}


class NoFlops(ToyEncoder):
    flops = None


class NoDummyNoFlops(_AllButDummyMedia):
    flops = None


class NoOutputSize(ToyEncoder):
    def __init__(self, config: dict, modalities: tuple[str, ...] = ("toy",)):
        super().__init__(config, modalities)
        del self.output_size


class EncodeTakesNothing(ToyEncoder):
    def lm_encode(self):
        return {}


class FlopsNeedsAnExtra(ToyEncoder):
    def flops(self, media, scale):
        return 0.0


class EncodeByKeywordOnly(ToyEncoder):
    def lm_encode(self, *, media):
        return {}


class LenientButValid(ToyEncoder):
    """Other parameter names, defaults and *args/**kwargs: still callable as the framework calls it."""

    def lm_encode(self, batch, *extra, **options):
        return super().lm_encode(batch)

    def flops(self, items, scale: float = 1.0) -> float:
        return 0.0


class NoProcessMethod(ToyEncoder):
    def processor(self, modality: str):
        return CountOnlyProcessor()


class NotAModule:
    modalities = ("toy",)
    output_size = 8
    lm_encode = ToyEncoder.lm_encode
    dummy_media = ToyEncoder.dummy_media
    processor = ToyEncoder.processor
    plan = ToyEncoder.plan
    flops = ToyEncoder.flops


def test_the_toy_encoder_satisfies_the_protocol():
    assert contract_problems(ToyEncoder({}), Encoder) == []
    assert contract_problems(LenientButValid({}), Encoder) == []
    assert contract_problems(ToyProcessor(), MediaProcessor) == []


@pytest.mark.parametrize(
    "cls,expected",
    [
        (NoFlops, ["`flops` is None, not a method"]),
        (_AllButDummyMedia, ["missing method `dummy_media`"]),
        (NoDummyNoFlops, ["missing method `dummy_media`", "`flops` is None, not a method"]),
        (NoOutputSize, ["missing attribute `output_size`"]),
        (NotAModule, ["not an nn.Module (NotAModule)"]),
    ],
)
def test_a_part_that_lacks_a_member_fails_the_check(cls, expected):
    assert contract_problems(cls({}) if cls is not NotAModule else cls(), Encoder) == expected


@pytest.mark.parametrize(
    "cls,method,reason",
    [
        (EncodeTakesNothing, "lm_encode", "it takes 0 positional argument(s), the framework passes 1"),
        (FlopsNeedsAnExtra, "flops", "it requires `scale`, which the framework never passes"),
        (EncodeByKeywordOnly, "lm_encode", "it requires `media`, which the framework never passes"),
    ],
)
def test_a_method_with_a_signature_the_framework_cannot_call_fails_the_check(cls, method, reason):
    (problem,) = contract_problems(cls({}), Encoder)
    assert problem.startswith(f"`{method}(") and reason in problem, problem
    assert f"the Protocol's `{method}(media, /)`" in problem
    with pytest.raises(ContractError, match=rf"model\.encoders\.toy: {cls.__name__} does not satisfy"):
        check_contract(cls({}), Encoder, "model.encoders.toy")


def test_a_processor_without_process_fails_the_check():
    assert contract_problems(CountOnlyProcessor(), MediaProcessor) == ["missing method `process`"]


class OldDecoder(JanusVQImageDecoder):
    """The signature the Decoder Protocol used to document: generation from the foundation."""

    def lm_generate(self, foundation, prompt_embeds, **kwargs):
        raise NotImplementedError


class DecoderWithoutTokens(JanusVQImageDecoder):
    def __init__(self, config, modalities=("image",), hidden_size=0):
        super().__init__(config, modalities, hidden_size)
        del self.tokens


def test_decoder_check_catches_an_old_signature_and_a_missing_attribute():
    with torch.device("meta"):
        assert contract_problems(JanusVQImageDecoder(VQ, hidden_size=32), Decoder) == []
        (problem,) = contract_problems(OldDecoder(VQ, hidden_size=32), Decoder)
        assert problem.startswith("`lm_generate(foundation, prompt_embeds, **kwargs)`")
        assert "requires `prompt_embeds`" in problem
        assert contract_problems(DecoderWithoutTokens(VQ, hidden_size=32), Decoder) == [
            "missing attribute `tokens`"
        ]


class FixedArgsFoundation(nn.Module):
    """A foundation whose forward names only some of the keywords the framework passes."""

    def __init__(self):
        super().__init__()
        self.config = object()
        self.embed = nn.Embedding(4, 4)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.embed

    def set_attn_implementation(self, name: str) -> None:
        pass

    def forward(self, inputs_embeds, position_ids=None, use_cache=None):
        raise NotImplementedError


class KwargsFoundation(FixedArgsFoundation):
    def forward(self, inputs_embeds, position_ids=None, **kwargs):
        raise NotImplementedError


def test_foundation_check_wants_every_keyword_the_framework_passes():
    (problem,) = contract_problems(FixedArgsFoundation(), Foundation)
    assert problem.startswith("`forward(inputs_embeds, position_ids=None, use_cache=None)`")
    missing = problem.split("it does not take the keyword(s) ")[1]
    assert missing.split(", ") == [
        f"`{kw}`"
        for kw in (
            "past_key_values",
            "output_hidden_states",
            "output_router_logits",
            "logits_to_keep",
            "cu_seq_lens_q",
            "cu_seq_lens_k",
            "max_length_q",
            "max_length_k",
            "sequence_parallel",
            "visual_pos_masks",
            "deepstack_visual_embeds",
        )
    ]
    assert contract_problems(KwargsFoundation(), Foundation) == []


def _foundation_calls(model, run: Callable[[], Any]) -> list[tuple[tuple, dict[str, Any]]]:
    """(args, kwargs) of every call of the model's foundation while `run` runs."""
    calls = []
    hook = model.foundation.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    try:
        run()
    finally:
        hook.remove()
    return calls


def test_foundation_forward_declares_exactly_the_keywords_the_framework_passes():
    """The keywords a real HF foundation receives in training (dense, MoE, and with a DeepStack encoder)
    and in generation (with and without the KV cache) are the Protocol's, each value of its declared type."""
    deepstack_vision = {
        **_qwen_vision({**FAMILY_VISION["qwen3_vl"], "out_hidden_size": 32}),
        "name": "qwen3_vl_vision",
        "projector": "identity",
    }
    specs = [
        _spec(foundation=("qwen2", foundation_config())),
        _spec(foundation=("qwen3_moe", foundation_config(**MOE))),
        _spec(
            {"vision": deepstack_vision},
            foundation=("qwen3_vl_text", foundation_config(**FAMILY_TEXT["qwen3_vl"])),
        ),
    ]
    calls, prompt = [], torch.arange(1, 6)
    for spec in specs:
        torch.manual_seed(0)
        model = build_omni_model(spec)
        batch = pack([torch.arange(1, 9), torch.arange(3, 8)])
        calls += _foundation_calls(model, lambda model=model, batch=batch: model(batch))
        calls += _foundation_calls(
            model,
            lambda model=model: [
                model.generate(prompt, {}, max_new_tokens=2, use_cache=c) for c in (True, False)
            ],
        )
    assert all(args == () for args, _ in calls), "the foundation is called by keyword only"
    passed: dict[str, list[Any]] = {}
    for _, kwargs in calls:
        for name, value in kwargs.items():
            passed.setdefault(name, []).append(value)
    params = inspect.signature(Foundation.forward).parameters.values()
    declared = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert sorted(set(passed) - declared) == [], (
        "passed to the foundation, not declared by Foundation.forward"
    )
    assert sorted(declared - set(passed)) == [], "declared by Foundation.forward, never passed"
    hints = get_type_hints(Foundation.forward)
    wrong = [
        f"{name}={value!r} is not {hints[name]}"
        for name, values in passed.items()
        for value in values
        if hints[name] is not Any and not isinstance(value, hints[name])
    ]
    assert wrong == []


@contextmanager
def registered(
    register: Callable[[str, Any], None], registry: MutableMapping[str, Any], factory: Any
) -> Iterator[str]:
    name = f"contract_test_{uuid.uuid4().hex[:8]}"
    register(name, factory)
    try:
        yield name
    finally:
        registry.pop(name, None)


def _encoder_spec(name: str) -> OmniModelConfig:
    return _spec(encoders={"toy": {"name": name, "modalities": ["toy"], "config": {}}})


def test_build_accepts_a_complete_registered_encoder():
    with registered(register_encoder, ENCODERS, ToyEncoder) as name:
        model = _build(_encoder_spec(name))
    assert isinstance(model.encoders["toy"], ToyEncoder)


def test_build_fails_naming_the_part_the_protocol_and_the_missing_member():
    for cls, members in ((_AllButDummyMedia, ["dummy_media"]), (NoDummyNoFlops, ["dummy_media", "flops"])):
        with registered(register_encoder, ENCODERS, cls) as name:
            cfg = _encoder_spec(name)
            with pytest.raises(ModelConfigError) as err:
                _build(cfg)
        msg = str(err.value)
        assert msg.startswith(f"model.encoders.toy ({name}): {cls.__name__} does not satisfy the Encoder")
        assert "omni_models.modality.Encoder" in msg
        for m in members:
            assert f"`{m}`" in msg
        assert name not in ENCODERS


def test_build_fails_for_a_wrong_signature_and_for_a_processor_without_process():
    wrong = r"model\.encoders\.toy \(contract_test_\w+\).*`flops\(media, scale\)`"
    with (
        registered(register_encoder, ENCODERS, FlopsNeedsAnExtra) as name,
        pytest.raises(ModelConfigError, match=wrong),
    ):
        _build(_encoder_spec(name))
    with (
        registered(register_encoder, ENCODERS, NoProcessMethod) as name,
        pytest.raises(ModelConfigError) as err,
    ):
        _build(_encoder_spec(name))
    msg = str(err.value)
    assert msg.startswith(f"model.encoders.toy ({name}) processor('toy'): CountOnlyProcessor does not")
    assert "MediaProcessor" in msg and "missing method `process`" in msg


def test_build_fails_for_a_decoder_with_the_old_lm_generate():
    with registered(register_decoder, DECODERS, OldDecoder) as name:
        cfg = _spec(decoders={"gen": {"name": name, "modalities": ["image"], "config": VQ}})
        with pytest.raises(ModelConfigError) as err:
            _build(cfg)
    msg = str(err.value)
    assert msg.startswith(f"model.decoders.gen ({name}): OldDecoder does not satisfy the Decoder Protocol")
    assert "`lm_generate(foundation, prompt_embeds, **kwargs)`" in msg
