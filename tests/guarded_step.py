"""The trainer's step (forward_backward over the micro-batches, the global grad-norm clip, the optimizer step
that skips itself on the device) under omni_dist.sync_guard.HostSyncGuard, then the step's one read."""

from __future__ import annotations

import torch

from omni_dist.grad_norm import clip_grad_norm_
from omni_dist.optim import SkippingAdamW
from omni_dist.sync_guard import HostSyncGuard
from omni_train.trainer import forward_backward


def guarded_steps(model, mesh, batches, steps: int, raise_on_sync: bool = True, opt=None) -> dict:
    """`steps` steps on the same micro-batches (with `opt`, default a fresh SkippingAdamW): {"steps": [(loss,
    grad norm, finite)], "events": the syncs the guard saw (raised on instead when `raise_on_sync`)}."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or SkippingAdamW(params, lr=1e-3)
    guard = HostSyncGuard(
        "cpu", host=[t for b in batches for t in b.host_tensors()], raise_on_sync=raise_on_sync
    )
    records = []
    for _ in range(steps):
        with guard:
            result = forward_backward(model, batches, mesh, None, torch.device("cpu"))
            norm = clip_grad_norm_(params, 1.0)
            finite = torch.isfinite(result.loss) & torch.isfinite(norm)
            opt.step(skip=~finite)
            opt.zero_grad(set_to_none=True)
        record, (norm_value, finite_value) = result.read(norm, finite)  # the step's one read, after it
        records.append((record["loss"], norm_value, finite_value))
    return {"steps": records, "events": [(e.op, e.why) for e in guard.events]}
