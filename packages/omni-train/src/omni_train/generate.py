"""`omni-train generate`: answers from a trained run, media in, text and images out.

A request is a sample document of the data schema (omni_data.schema). `--prompt` with `--image`,
`--video`, `--audio` makes one (the media before the text, paths relative to the working directory);
`--requests FILE.jsonl` reads one per line as the JSONL source reads them (media by `path`, relative to
the file's directory, or inline base64 in `files`; a line without an id is `<file stem>-<line>`). A
trailing assistant turn is dropped: it is what we generate; `"image_answer": true` on a line starts
its answer with an image.

The conversation goes through the run's ChatProcessor exactly as in training (media -> markers,
placeholders and encoder tensors; a pretrained family's M-RoPE position rows), the chat template's
generation prompt follows, and `model.generate` continues it (omni_models.generate). Answers go to a
JSONL file, generated images to PNG files next to it (`<id>-<k>.png`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from omni_data.collate import collate
from omni_data.processor import Measured
from omni_data.schema import Sample, SampleError, parse_sample
from omni_data.sources import inline_files
from omni_dist.packed import MediaBatch
from omni_models.generate import Generation
from omni_train.assembly import chat_processor
from omni_train.inference import load_trained

log = logging.getLogger("omni_train")

PROMPT_MEDIA = ("image", "video", "audio")  # the order --image/--video/--audio attach to the prompt


class GenerateError(ValueError):
    """A request that cannot be answered; the message says where it came from (file and line)."""


@dataclass(frozen=True)
class Request:
    sample: Sample  # the conversation up to the answer
    where: str  # "--prompt" or "FILE line N", named in errors
    image_answer: bool = False


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128  # generated positions, image tokens included
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    cfg_scale: float | None = None
    seed: int = 0  # each request's generator starts from it: an answer does not depend on its batch
    image_answer: bool = False  # every answer starts with the image start marker


# -- requests -----------------------------------------------------------------------------------------


def _request(doc: Any, where: str, key: str, root: Path, image_answer: bool = False) -> Request:
    files = doc.get("files") if isinstance(doc, Mapping) else None
    try:
        sample = parse_sample(
            doc,
            key=key,
            source="generate",
            media_bytes=inline_files(files),  # as the JSONL source reads them
            read_path=lambda p: (root / p).read_bytes(),  # an absolute p stays absolute
        )
    except SampleError as e:
        raise GenerateError(f"{where}: {e.detail}") from None
    messages = sample.messages
    if messages[-1].role == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1].role != "user":
        raise GenerateError(
            f"{where}: the conversation must end with a user turn (an assistant answer after it is dropped)"
        )
    if any(item.generate for m in messages for item in (p.media for p in m.content) if item is not None):
        raise GenerateError(f'{where}: a generated ("generate": true) media item before the answer')
    return Request(replace(sample, messages=messages), where, image_answer)


def prompt_request(text: str, media: Mapping[str, Sequence[str]]) -> Request:
    """The `--prompt` request: `media[modality]` files (PROMPT_MEDIA order) before the text."""
    content = [{"type": m, "path": str(p)} for m in PROMPT_MEDIA for p in media.get(m, ())]
    doc = {
        "id": "prompt",
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
    }
    return _request(doc, "--prompt", "prompt", Path.cwd())


def read_requests(path: str | Path) -> list[Request]:
    """One request per non-empty line of a JSONL file; a bad line is a GenerateError naming it."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise GenerateError(f"cannot read the requests file: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            doc = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GenerateError(f"{where}: not a JSON document ({e})") from None
        if not isinstance(doc, Mapping):
            raise GenerateError(f"{where}: a {type(doc).__name__}, expected a sample document (an object)")
        image_answer = doc.get("image_answer", False)
        if not isinstance(image_answer, bool):
            raise GenerateError(f"{where}: image_answer is {image_answer!r}, expected true or false")
        out.append(_request(doc, where, f"{path.stem}-{n}", path.parent, image_answer))
    if not out:
        raise GenerateError(f"{path} holds no requests")
    return out


def _file_stem(sample_id: str) -> str:
    return re.sub(r"[^\w.-]", "_", sample_id)


def _check_ids(requests: Sequence[Request]) -> None:
    """Ids name the outputs (and their image files): they must differ."""
    seen: dict[str, Request] = {}
    for r in requests:
        stem = _file_stem(r.sample.id)
        if stem in seen:
            raise GenerateError(
                f"{r.where}: id {r.sample.id!r} names the same outputs as {seen[stem].where}; give each "
                "request its own id"
            )
        seen[stem] = r


# -- answering ----------------------------------------------------------------------------------------


