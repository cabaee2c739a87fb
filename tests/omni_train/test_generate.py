"""`omni-train generate` on a tiny trained run (Qwen2-VL vision for image + video, Whisper for audio, a
Janus VQ image decoder): a prompt with media and a requests file are answered into JSONL and PNG
files, each answer equal to model.generate on the prompt the training data path makes; bad requests
fail with a message naming the file (and line)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from omni_data.collate import collate
from omni_data.schema import parse_sample
from omni_train.assembly import chat_processor
from omni_train.cli import app
from omni_train.config import TrainConfig
from omni_train.generate import Answerer, prompt_request
from omni_train.inference import load_trained
from omni_train.local import _rank_entry
from tests.harness import run_ranks
from tests.omni_data.fixtures import png, tokenizer
from tests.omni_models.omni_fixtures import draw_sample, mp4, omni_spec, sample, wav

NEW_TOKENS = 8
DRAWN = 16  # the decoder's image side: VQ's 4 x 4 patches, 2 ** 2 pixels each
MODEL = omni_spec(decoder=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run of a few steps through the trainer, on understanding and drawing samples."""
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("generate")
    tokenizer().save_pretrained(root / "tokenizer")  # + the eos the quickstart tokenizer has
    PreTrainedTokenizerFast.from_pretrained(root / "tokenizer", eos_token="<|im_end|>").save_pretrained(
        root / "tokenizer"
    )
    media = [("image",), ("video",), ("audio",), ("image", "audio"), ()]
    docs = [draw_sample(i) if i % 3 == 0 else sample(i, media[i % len(media)]) for i in range(12)]
    with open(root / "train.jsonl", "w") as f:
        for doc, files in docs:
            b64 = {k: base64.b64encode(v).decode() for k, v in files.items()}
            f.write(json.dumps({**doc, "files": b64}) + "\n")
    cfg = {
        "model": MODEL,
        "data": {
            "tokenizer": str(root / "tokenizer"),
            "sources": [{"kind": "jsonl", "paths": str(root / "train.jsonl")}],
            "max_tokens": 256,
        },
        # a small lr keeps the weights near their random init, whose greedy answers run on and differ
        # from prompt to prompt (a few steps at a real lr learn to stop at once: empty answers)
        "train": {"steps": 2, "lr": 1e-5},
        "checkpoint": {"async_save": False},
        "logging": {"run_dir": str(root / "run"), "console": "none", "tensorboard": False},
    }
    config = TrainConfig.model_validate(cfg).model_dump(mode="json")
    run_ranks(_rank_entry, 1, config, init_process_group=False)
    return root / "run"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "media").mkdir()
    files = {"media/img.png": png(24, 16, 5), "media/clip.mp4": mp4(3, 6), "sound.wav": wav(0.3, 7)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def trained(run_dir):
    model, tok, cfg = load_trained(run_dir)
    return model, tok, chat_processor(model, cfg.model_spec, tok)


def _direct(trained, content: list, files: dict[str, bytes], image_answer: bool = False):
    """model.generate on the prompt made by hand through the training data path (media inline)."""
    model, tok, proc = trained
    doc = {"id": "d", "messages": [{"role": "user", "content": content}]}
    sample = parse_sample(doc, key="d", source="t", media_bytes=files.get, read_path=None)
    processed = proc.process(proc.measure(sample))
    tail = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    if image_answer:
        tail.append(tok.convert_tokens_to_ids("<|image_start|>"))
    ids = torch.cat([processed.input_ids, torch.tensor(tail)])
    markers = {"image": proc.marker_ids("image")}
    batch = collate([processed])
    result = model.generate(ids, markers, batch.media, max_new_tokens=NEW_TOKENS, eos_id=tok.eos_token_id)
    kept = tail[-1:] if image_answer else []  # the forced start marker opens the answer
    kept += [t for t in result.tokens if t != markers["image"][1]]
    text = tok.decode(kept[:-1] if kept[-1] == tok.eos_token_id else kept, skip_special_tokens=False)
    return ids, batch.media, text, result.images


def _user(*parts: tuple[str, str], text: str) -> list[dict]:
    return [*({"type": t, "media": name} for t, name in parts), {"type": "text", "text": text}]


def test_prompt_and_requests_are_answered_as_model_generate_answers(run_dir, trained, media_dir, tmp_path):
    m = media_dir
    requests = m / "requests.jsonl"
    look = [{"type": "image", "path": "media/img.png"}, {"type": "text", "text": "what is in this picture"}]
    listen = [
        {"type": "video", "path": "media/clip.mp4"},
        {"type": "audio", "path": str(m / "sound.wav")},  # absolute
        {"type": "text", "text": "describe"},
    ]
    lines = [
        # the trailing assistant turn is dropped: the answer is generated
        {
            "id": "look",
            "messages": [{"role": "user", "content": look}, {"role": "assistant", "content": "a cat"}],
        },
        {"id": "listen", "messages": [{"role": "user", "content": listen}]},
        {"id": "draw", "image_answer": True, "messages": [{"role": "user", "content": "draw two"}]},
    ]
    requests.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "answers" / "gen.jsonl"
    media = {"image": m / "media/img.png", "video": m / "media/clip.mp4", "audio": m / "sound.wav"}
    argv = ["generate", str(run_dir), "--prompt", "describe this video", "--requests", str(requests)]
    for kind in ("audio", "image", "video"):  # attached in the order image, video, audio whatever the argv
        argv += [f"--{kind}", str(media[kind])]
    argv += ["--out", str(out), "--max-new-tokens", str(NEW_TOKENS)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(records) == ["prompt", "look", "listen", "draw"]
    for r in records.values():
        assert f"[{r['id']}] {r['prompt']!r} -> {r['answer']!r}" in result.output

    files = {path.name: path.read_bytes() for path in media.values()}
    expected = {
        "prompt": (
            _user(*((k, p.name) for k, p in media.items()), text="describe this video"),
            "describe this video",
        ),
        "look": (_user(("image", "img.png"), text="what is in this picture"), "what is in this picture"),
        "listen": (_user(("video", "clip.mp4"), ("audio", "sound.wav"), text="describe"), "describe"),
    }
    for key, (content, prompt) in expected.items():
        ids, direct_media, text, _ = _direct(trained, content, files)
        assert text  # a prompt-dependent answer, not an immediate end of turn
        assert records[key] == {"id": key, "prompt": prompt, "answer": text, "images": []}

    # the --prompt's processed prompt is the training path's, token for token and tensor for tensor
    answerer = Answerer(run_dir)
    request = prompt_request("describe this video", {k: [v] for k, v in media.items()})
    got_ids, got_media, positions = answerer.prompt(request, answerer.measure(request))
    ids, direct_media, _, _ = _direct(trained, expected["prompt"][0], files)
    assert torch.equal(got_ids, ids) and positions is None
    assert set(got_media) == set(direct_media) == {"image", "video", "audio"}
    for k, batch in direct_media.items():
        for name, tensor in batch.tensors.items():
            torch.testing.assert_close(got_media[k].tensors[name], tensor, rtol=0, atol=0)
        assert torch.equal(got_media[k].positions, batch.positions)

    # a drawn answer: the image start marker opens it; its PNG holds model.generate's image
    _, _, text, images = _direct(trained, "draw two", {}, image_answer=True)
    assert records["draw"]["answer"] == text and text.startswith("<|image_start|><|image_end|>")
    assert len(records["draw"]["images"]) == len(images) >= 1
    for k, (path, image) in enumerate(zip(records["draw"]["images"], images, strict=True)):
        assert path == str(out.parent / f"draw-{k}.png")
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (DRAWN, DRAWN)
            expected_pixels = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().byte()
            assert torch.equal(torch.from_numpy(np.array(im.convert("RGB"))), expected_pixels)


def test_bad_requests_name_the_file_and_line(run_dir, tmp_path):
    runner = CliRunner()
    missing = tmp_path / "nowhere.png"
    result = runner.invoke(app, ["generate", str(run_dir), "--prompt", "describe", "--image", str(missing)])
    assert result.exit_code == 2 and str(missing) in result.output, result.output

    requests = tmp_path / "requests.jsonl"
    good = {"id": "a", "messages": [{"role": "user", "content": "hi"}]}
    requests.write_text(json.dumps(good) + "\n{not json\n")
    result = runner.invoke(app, ["generate", str(run_dir), "--requests", str(requests)])
    assert result.exit_code == 2 and f"{requests} line 2: not a JSON document" in result.output, result.output

    (tmp_path / "x.bin").write_bytes(b"0")
    speech = {"id": "s", "messages": [{"role": "user", "content": [{"type": "speech", "path": "x.bin"}]}]}
    requests.write_text(json.dumps(good) + "\n" + json.dumps(speech) + "\n")
    result = runner.invoke(app, ["generate", str(run_dir), "--requests", str(requests)])
    assert result.exit_code == 2, result.output
    assert (
        f"{requests} line 2: 'x.bin' is 'speech' media, but the model has no encoder for it" in result.output
    )
    assert not (run_dir / "generations.jsonl").exists()  # checked before any answer
