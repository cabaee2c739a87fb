"""Held-out evaluation of a quickstart run: what the trained model answers about digits it never saw.

    uv run python apps/quickstart/evaluate.py runs/quickstart [--data data/quickstart]

Asks the run (greedy, through `omni-train generate`'s answerer: the training processor) every request of
DATA/raw/heldout.jsonl (digit scans and DTMF recordings no training sample uses) and scores the answers:
image QA by the digit named, video QA by position, audio QA by dialed digit, arithmetic by the answer.
"Draw the digit N." is asked for every N, greedy and sampled; a digit classifier fitted on the training
scans (digits.py) reads the drawings. Prints a table with chance levels and a few examples, writes
RUN_DIR/heldout.json and the drawings as one grid (RUN_DIR/draw_grid.png: a row per digit, greedy first).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_train.generate import Answerer, Sampling, prompt_request, read_requests, save_png

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits.py beside this file
from digits import DigitClassifier, to_scan

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SAMPLED = 3  # sampled drawings per digit, besides the greedy one


def _digits(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w in WORDS]


def _score(task: str, truth: str, answer: str) -> tuple[int, int]:
    """(correct, counted) units of one answer: the digit (image), positions (video), digits dialed
    (audio), the answer word (arithmetic)."""
    if task == "image_qa":
        return int(_digits(answer)[:1] == _digits(truth)), 1
    if task in ("video_qa", "audio_qa"):
        want, got = _digits(truth), _digits(answer)
        return sum(a == b for a, b in zip(want, got, strict=False)), len(want)
    words = re.findall(r"[a-z]+", answer.lower())
    return int(words[:1] == [truth]), 1


def _chance(task: str, truths: list[str]) -> float:
    if task == "text_qa":  # always giving the most common answer
        return Counter(truths).most_common(1)[0][1] / len(truths)
    return 0.1


def evaluate(run_dir: str | Path, data: str | Path, sampled: int = SAMPLED, echo=print) -> dict[str, Any]:
    run_dir, data = Path(run_dir), Path(data)
    t0 = time.perf_counter()
    manifest = data / "raw" / "heldout.jsonl"
    truths = {d["id"]: d for d in map(json.loads, manifest.read_text().splitlines())}
    answerer = Answerer(run_dir)
    greedy = Sampling(max_new_tokens=16)
    by_task: dict[str, dict[str, Any]] = {}
    for request in read_requests(manifest):
        doc = truths[request.sample.id]
        truth = doc["messages"][-1]["content"]
        answer = answerer.text(answerer.answer(request, answerer.measure(request), greedy).tokens)
        task = by_task.setdefault(doc["source"], {"correct": 0, "counted": 0, "truths": [], "examples": []})
        ok, n = _score(doc["source"], truth, answer)
        task["correct"] += ok
        task["counted"] += n
        task["truths"].append(truth)
        if len(task["examples"]) < 3:
            task["examples"].append({"id": doc["id"], "truth": truth, "answer": answer})
    results: dict[str, Any] = {
        task: {
            "accuracy": t["correct"] / t["counted"],
            "correct": t["correct"],
            "of": t["counted"],
            "chance": _chance(task, t["truths"]),
            "examples": t["examples"],
        }
        for task, t in sorted(by_task.items())
    }
    if "image" in answerer.markers:
        results["draw"] = _draw(answerer, run_dir, sampled)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (run_dir / "heldout.json").write_text(json.dumps(results, indent=2) + "\n")
    echo(table(results))
    return results


def _draw(answerer: Answerer, run_dir: Path, sampled: int) -> dict[str, Any]:
    """Each digit drawn greedily and `sampled` times (temperature 1, top-k 20), read by the classifier."""
    classifier = DigitClassifier()
    rows, read = [], {"greedy": [], "sampled": []}
    for d, word in enumerate(WORDS):
        request = prompt_request(f"Draw the digit {word}.", {})
        row = []
        tokens = answerer.model.decoders["image_gen"].tokens + 2  # the image, its end marker, eos
        for k in range(1 + sampled):
            mode = Sampling(max_new_tokens=tokens, image_answer=True)
            if k:
                mode = replace(mode, temperature=1.0, top_k=20, seed=k)
            images = answerer.answer(request, answerer.measure(request), mode).images
            image = images[0] if images else torch.zeros(3, 32, 32)
            row.append(image)
            guess = int(classifier.predict(to_scan(image.numpy())[None])[0])
            read["greedy" if k == 0 else "sampled"].append(guess == d)
        rows.append(torch.cat(row, dim=2))
    save_png(torch.cat(rows, dim=1), run_dir / "draw_grid.png")
    return {mode: {"accuracy": float(np.mean(v)), "of": len(v)} for mode, v in read.items()} | {
        "chance": 0.1,
        "grid": str(run_dir / "draw_grid.png"),
    }


def table(results: dict[str, Any]) -> str:
    names = {
        "image_qa": "image QA (digit)",
        "video_qa": "video QA (per position)",
        "audio_qa": "audio QA (per digit)",
        "text_qa": "arithmetic (answer)",
    }
    lines = [f"{'task':<28}{'held-out':>18}{'chance':>9}"]
    for task, name in names.items():
        if task in results:
            r = results[task]
            lines.append(f"{name:<28}{r['correct']:>6}/{r['of']:<4} {r['accuracy']:>6.1%}{r['chance']:>9.0%}")
    if "draw" in results:
        for mode in ("greedy", "sampled"):
            r = results["draw"][mode]
            lines.append(f"{'draw digit (' + mode + ')':<28}{'':>11}{r['accuracy']:>6.1%}{0.1:>9.0%}")
    for task in names:
        for e in results.get(task, {}).get("examples", [])[:1]:
            lines.append(f"  {task} {e['id']}: {e['answer']!r} (truth {e['truth']!r})")
    if "draw" in results:
        lines.append(f"drawings: {results['draw']['grid']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument(
        "--data", default="data/quickstart", help="the quickstart dataset (its raw/heldout.jsonl)"
    )
    ap.add_argument("--sampled", type=int, default=SAMPLED, help="sampled drawings per digit")
    args = ap.parse_args()
    evaluate(args.run_dir, args.data, args.sampled)


if __name__ == "__main__":
    main()
