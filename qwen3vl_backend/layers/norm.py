"""RMSNorm as Qwen3 computes it: statistics in float32, weight applied after casting back."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernel = None             # qwen3vl_kernels.rmsnorm.rmsnorm on GPU, set by the model runner

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`: (norm(x + residual), x + residual), the sum also the new residual."""
        if residual is not None:
            if self.kernel is not None and x.stride(-1) == 1 and residual.is_contiguous():
                residual = residual.clone() if residual.data_ptr() == x.data_ptr() else residual
                return self.kernel(x, self.weight, self.eps, residual=residual), residual
            residual = x + residual
            return self._norm(residual), residual
        if self.kernel is not None and x.stride(-1) == 1:
            return self.kernel(x, self.weight, self.eps)
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
