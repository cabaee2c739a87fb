"""Dtype names as they appear in configs, checked against what the device can train in."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, device_type: str, what: str = "dtype") -> torch.dtype:
    """The torch dtype for `name`; an error when unknown or not usable for training on `device_type`."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        try:
            dtype = DTYPES[name]
        except KeyError:
            raise ValueError(
                f"{what}={name!r} is not a known dtype; use one of {', '.join(DTYPES)}."
            ) from None
    if dtype not in DTYPES.values():
        raise ValueError(f"{what}={dtype} is not supported for training; use float32, bfloat16 or float16.")
    if dtype == torch.bfloat16 and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{what}=bfloat16 but this GPU has no bfloat16 support; use float16 or float32.")
    if device_type == "cpu" and dtype != torch.float32:
        try:  # capability probe: a matmul with a backward, as training needs
            a = torch.ones(2, 2, dtype=dtype, requires_grad=True)
            (a @ a).sum().backward()
        except RuntimeError as e:
            raise ValueError(
                f"{what}={dtype} cannot train on this CPU ({e}); use float32 or bfloat16."
            ) from None
    return dtype
