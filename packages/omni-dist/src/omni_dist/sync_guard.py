"""Find what makes the host wait on the device inside a training step.

`HostSyncGuard` is a TorchDispatchMode that records (or raises on) every op that forces a host sync:
- ops whose result the host must read: `.item()` / `float(t)` / `bool(t)` (aten's `_local_scalar_dense`),
  `equal`, `is_nonzero` (torch tags them `data_dependent_output`); `.tolist()` reads a CPU tensor without
  dispatching, so only a CUDA run sees it (as the copy to the host);
- ops whose output size depends on the data: `nonzero`, `masked_select`, `unique`, boolean indexing,
  `repeat_interleave` without `output_size` (tagged `dynamic_output_shape`);
- copies between host and device that block: to the device without `non_blocking`, or from the device to
  the host (the host must wait for the data).

On a CUDA run the device tensors are the CUDA ones. On CPU (tests) every tensor counts as a device tensor
except the declared host tensors (`host=`: the batch's metadata that is meant to stay on the host, such as
image grids) and what is computed from them alone, so a CPU test sees the syncs a GPU run would have (but
`.tolist()`, and the index copies a kernel makes itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class HostSyncError(RuntimeError):
    """An op inside a guarded region would make the host wait on the device."""


@dataclass(frozen=True)
class SyncEvent:
    op: str
    why: str


class HostSyncGuard(TorchDispatchMode):
    def __init__(self, device_type: str, host: Iterable[torch.Tensor] = (), raise_on_sync: bool = True):
        super().__init__()
        self.device_type = device_type
        self.raise_on_sync = raise_on_sync
        self.events: list[SyncEvent] = []
        self._host = WeakIdKeyDictionary()
        for t in host:
            self._host[t] = True

    def _is_device(self, t: torch.Tensor) -> bool:
        if self.device_type == "cpu":
            return t not in self._host
        return t.device.type == self.device_type

    def _why(self, func, tensors: list[torch.Tensor], kwargs) -> str | None:
        if func in _COPIES:
            return self._copy_why(func, tensors, kwargs)
        if not any(self._is_device(t) for t in tensors):
            return None
        if func is torch.ops.aten.index.Tensor:  # tagged dynamic, but only a boolean index is
            return (
                "boolean indexing (output size depends on the mask)"
                if any(t.dtype == torch.bool for t in tensors[1:])
                else None
            )
        if torch.Tag.data_dependent_output in func.tags:
            return "reads device data on the host"
        if torch.Tag.dynamic_output_shape in func.tags:
            return "output size depends on device data"
        return None

    def _copy_why(self, func, tensors: list[torch.Tensor], kwargs) -> str | None:
        if self.device_type == "cpu":
            return None  # no transfers on a CPU run
        if func is torch.ops.aten._to_copy.default:
            src, dst_device = tensors[0], kwargs.get("device")
            non_blocking = kwargs.get("non_blocking", False)
        else:
            dst, src = tensors[0], tensors[1]
            dst_device, non_blocking = dst.device, kwargs.get("non_blocking", False)
        if dst_device is None or torch.device(dst_device).type == src.device.type:
            return None
        if src.device.type == self.device_type:
            return "copy from the device to the host"
        if not non_blocking:
            return "blocking copy to the device"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        why = self._why(func, tensors, kwargs)
        if why is not None:
            self.events.append(SyncEvent(str(func), why))
            if self.raise_on_sync:
                raise HostSyncError(f"{func}: {why} (a host sync inside the step)")
        out = func(*args, **kwargs)
        if self.device_type == "cpu" and tensors and all(t in self._host for t in tensors):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._host[t] = True
        return out
