"""The causal LM over Qwen3-Omni's thinker text model (TextCausalLM, see text_lm.py).

Qwen3OmniMoeThinkerTextModel is Qwen3-VL-MoE's text model under Qwen3-Omni's classes: it takes
DeepStack's keywords (`visual_pos_masks`, `deepstack_visual_embeds`) through `forward`'s keywords, and
with `output_router_logits` returns its routers' logits for OmniModel's load-balancing loss (HF computes
that loss in the thinker's class, not in the text model). Its experts are fused in memory ((E, 2I, H) /
(E, H, I)) and saved one tensor per expert (the family reads and writes that layout).
"""

from __future__ import annotations

from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerTextModel,
    Qwen3OmniMoeThinkerTextPreTrainedModel,
)

from omni_models.foundations.qwen3_vl import Qwen3VLMoeTextForCausalLM
from omni_models.foundations.text_lm import TextCausalLM


class Qwen3OmniMoeThinkerTextForCausalLM(TextCausalLM, Qwen3OmniMoeThinkerTextPreTrainedModel):
    config: Qwen3OmniMoeTextConfig
    text_model_class = Qwen3OmniMoeThinkerTextModel
    _output = Qwen3VLMoeTextForCausalLM._output  # the router logits on the output, as Qwen3-VL-MoE's
