"""Processor parity: for the same conversation, our data path gives the input ids, pixel values, grids,
audio features (and the seconds per temporal patch of videos) that the family's own `AutoProcessor`
gives: its chat template on the structured conversation, placeholders expanded, images, videos and audio
through its image processor, video processor (frames sampled by it at the same fps) and feature extractor."""

from __future__ import annotations

import io

import pytest
import soundfile as sf
import torch
from transformers import AutoProcessor, AutoTokenizer

from omni_models.config import OmniModelConfig
from omni_models.media import video_audio
from omni_train.assembly import chat_processor, meta_model
from tests.omni_models.hf_dirs import qwen_vl_dir
from tests.omni_models.hf_families import processed, vl_sample
from tests.omni_models.omni_fixtures import mp4

PROCESSORS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen2_5_omni": "Qwen2_5OmniProcessor",
    "janus": "JanusProcessor",
    "qwen3_vl": "Qwen3VLProcessor",  # videos laid out with their frames' timestamps
}
MEDIA = {"janus": ("image",), "qwen2_5_omni": ("image", "video", "audio")}
FPS = 2.0  # the vision encoder's default video_fps: the rate HF is asked to sample at too
# Per modality: HF's tensor names for (features, grid)
KEYS = {
    "image": ("pixel_values", "image_grid_thw"),
    "video": ("pixel_values_videos", "video_grid_thw"),
    "audio": ("input_features", "feature_attention_mask"),
}


def _docs(family: str) -> list[tuple[dict, dict]]:
    kinds = MEDIA.get(family, ("image", "video"))
    docs = [vl_sample(0, kinds[:1], (16, 8)), vl_sample(1, (*kinds, *kinds[:1]), (50, 37)), vl_sample(2, ())]
    if "video" in kinds:  # 7 frames at 4 fps: sampling at 2 fps takes 4 frames, 2.29 per second
        doc, files = vl_sample(3, ("video",))
        docs.append((doc, {**files, "0.mp4": mp4(7, 5)}))
    return docs


def _av_docs() -> list[tuple[dict, dict]]:
    """Videos with audio tracks (3 s: their tokens and the audio's alternate in 2 s chunks), beside an
    image and a standalone audio, and text only."""
    return [vl_sample(0, ("av",)), vl_sample(1, ("image", "av", "audio")), vl_sample(2, ())]


def _hf_reference(hf, doc: dict, files: dict, media_dir, audio_in_video: bool = False) -> dict:
    """What the family's processor makes of `doc`: its chat template on the structured conversation,
    then the processor call with the images (transformers' `load_image`), the videos (every frame and the
    metadata, from transformers' `load_video` with its PyAV backend; the processor samples them at FPS)
    and the audio waveforms (16 kHz files, read as they are). `apply_chat_template` with video paths would
    decode with torchcodec, which is not installed. `audio_in_video`: each video's audio track (decoded
    by our PyAV reader: HF's own needs torchcodec) is handed over as the audio of that video
    (`audio_from_video_indices`), and HF lays it out with the frames (`load_audio_from_video`)."""
    from transformers.image_utils import load_image
    from transformers.video_utils import load_video

    conversation, media = [], {"image": [], "video": [], "audio": []}
    sources = []  # per audio, in text order: the video it comes from, or None
    for m in doc["messages"]:
        content = m["content"]
        if isinstance(content, list):
            for p in content:
                if p["type"] == "text":
                    continue
                file = media_dir / f"{doc['id']}-{p['media']}"
                file.write_bytes(files[p["media"]])
                if p["type"] == "image":
                    media["image"].append(load_image(str(file)))
                elif p["type"] == "video":
                    media["video"].append(load_video(str(file), backend="pyav"))
                    if audio_in_video:
                        media["audio"].append(video_audio(files[p["media"]], 16000).numpy())
                        sources.append(len(media["video"]) - 1)
                else:
                    media["audio"].append(sf.read(io.BytesIO(files[p["media"]]), dtype="float32")[0])
                    sources.append(None)
            content = [p if p["type"] == "text" else {"type": p["type"]} for p in content]
        conversation.append({"role": m["role"], "content": content})
    kwargs = {"images": media["image"] or None}
    if media["video"]:
        kwargs |= {
            "videos": [v for v, _ in media["video"]],
            "video_metadata": [md for _, md in media["video"]],
        }
        kwargs |= {"do_sample_frames": True, "fps": FPS}
    if media["audio"]:
        kwargs |= {"audio": media["audio"], "sampling_rate": 16000}
    if audio_in_video:
        kwargs |= {"audio_from_video_indices": sources, "load_audio_from_video": True}
    text = hf.apply_chat_template(conversation, tokenize=False)
    return hf(text=[text], **kwargs, return_tensors="pt")


# (family, use_audio_in_video): Qwen2.5-Omni once more with each video's audio track interleaved
CASES = [(f, False) for f in sorted(PROCESSORS)] + [("qwen2_5_omni", True)]


@pytest.mark.parametrize("family,audio_in_video", CASES)
def test_data_path_equals_the_familys_auto_processor(tmp_path, family, audio_in_video):
    path = qwen_vl_dir(tmp_path, family)
    options = {"use_audio_in_video": True} if audio_in_video else {}
    spec = OmniModelConfig.from_dict({"pretrained": str(path), **options})
    ours_proc = chat_processor(meta_model(spec), spec, AutoTokenizer.from_pretrained(path))
    hf = AutoProcessor.from_pretrained(path)
    assert type(hf).__name__ == PROCESSORS[family]
    media_dir = tmp_path / "media"
    media_dir.mkdir()
    docs = _av_docs() if audio_in_video else _docs(family)
    compared = set()
    for (doc, files), ours in zip(docs, processed(ours_proc, docs), strict=True):
        want = _hf_reference(hf, doc, files, media_dir, audio_in_video)
        assert ours.input_ids.tolist() == want["input_ids"][0].tolist(), doc["id"]
        for kind, (feats, grid) in KEYS.items():
            items = [m for m in ours.media if m.modality == kind]
            if not items:
                assert want.get(feats) is None or len(want[feats]) == 0, (doc["id"], kind)
                continue
            compared.add(kind)
            if kind == "audio":  # HF pads each item to the extractor's window; its mask gives the length
                lens = want[grid].sum(-1)
                assert [int(m.tensors["feature_lens"]) for m in items] == lens.tolist()
                for m, f, n in zip(items, want[feats], lens.tolist(), strict=True):
                    torch.testing.assert_close(m.tensors["input_features"], f[:, :n].T, rtol=0, atol=0)
                continue
            got = torch.cat([m.tensors["pixel_values"] for m in items])
            torch.testing.assert_close(got, want[feats], rtol=0, atol=0)
            if kind == "image" and family == "janus":
                continue  # a fixed-size image: no grid
            assert torch.cat([m.tensors["grid_thw"] for m in items]).tolist() == want[grid].tolist()
            seconds = want.get("second_per_grid_ts", want.get("video_second_per_grid"))
            if kind == "video" and seconds is not None:
                got = torch.cat([m.tensors["second_per_grid_ts"] for m in items]).tolist()
                assert got == pytest.approx(torch.as_tensor(seconds).tolist()), doc["id"]
        assert (ours.labels != -100).any()  # the answer is trained
    assert compared == set(MEDIA.get(family, ("image", "video")))
