"""The loss head's peak memory and time on CPU: all logits at once vs `train.loss_chunk` positions at a time.

    uv run python bench/loss_head.py [--vocab 152064] [--rows 8192] [--large-rows 16384] [--hidden 512]
                                     [--chunk 256] [--check-rows 2048]

Each variant runs forward + backward of the summed cross-entropy through an LM head (a linear layer of
vocab x hidden, fp32) in a fresh process; its peak is the process's peak resident memory (ru_maxrss) less
its resident memory once the inputs exist, measured, not estimated. Prints one JSON object with the
ratios chunked / all logits (memory and time) and the largest difference of loss and gradients at
`--rows`, and the chunked path's own peak and time at `--large-rows`.
All logits at 16K rows need ~28 GiB (logits, their log-softmax and its gradient at 152K x 16K x 4 B each),
more than this 23 GB machine has. For `--large-rows` both paths also run under torch's MemTracker (the
peak of live tensor bytes, by op) on fake tensors (FakeTensorMode: every op and autograd buffer of the
real program, no storage); at `--check-rows` they run under it on real and on fake tensors, which must
agree, so the fake run's peak is that of the real program.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import resource
import time

import torch


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def _variant(args: dict, chunk: int, out: mp.Queue) -> None:
    from omni_dist.loss_head import head_cross_entropy

    torch.set_num_threads(args["threads"])
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args["hidden"], args["vocab"], bias=False)
    torch.nn.init.normal_(head.weight, std=0.02, generator=gen)
    hidden = torch.randn(args["rows"], args["hidden"], generator=gen).requires_grad_(True)
    targets = torch.randint(args["vocab"], (args["rows"],), generator=gen)
    head.weight.grad = torch.zeros_like(head.weight)  # the gradient buffer exists in training too
    base = _rss_kb()
    t0 = time.perf_counter()
    loss = head_cross_entropy(head, hidden, targets, chunk)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.put(
        {
            "peak_gb": (peak - base) / 2**20,
            "seconds": seconds,
            "loss": loss.item(),
            "grad_hidden": hidden.grad[:64].numpy().copy(),  # by value: the process ends
            "grad_weight": head.weight.grad[:64].numpy().copy(),
        }
    )


def _tracked(args: dict, rows: int, fake: bool, chunk: int, out: mp.Queue) -> None:
    """MemTracker's peak of live tensor bytes above the inputs (head weight and its gradient, hidden
    states, targets), on real or fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from omni_dist.loss_head import head_cross_entropy

    torch.set_num_threads(args["threads"])
    with FakeTensorMode() if fake else contextlib.nullcontext():
        head = torch.nn.Linear(args["hidden"], args["vocab"], bias=False)
        hidden = torch.randn(rows, args["hidden"]).requires_grad_(True)
        targets = torch.randint(args["vocab"], (rows,))
        head.weight.grad = torch.zeros_like(head.weight)
        inputs = 2 * head.weight.nbytes + hidden.nbytes + targets.nbytes
        tracker = MemTracker()
        tracker.track_external(head, hidden)
        with tracker:
            head_cross_entropy(head, hidden, targets, chunk).backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    out.put({"peak_gb": (peak - inputs) / 2**30})


def _run(args: dict, chunk: int, target=_variant, *extra) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(args, *extra, chunk, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--large-rows", type=int, default=16384)
    ap.add_argument("--check-rows", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = vars(ap.parse_args())
    full, chunked = _run(args, 0), _run(args, args["chunk"])
    large = _run({**args, "rows": args["large_rows"]}, args["chunk"])
    paths = {"all_logits": 0, "chunked": args["chunk"]}

    def tracked(rows: int, fake: bool) -> dict:
        return {name: round(_run(args, c, _tracked, rows, fake)["peak_gb"], 3) for name, c in paths.items()}

    check, big = args["check_rows"], args["large_rows"]
    memtracker = {
        "real": {check: tracked(check, False)},
        "fake": {check: tracked(check, True), big: tracked(big, True)},
    }
    err = max(
        abs(chunked["loss"] - full["loss"]) / abs(full["loss"]),
        *(
            float(abs(chunked[k] - full[k]).max() / abs(full[k]).max())
            for k in ("grad_hidden", "grad_weight")
        ),
    )
    print(
        json.dumps(
            {
                **{k: v for k, v in args.items()},
                "logits_gb": args["rows"] * args["vocab"] * 4 / 2**30,
                "all_logits": {"peak_gb": round(full["peak_gb"], 3), "seconds": round(full["seconds"], 2)},
                "chunked": {"peak_gb": round(chunked["peak_gb"], 3), "seconds": round(chunked["seconds"], 2)},
                "memory_ratio": round(chunked["peak_gb"] / full["peak_gb"], 4),
                "time_ratio": round(chunked["seconds"] / full["seconds"], 3),
                "max_rel_diff": err,
                f"chunked_at_{args['large_rows']}_rows": {
                    "peak_gb": round(large["peak_gb"], 3),
                    "seconds": round(large["seconds"], 2),
                },
                "memtracker_gib": memtracker,
                f"memtracker_memory_ratio_at_{big}_rows": round(
                    memtracker["fake"][big]["chunked"] / memtracker["fake"][big]["all_logits"], 4
                ),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
