"""Causal LMs over Qwen3-VL's and Qwen3-VL-MoE's text models (TextCausalLM, see text_lm.py).

The text models take DeepStack's keywords (`visual_pos_masks`, `deepstack_visual_embeds`: vision features
added to the hidden states of the first layers at the media positions); they pass through `forward`'s
keywords as the other packed-attention keywords do. The MoE model's router logits (with
`output_router_logits`) come back on the output, for OmniModel's load-balancing loss: HF computes that
loss in the whole VLM's class, not in the text model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLPreTrainedModel, Qwen3VLTextModel
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
    Qwen3VLMoePreTrainedModel,
    Qwen3VLMoeTextModel,
)

from omni_models.foundations.text_lm import TextCausalLM


class Qwen3VLTextForCausalLM(TextCausalLM, Qwen3VLPreTrainedModel):
    config: Qwen3VLTextConfig
    text_model_class = Qwen3VLTextModel


class Qwen3VLMoeTextForCausalLM(TextCausalLM, Qwen3VLMoePreTrainedModel):
    config: Qwen3VLMoeTextConfig
    text_model_class = Qwen3VLMoeTextModel

    def _output(self, out: Any, logits: torch.Tensor) -> MoeCausalLMOutputWithPast:
        return MoeCausalLMOutputWithPast(
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            router_logits=out.router_logits,
        )
