"""A pretrained family: how a pretrained HF model directory becomes ordinary part specs.

A family turns the directory's HF config into the `model` section a user could have written by hand
(a foundation, encoders, decoders, each with `path` = the directory and its key layout), so plans,
freezing, loading, FSDP and checkpoints treat a pretrained model like any composite. It also gives
what the data side needs to tokenize as the family does: its media markers and, for M-RoPE families,
the per-sample position function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A part spec as in the recipe's `model` section: {"foundation": {...}, "encoders": {...}, "decoders": {...}}
PartSpecs = dict[str, Any]


def processor_dir(path: str) -> str | None:
    """`path` when it holds the model's processor files (a config-only directory does not: the parts
    then build processors from their options)."""
    files = ("processor_config.json", "preprocessor_config.json")  # as transformers 5 / 4 save them
    return path if any((Path(path) / f).is_file() for f in files) else None


@dataclass(frozen=True)
class PretrainedFamily:
    name: str
    # (HF config, directory, **options) -> the part specs; every part trains unless the recipe freezes it
    expand: Callable[..., PartSpecs]
    # modality -> (start marker, placeholder, end marker) tokens of the family's tokenizer
    markers: Mapping[str, tuple[str, str, str]]
    # our module prefix -> the checkpoint's key prefix (loading reads, export writes these keys); the
    # longest matching prefix wins
    layout: Mapping[str, str]
    # HF config -> fn(input_ids (L,), media items) -> (3, L) positions; None for 1-D positions
    positions: Callable[[Any], Callable[..., Any]] | None = None
    # checkpoint key prefixes no part reads (e.g. a speech generator the family does not train)
    ignore: tuple[str, ...] = ()
    # checkpoint key suffixes of tensors a directory may store with their last two dims swapped (loading
    # reads either, by the stored shape, as transformers does; export writes the in-memory layout)
    transposed: tuple[str, ...] = ()
    # fused experts (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)) stored one tensor per
    # expert and projection, as transformers saves Qwen3-Omni's (omni_models.hf_keys.per_expert_keys)
    per_expert: bool = False
    # keys of the recipe's `model` section this family reads (e.g. Qwen2.5-Omni's use_audio_in_video):
    # passed to `expand` by keyword when the recipe sets them
    options: tuple[str, ...] = ()

    def checkpoint_key(self, name: str) -> str | None:
        """The checkpoint key of our qualified tensor name (the longest layout prefix it starts with)."""
        match = max((p for p in self.layout if name.startswith(p)), key=len, default=None)
        return None if match is None else self.layout[match] + name[len(match) :]


@dataclass(frozen=True)
class PretrainedSource:
    """The pretrained directory a model spec came from, and its family."""

    path: str
    family: PretrainedFamily
    hf_config: Any = field(compare=False, repr=False)  # AutoConfig.from_pretrained(path)