class Answerer:
    """A trained run with its training processor: requests -> prompts -> model.generate."""

    def __init__(self, run_dir: str | Path, step: int | None = None):
        self.model, self.tok, cfg = load_trained(run_dir, step)
        self.processor = chat_processor(self.model, cfg.model_spec, self.tok)
        self.markers = {m: self.processor.marker_ids(m) for m in self.model.modality_decoder}
        self.placeholders = {ids[1] for ids in self.markers.values()}
        self.eos_id = self.tok.eos_token_id
        if self.eos_id is None:
            log.warning("the tokenizer has no eos token: every answer runs to max_new_tokens")

    def measure(self, request: Request) -> Measured:
        """The request tokenized as training tokenizes it (media counted, not decoded): checks it early."""
        for item in request.sample.media():
            if item.modality not in self.processor.media:
                raise GenerateError(
                    f"{request.where}: {item.name!r} is {item.modality!r} media, but the model has no "
                    f"encoder for it (it reads: {', '.join(sorted(self.processor.media)) or 'text only'})"
                )
        try:
            return self.processor.measure(request.sample)
        except SampleError as e:
            raise GenerateError(f"{request.where}: {e.detail}") from None

    def _generation_prompt(self, sample: Sample) -> list[int]:
        """The chat template's generation prompt: its rendering with it, less its rendering without."""
        chat = [
            {"role": m.role, "content": "".join(p.text or "" for p in m.content)} for m in sample.messages
        ]
        bare, full = (
            self.tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=g) for g in (False, True)
        )
        if not full.startswith(bare):
            raise GenerateError("the chat template does not render the generation prompt as a suffix")
        return self.tok(full[len(bare) :], add_special_tokens=False)["input_ids"]

    def answer_start(self, request: Request, image_answer: bool = False) -> list[int]:
        """The answer's forced first tokens: the image start marker for an image answer, else none."""
        if not (image_answer or request.image_answer):
            return []
        if "image" not in self.markers:
            raise GenerateError(
                f"{request.where}: an image answer needs an image decoder; the model has none"
            )
        return [self.markers["image"][0]]

    def prompt(
        self, request: Request, measured: Measured, image_answer: bool = False
    ) -> tuple[torch.Tensor, dict[str, MediaBatch], torch.Tensor | None]:
        """(token ids, media, position ids or None) of the prompt: the processed conversation, the
        generation prompt, and with `image_answer` the image start marker."""
        try:
            processed = self.processor.process(measured)
        except SampleError as e:
            raise GenerateError(f"{request.where}: {e.detail}") from None
        tail = self._generation_prompt(request.sample) + self.answer_start(request, image_answer)
        ids = torch.cat([processed.input_ids, torch.tensor(tail, dtype=torch.long)])
        positions = self.processor.positions(ids, processed.media) if self.processor.positions else None
        return ids, collate([processed]).media, positions

    def answer(self, request: Request, measured: Measured, sampling: Sampling) -> Generation:
        """The generated tokens (and images) of one request."""
        ids, media, positions = self.prompt(request, measured, sampling.image_answer)
        return self.model.generate(
            ids,
            self.markers,
            media,
            max_new_tokens=sampling.max_new_tokens,
            eos_id=self.eos_id,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            cfg_scale=sampling.cfg_scale,
            generator=torch.Generator().manual_seed(sampling.seed),
            position_ids=positions,
        )

    def text(self, tokens: Sequence[int]) -> str:
        """An answer's text: image placeholders left out (the markers show where images are), no final eos."""
        kept = [t for t in tokens if t not in self.placeholders]
        if kept and kept[-1] == self.eos_id:
            kept.pop()
        return self.tok.decode(kept, skip_special_tokens=False)


def save_png(image: torch.Tensor, path: Path) -> None:
    """A (3, H, W) image in [0, 1] as an 8-bit RGB PNG."""
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1).permute(1, 2, 0) * 255).round().byte().cpu().numpy()
    Image.fromarray(pixels).save(path, format="PNG")


def _user_text(sample: Sample) -> str:
    return "".join(p.text or "" for p in sample.messages[-1].content)


def generate_answers(
    run_dir: str | Path,
    requests: Sequence[Request],
    out: str | Path,
    step: int | None = None,
    sampling: Sampling | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Answer every request; each answer is a line of `out` (id, prompt, answer, images) as soon as it
    is made, and is echoed. Every request is checked before the first answer."""
    sampling = sampling or Sampling()
    _check_ids(requests)
    answerer = Answerer(run_dir, step)
    measured = [answerer.measure(r) for r in requests]
    starts = [answerer.answer_start(r, sampling.image_answer) for r in requests]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with open(out, "w") as f:
        for request, m, start in zip(requests, measured, starts, strict=True):
            result = answerer.answer(request, m, sampling)
            sid = request.sample.id
            images = [out.parent / f"{_file_stem(sid)}-{k}.png" for k in range(len(result.images))]
            for image, path in zip(result.images, images, strict=True):
                save_png(image, path)
            record = {
                "id": sid,
                "prompt": _user_text(request.sample),
                "answer": answerer.text(start + result.tokens),  # a forced start marker opens it
                "images": [str(p) for p in images],
            }
            f.write(json.dumps(record) + "\n")
            f.flush()
            records.append(record)
            echo(f"[{sid}] {record['prompt']!r} -> {record['answer']!r}")
            for image, path in zip(result.images, images, strict=True):
                echo(f"    image {image.shape[2]}x{image.shape[1]} -> {path}")
    echo(f"wrote {len(records)} answer(s) to {out}")
    return records
