"""The modality protocol: what an encoder, a decoder, the foundation and their media batches look like.

Small Protocols instead of base classes. An encoder is an nn.Module that turns the media of a
micro-batch into LLM-token embeddings; its processor (one per modality) turns a raw item into
tensors plus the number of LLM tokens / encoder units it becomes (omni_dist.media.MediaProcessor, the
contract omni-data calls it by), and is handed to the data side through omni-train.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from omni_dist.media import MediaProcessor
from omni_dist.packed import MediaBatch
from omni_dist.plan import ParallelPlan

# The Protocols below list exactly what the framework calls on each part: nothing more is required,
# and `omni_models.contracts.check_contract` checks a built part against them (build_omni_model does,
# for every part). Call sites pass the arguments before `/` positionally (any parameter name works)
# and those after `*` by keyword. Members read with getattr and a fallback are optional and are named
# in the docstrings only.


class _ModalityPart(Protocol):
    """What encoders and decoders share: the media of their modalities, in and out of a micro-batch."""

    modalities: tuple[str, ...]

    def dummy_media(self) -> dict[str, MediaBatch]:
        """The smallest valid input (encoder) or target (decoder), run on ranks whose micro-batch has
        none of its modalities, so every rank runs the same modules."""
        ...

    def processor(self, modality: str, /) -> MediaProcessor:
        """The processor of one of its modalities (KeyError for another)."""
        ...

    def plan(self) -> ParallelPlan:
        """FSDP units / recompute for this part, relative to the part's module."""
        ...

    def flops(self, media: Mapping[str, MediaBatch], /) -> float:
        """Training FLOPs (forward + backward) of this media (called only with media present)."""
        ...


@runtime_checkable
class Encoder(_ModalityPart, Protocol):
    """An nn.Module that reads the media of its modalities into LLM-token features.

    Built as `ENCODERS[name](config: dict, modalities=tuple, **options)`. Called by OmniModel
    (`modalities`, `lm_encode`, `dummy_media`, `flops`), build_omni_model (`output_size` sizes its
    projector), omni_models.parallel (`plan`; `lm_encode` becomes an FSDP forward method) and omni-train
    (`processor`, for every modality it reads), besides the nn.Module API (parameters, requires_grad_).

    Optional, read with getattr: `tower`, the HF module whose checkpoint layout a `path` loads, export
    writes and whose `_init_weights` initialises it (default: the encoder itself);
    `checkpoint_keys(name, tensor) -> {checkpoint name: tensor} | None`, which maps a tower parameter to
    a checkpoint of another layout (None: under its own name); `deepstack_layers` (default 0), the number
    N of the foundation's first layers that also add this encoder's features at its positions (Qwen3-VL's
    DeepStack): `lm_encode` then returns (rows, 1 + N, output_size) per modality, [:, 0] the input
    embeddings (through the projector) and [:, 1 + i] what layer i adds (already the foundation's width);
    and, for the memory model of `--dry-run`
    and `plan` (omni_train.memory), `block_shape() -> (blocks, omni_models.memory.BlockShape)`, its
    transformer stack, else read from the tower's HF `config` (width and depth; omni_models.memory.
    encoder_block). With neither, a trainable encoder's activations are left out of the estimate, and
    the estimate says so.
    """

    modalities: tuple[str, ...]  # the modalities it reads; no other encoder of a model reads them
    output_size: int  # feature width (its projector maps it to the foundation's hidden size)

    def lm_encode(self, media: Mapping[str, MediaBatch], /) -> dict[str, torch.Tensor]:
        """Some of its modalities' media -> per modality given, (sum of llm_tokens, output_size) features
        in item order. Return fresh tensors, not views (FSDP hooks these outputs for backward)."""
        ...


