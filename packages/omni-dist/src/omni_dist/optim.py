"""AdamW whose step can skip itself on the device.

A step with a non-finite loss or gradient norm must not update the weights. Deciding that on the host
means reading the loss and norm between backward and the optimizer step, which idles the GPU. torch's
fused AdamW kernel takes a `found_inf` tensor (the protocol torch.amp.GradScaler uses) and leaves the
parameters, moments and step counts unchanged where it is nonzero, so the decision stays on the device
and the host learns of it when it reads the step's metrics.
"""

from __future__ import annotations

import torch


class SkippingAdamW(torch.optim.AdamW):
    """torch's fused AdamW (CPU and CUDA; DTensor parameters too). `step(skip=...)`: a 0-d tensor on
    the device; nonzero skips the whole update there."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):
        if skip is None:
            return super().step(closure)
        # The fused kernel reads `found_inf` from the optimizer (GradScaler sets it the same way); it is
        # set for this call only.
        self.found_inf = skip.to(torch.float32)
        try:
            return super().step(closure)
        finally:
            del self.found_inf
