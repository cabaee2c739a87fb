"""The closing summary reads what a run learned from metrics.jsonl: each part's mean loss over the first
and the last steps (a resumed run's records replacing the ones it redid) and the last evaluation."""

from __future__ import annotations

import json

from omni_train.metrics import closing_summary


def test_closing_summary_means_by_part_and_the_last_eval(tmp_path):
    records = [
        {"step": s, "loss": 10.0 - s, "loss_text": 5.0 - s / 10, "loss_image_gen": None} for s in range(1, 6)
    ]
    records += [{"step": 3, "eval/loss": 2.0, "eval/loss_text": 1.5}]
    records += [
        {"step": s, "loss": 1.0, "loss_text": 0.5, "loss_image_gen": 4.0} for s in (4, 5)
    ]  # resumed at 3
    records += [{"step": 5, "eval/loss": 1.25, "eval/loss_text": 0.75, "eval/loss_image_gen": 3.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = closing_summary(tmp_path, window=2)
    assert lines == [
        "mean loss by part, steps 1-2 -> 4-5:",
        "  all parts    8.5000 -> 1.0000",
        "  image_gen    n/a -> 4.0000",
        "  text         4.8500 -> 0.5000",
        "eval at step 5: loss 1.2500 (text 0.7500, image_gen 3.5000)",
    ]
    assert closing_summary(tmp_path / "missing") == []
