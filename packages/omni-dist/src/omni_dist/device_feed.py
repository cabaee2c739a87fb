"""Micro-batches onto the device ahead of their use.

On CUDA, batch i+1 is copied on a side stream while batch i computes (its tensors come pinned from the
loader, so the copies are asynchronous and overlap the compute); the compute stream waits for the copy
by an event, never the host. Elsewhere the batches are simply moved in turn.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from omni_dist.packed import PackedBatch


class DeviceFeed:
    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batches: Sequence[PackedBatch]) -> Iterator[PackedBatch]:
        if self.stream is None:
            yield from (b.to(self.device) for b in batches)
            return
        ahead = self._issue(batches[0]) if batches else None
        for i in range(len(batches)):
            moved, copied = ahead
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for t in moved.device_tensors():
                t.record_stream(compute)  # allocated on the side stream, used on this one
            ahead = self._issue(batches[i + 1]) if i + 1 < len(batches) else None
            yield moved

    def _issue(self, batch: PackedBatch) -> tuple[PackedBatch, torch.cuda.Event]:
        with torch.cuda.stream(self.stream):
            moved = batch.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return moved, done
