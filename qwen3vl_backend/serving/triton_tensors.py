"""Triton tensors to torch where they live (host or GPU), without a copy (DLPack)."""

from __future__ import annotations

import torch
import torch.utils.dlpack


def as_torch(tensor):
    """A numeric `pb_utils.Tensor` (or None) as a torch tensor on its own device, or None."""
    return None if tensor is None else torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
