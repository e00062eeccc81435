"""RMSNorm as Qwen3 computes it: statistics in float32, weight applied after casting back."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernel = None             # kernels.rmsnorm.rmsnorm on GPU, set by the model runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.stride(-1) == 1:
            return self.kernel(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
