"""Host -> device copies that do not wait for the GPU.

`torch.tensor(data, device="cuda")` copies from pageable memory and then synchronises the stream,
so every such call waits for all queued GPU work. Built in pinned memory and copied with
`non_blocking=True`, the copy is queued behind that work instead; the caching host allocator
keeps the pinned buffer until the copy has run.
"""

from __future__ import annotations

import torch


def device_tensor(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of `data` (a list, or a CPU tensor) on `device`, queued without a host sync."""
    device = torch.device(device)
    if device.type != "cuda":
        return data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if isinstance(data, torch.Tensor):
        t = data.to(dtype).pin_memory()
    else:
        t = torch.tensor(data, dtype=dtype, pin_memory=True)
    return t.to(device, non_blocking=True)
