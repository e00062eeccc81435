"""Triton tensors to torch where they live (host or GPU), without a copy (DLPack)."""

from __future__ import annotations

import torch
import torch.utils.dlpack


def as_torch(tensor):
    """A numeric `pb_utils.Tensor` (or None) as a torch tensor on its own device, or None."""
    return None if tensor is None else torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


def off_the_pool(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CUDA input read with `as_torch` lives in Triton's CUDA memory pool (1 GB, shared by
    every request in flight) for as long as a reference to it does, and an llm sequence keeps its
    visual features until it finishes: 64 requests with a 1280x720 image each hold ~1.9 GB of float32
    features. On a GPU this copies them into torch's own memory as `dtype` (the model's: the
    engine casts them to it anyway, so the values are the same) and waits for the copy, so the
    pool's block is free once the request is released. Host tensors, and tensors that are not
    float (the engine refuses them), are returned as they are."""
    if not t.is_cuda or not t.is_floating_point():
        return t
    out = t.to(dtype, copy=True)
    torch.cuda.current_stream(t.device).synchronize()
    return out
