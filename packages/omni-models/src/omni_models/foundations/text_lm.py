"""Causal LMs over the text model of an HF multimodal family (HF ships only the whole VLM class).

`TextCausalLM` composes the family's own `...TextModel` with an LM head: no modeling code is copied,
so M-RoPE, attention and norms are HF's. Submodules are named `model` and `lm_head`, which are the
keys `save_pretrained` writes for the language part of a Qwen2-VL / Qwen2.5-VL checkpoint, so the
part loads from the whole model's directory as it is (Qwen2-VL, Qwen2.5-VL and the Qwen2.5-Omni thinker). Tying follows `config.tie_word_embeddings`,
which the family builder copies from the top-level config (the text config does not carry it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniPreTrainedModel,
    Qwen2_5OmniThinkerTextModel,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel, Qwen2_5_VLTextModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLPreTrainedModel, Qwen2VLTextModel


class TextCausalLM:
    """Mixin for a PreTrainedModel subclass; `text_model_class` is the family's text model."""

    text_model_class: type[nn.Module]
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Any):
        super().__init__(config)
        self.model = self.text_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(
        self,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """position_ids (1, T) or (3, 1, T) (M-RoPE rows t/h/w, as HF's `get_rope_index` makes them);
        `logits_to_keep` as in HF's causal LMs: the last n positions (0: all), or a tensor of positions."""
        out = self.model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return self._output(out, self.lm_head(out.last_hidden_state[:, keep]))

    def _output(self, out: Any, logits: torch.Tensor) -> CausalLMOutputWithPast:
        """The LM's output from the text model's `out` and the logits (a MoE family adds its router logits)."""
        return CausalLMOutputWithPast(
            logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )


class Qwen2VLTextForCausalLM(TextCausalLM, Qwen2VLPreTrainedModel):
    config: Qwen2VLTextConfig
    text_model_class = Qwen2VLTextModel


class Qwen2_5_VLTextForCausalLM(TextCausalLM, Qwen2_5_VLPreTrainedModel):
    config: Qwen2_5_VLTextConfig
    text_model_class = Qwen2_5_VLTextModel


class Qwen2_5OmniThinkerTextForCausalLM(TextCausalLM, Qwen2_5OmniPreTrainedModel):
    config: Qwen2_5OmniTextConfig
    text_model_class = Qwen2_5OmniThinkerTextModel
