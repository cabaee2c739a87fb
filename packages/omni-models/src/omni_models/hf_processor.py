"""A pretrained directory's own HF processor and the settings its call applies to each part.

A family's processor class can put its own defaults over its parts' saved settings at call time
(Qwen2.5-Omni resizes videos to its own pixel bounds, whatever its video processor was saved with); the
data path calls the parts directly, so it takes those settings from transformers' own merge.
"""

from __future__ import annotations

from typing import Any

KWARGS = {"image": "images_kwargs", "video": "videos_kwargs", "audio": "audio_kwargs"}
PARTS = {"image": "image_processor", "video": "video_processor", "audio": "feature_extractor"}


def pretrained_processor(path: str) -> tuple[Any, dict[str, Any]]:
    """(the directory's processor, its call's merged settings: per part under "<part>_kwargs", the
    processor's own, such as Qwen2.5-Omni's seconds_per_chunk, at the top)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    # transformers' own merge of class defaults, saved part settings and tokenizer settings (private,
    # but it is exactly what the processor's __call__ uses)
    return processor, processor._merge_kwargs(
        processor.valid_processor_kwargs, processor.tokenizer.init_kwargs
    )


def pretrained_part(path: str, modality: str) -> tuple[Any, dict[str, Any]]:
    """(the part of the directory's processor for `modality`, the keyword arguments its call passes it)."""
    return processor_part(*pretrained_processor(path), modality, path)


def processor_part(
    processor: Any, merged: dict[str, Any], modality: str, path: str
) -> tuple[Any, dict[str, Any]]:
    """pretrained_part of a processor already loaded (with its merged settings) from `path`."""
    part = getattr(processor, PARTS[modality], None)
    if part is None:
        raise ValueError(f"the processor in {path} ({type(processor).__name__}) has no {PARTS[modality]}")
    return part, {k: v for k, v in merged[KWARGS[modality]].items() if k != "return_tensors"}