@runtime_checkable
class Decoder(_ModalityPart, Protocol):
    """An nn.Module that makes one generated modality from the foundation's hidden states, as a fixed
    number of discrete codes per item (e.g. VQ image tokens).

    Built as `DECODERS[name](config: dict, modalities=(modality,), hidden_size=<foundation width>,
    **options)`. Called by OmniModel for training (`modalities`, `lm_encode`, `lm_loss`, `dummy_media`,
    `flops`), omni_models.generate for sampling (`tokens`, `lm_head`, `lm_embed`, `lm_generate`),
    omni_models.parallel (`plan`; `lm_encode`, `lm_loss`, `lm_head` and `lm_embed` become FSDP forward
    methods) and omni-train (`processor` of its modality), besides the nn.Module API.

    Optional, read with getattr: `tower`, the HF module whose `_init_weights` initialises it,
    `checkpoint_keys(name, tensor) -> {checkpoint name: tensor} | None`, as for an Encoder (a decoder's
    checkpoint layout is its own module's: export writes the whole decoder), and `checkpoint_module`,
    the module `path` fills (default: the whole decoder; e.g. only its VQ-VAE).
    """

    modalities: tuple[str, ...]  # exactly one generated modality
    tokens: int  # codes per generated item: generation samples this many, then the end marker

    def lm_encode(self, media: Mapping[str, MediaBatch], /) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Teacher forcing: target media -> per modality, (input embeddings (n, hidden_size), the codes
        they embed (n,)), n = sum of llm_tokens; the codes are the targets of `lm_head`."""
        ...

    def lm_head(self, hidden: torch.Tensor, /) -> torch.Tensor:
        """Foundation hidden states (n, hidden_size) -> logits (n, codebook) of the next code."""
        ...

    def lm_loss(self, hidden: torch.Tensor, codes: torch.Tensor, chunk: int, /) -> torch.Tensor:
        """Summed fp32 cross-entropy of the head's logits for `hidden` (n, hidden_size) against `codes` (n,),
        `chunk` rows of logits at a time (0: all; omni_dist.loss_head.head_cross_entropy). It must not call
        the registered `lm_head` (a nested FSDP forward method would regather per chunk)."""
        ...

    def lm_embed(self, codes: torch.Tensor, /) -> torch.Tensor:
        """Codes (n,) -> input embeddings (n, hidden_size) (generated codes fed back while sampling)."""
        ...

    def lm_generate(self, codes: torch.Tensor, /) -> torch.Tensor:
        """(items, tokens) codes -> the generated items (an image decoder: (items, 3, S, S) in [0, 1])."""
        ...


@runtime_checkable
class Foundation(Protocol):
    """The language model: an HF causal LM built by `AutoModelForCausalLM.from_config` from
    `FOUNDATIONS[name](**config)`, besides the nn.Module API (named_parameters, named_modules).

    `config` is read for hidden_size, vocab_size, num_hidden_layers, num_attention_heads, head_dim (if
    set), `_attn_implementation` (saved and restored around generation) and, for MoE,
    num_experts / num_local_experts, num_experts_per_tok, router_aux_loss_coef; generation builds
    `transformers.DynamicCache(config=config)`. The output of a forward has `.logits` (1, T, vocab),
    `.hidden_states` (with output_hidden_states) and `.router_logits` (with output_router_logits).
    Parallelizing looks its class name up in omni_models.hf_plans (unless the recipe gives a plan), and
    initialisation uses its `_init_weights` when it has one (optional, read with getattr).
    """

    config: Any  # a transformers PretrainedConfig

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding (ids (1, T) -> (1, T, hidden_size)); media features are spliced into its output."""
        ...

    def get_output_embeddings(self) -> nn.Module:
        """The vocabulary head (hidden states (n, hidden_size) -> logits (n, vocab)): the chunked loss head
        (omni_dist.loss_head) reads its `.weight` (vocab, hidden_size) and `.bias` (None: none) and computes
        the labelled positions' logits itself."""
        ...

    def set_attn_implementation(self, attn_implementation: str, /) -> None:
        """Switch the attention backend by name (generation runs plain "sdpa", then restores it)."""
        ...

    def forward(
        self,
        *,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | int | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        sequence_parallel: Any = None,
        visual_pos_masks: torch.Tensor | None = None,
        deepstack_visual_embeds: list | None = None,  # of (rows, hidden) tensors
    ) -> Any:
        """Called as the module (`foundation(**kwargs)`), always by keyword; these are every keyword the
        framework passes (tests/omni_models/test_contracts.py records them).

        Training (OmniModel.forward) passes the packed `inputs_embeds` (1, T, hidden), position_ids, the
        cu_seq_lens / max_length of the packed attention, use_cache=False, sequence_parallel (an
        omni_dist SequenceParallel or None), output_hidden_states=-1 (an index: only the last hidden
        state is returned; HF's `bool | int | list[int]`), logits_to_keep=an empty index tensor (no
        logits: the loss head computes those of the labelled positions) and, for a MoE config whose
        load-balancing loss trains, output_router_logits=True; with an encoder that declares
        `deepstack_layers`, HF Qwen3-VL's visual_pos_masks (1, T) bool and deepstack_visual_embeds (per
        layer, the rows added at the masked positions, in position order). Generation (omni_models.generate) passes
        inputs_embeds, position_ids, use_cache, past_key_values (a DynamicCache, with use_cache=True)
        and output_hidden_states=True (and the prompt's deepstack keywords). HF models take the packed-attention keywords through `**kwargs`."""
        ...
