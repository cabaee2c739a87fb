"""The data path tokenizes a conversation as the family's own processor does: the model's chat template
rendering structured content (`{"type": "image"}` -> `<|vision_start|><|image_pad|><|vision_end|>`), then
each image's placeholder expanded to the image processor's token count (what `Qwen2VLProcessor` does),
with the same pixel values and grids. (Videos and `AutoProcessor` itself need torchvision, not installed.)"""

from __future__ import annotations

import shutil

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from omni_models.config import OmniModelConfig
from omni_models.media import open_image
from omni_train.assembly import chat_processor, meta_model
from tests.omni_models.hf_families import processed, qwen_vl_dir, vl_sample

# The structure of Qwen2-VL's own chat template: a default system turn, string or structured content,
# media as marker + placeholder + marker.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hf_tokens(tok, image_processor, doc, files) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    """What the family's processor makes of `doc`: the template on structured content, each image's
    placeholder repeated by its token count, and the image processor's tensors."""
    messages, pixels, grids = [], [], []
    for m in doc["messages"]:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": p["type"]}
                for p in content
            ]
            for p in m["content"]:
                if p["type"] == "image":
                    out = image_processor(images=[open_image(files[p["media"]])], return_tensors="pt")
                    pixels.append(out["pixel_values"])
                    grids.append(out["image_grid_thw"])
        messages.append({"role": m["role"], "content": content})
    text = tok.apply_chat_template(messages, tokenize=False)
    merge = image_processor.merge_size**2
    pieces = text.split("<|image_pad|>")
    expanded = pieces[0] + "".join(
        "<|image_pad|>" * int(g.prod() // merge) + rest for g, rest in zip(grids, pieces[1:], strict=True)
    )
    return tok(expanded, add_special_tokens=False)["input_ids"], pixels, grids


def test_conversations_tokenize_as_the_familys_processor(tmp_path):
    path = tmp_path / "qwen2_vl_template"
    shutil.copytree(qwen_vl_dir(tmp_path), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = QWEN_VL_TEMPLATE
    tok.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    spec = OmniModelConfig.from_dict({"pretrained": str(path)})
    proc = chat_processor(meta_model(spec), spec, tok)
    hf_images = AutoImageProcessor.from_pretrained(path)
    docs = [vl_sample(0, ("image",), (16, 8)), vl_sample(1, ("image", "image"), (50, 37)), vl_sample(2, ())]
    for (doc, files), ours in zip(docs, processed(proc, docs), strict=True):
        ids, pixels, grids = _hf_tokens(tok, hf_images, doc, files)
        assert ours.input_ids.tolist() == ids
        images = [m for m in ours.media if m.modality == "image"]
        assert len(images) == len(pixels)
        for m, px, grid in zip(images, pixels, grids, strict=True):
            torch.testing.assert_close(m.tensors["pixel_values"], px, rtol=0, atol=0)
            torch.testing.assert_close(m.tensors["grid_thw"], grid, rtol=0, atol=0)
        assert (ours.labels != -100).any()  # the answer is trained
        assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
