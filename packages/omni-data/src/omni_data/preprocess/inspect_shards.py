"""`omni-data inspect`: counts, token percentiles per modality, sizes, errors, and length histograms."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from omni_data.sources import WebDatasetSource

PERCENTILES = (50, 90, 99, 100)


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    v = sorted(values)
    return {f"p{p}": v[min(len(v) - 1, (len(v) * p) // 100)] for p in PERCENTILES}


def collect(path: str) -> dict[str, Any]:
    """Statistics of a preprocessed directory (its index) or of any WebDataset shards (a scan)."""
    root = Path(path)
    rows: list[dict[str, Any]]
    if (root / "index.parquet").exists():
        rows = pq.read_table(root / "index.parquet").to_pylist()
    else:
        shards = str(root / "*.tar") if root.is_dir() else str(root)
        src = WebDatasetSource("inspect", shards)
        rows = []
        for shard in src.shards():
            for rec in src.read(shard):
                if rec.sample is None:
                    continue
                tokens = rec.sample.known_tokens()
                media = {k: v for k, v in tokens.items() if k != "text"}
                rows.append(
                    {
                        "source": rec.sample.source,
                        "llm_tokens": None,
                        "text_tokens": tokens.get("text"),
                        "media_tokens": json.dumps(media) if media else None,
                        "bytes": sum(len(m.data) for m in rec.sample.media()),
                        "media_items": len(rec.sample.media()),
                    }
                )
    per_modality: dict[str, list[int]] = {}
    for r in rows:
        for modality, items in json.loads(r["media_tokens"] or "{}").items():
            per_modality.setdefault(modality, []).extend(int(t[0]) for t in items)
    errors: Counter = Counter()
    if (root / "errors.jsonl").exists():
        errors.update(json.loads(line)["reason"] for line in (root / "errors.jsonl").read_text().splitlines())
    return {
        "samples": len(rows),
        "sources": dict(Counter(r["source"] for r in rows)),
        "llm_tokens": _percentiles([r["llm_tokens"] for r in rows if r["llm_tokens"] is not None]),
        "text_tokens": _percentiles([r["text_tokens"] for r in rows if r["text_tokens"] is not None]),
        "media_tokens": {m: _percentiles(v) for m, v in sorted(per_modality.items())},
        "media_items": sum(r["media_items"] for r in rows),
        "sample_bytes": _percentiles([r["bytes"] for r in rows]),
        "errors": dict(errors),
        "_hist": {
            "LLM tokens per sample": [r["llm_tokens"] for r in rows if r["llm_tokens"] is not None],
            **{f"{m} tokens per item": v for m, v in per_modality.items()},
        },
    }


def plot(hists: dict[str, list[int]], out: str, bins: int = 30) -> None:
    """Histograms drawn with Pillow, one panel per series, into a PNG."""
    from PIL import Image, ImageDraw

    series = [(k, v) for k, v in hists.items() if v]
    w, h, pad = 420, 220, 30
    img = Image.new("RGB", (w, max(1, len(series)) * h), "white")
    draw = ImageDraw.Draw(img)
    for row, (title, values) in enumerate(series):
        top = row * h
        lo, hi = min(values), max(values)
        width = max(1, (hi - lo + bins) // bins)
        counts = Counter((v - lo) // width for v in values)
        peak = max(counts.values())
        bar = (w - 2 * pad) / bins
        for b in range(bins):
            height = (h - 2 * pad) * counts.get(b, 0) / peak
            x0 = pad + b * bar
            draw.rectangle([x0, top + h - pad - height, x0 + bar - 1, top + h - pad], fill=(60, 110, 200))
        draw.text((pad, top + 6), f"{title} (n={len(values)}, max count {peak})", fill="black")
        draw.text((pad, top + h - pad + 4), str(lo), fill="black")
        draw.text((w - pad - 40, top + h - pad + 4), str(hi), fill="black")
    img.save(out)
