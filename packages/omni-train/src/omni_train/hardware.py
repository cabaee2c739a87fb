"""Peak dense FLOP/s of the device, for MFU (None where there is no meaningful peak, e.g. CPU)."""

from __future__ import annotations

import torch

# bf16/fp16 dense tensor-core peaks (no sparsity), by a substring of the device name.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in _PEAK_BF16.items() if k in name), None)
    if peak is None:
        return None
    return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2  # tf32 is half the bf16 rate


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process peak RSS
