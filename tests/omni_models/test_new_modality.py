"""Adding a modality = one encoder class + its processor + config lines; no existing file changes.

The toy "sensor" modality (tests/omni_models/sensor_modality.py) trains next to images.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from omni_data.processor import ChatProcessor, modality_tokens
from omni_models.config import OmniModelConfig, build_omni_model
from omni_models.omni_weights import init_omni_weights_
from omni_models.registry import register_encoder
from tests.omni_data.fixtures import tokenizer
from tests.omni_models.omni_fixtures import VISION, foundation_config, micro_batch, sample
from tests.omni_models.sensor_modality import SensorEncoder


def test_a_new_sensor_modality_trains_next_to_images():
    register_encoder("sensor_mlp", SensorEncoder)
    cfg = OmniModelConfig.from_dict(
        {
            "foundation": {"name": "qwen2", "config": foundation_config()},
            "encoders": {
                "vision": {
                    "name": "qwen2_vl_vision",
                    "modalities": ["image"],
                    "config": VISION,
                    "options": {"min_pixels": 64, "max_pixels": 1024},
                },
                "sensor": {
                    "name": "sensor_mlp",
                    "modalities": ["sensor"],
                    "config": {"width": 12},
                    "freeze": False,
                },
            },
        }
    )
    torch.manual_seed(0)
    model = build_omni_model(cfg)
    init_omni_weights_(model, 3)
    tok = copy.deepcopy(tokenizer())
    tok.add_tokens(list(modality_tokens("sensor")), special_tokens=True)
    procs = {m: model.encoders[model.modality_encoder[m]].processor(m) for m in model.modality_encoder}
    chat = ChatProcessor(tok, media=procs)

    def sensor_sample(i: int):
        doc, files = sample(i, ())
        doc["messages"][0]["content"].append({"type": "sensor", "media": "s.f32"})
        files["s.f32"] = np.sin(np.arange(8 * (2 + i)) * 0.3 + i).astype(np.float32).tobytes()
        return doc, files

    with_sensor = micro_batch(chat, [sensor_sample(0), sensor_sample(1)])
    without = micro_batch(chat, [sample(2, ("image",))])
    assert int(with_sensor.media["sensor"].llm_tokens.sum()) == 2 + 3 and "sensor" not in without.media
    model(without).loss_sum.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.encoders["sensor"].parameters())
    model.zero_grad()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = (model(with_sensor).loss_sum + model(without).loss_sum) / (
            with_sensor.num_label_tokens + without.num_label_tokens
        )
        loss.backward()
        assert any(torch.count_nonzero(p.grad) > 0 for p in model.encoders["sensor"].parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.flops(with_sensor)["sensor"] > 0
