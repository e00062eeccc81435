"""RMSNorm as Qwen3 computes it: statistics in float32, weight applied after casting back."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernel = None             # kernels.rmsnorm.rmsnorm on GPU, set by the model runner
        # kernels.rmsnorm.rmsnorm_quantized, set by the model runner with kernels.switches.NORM_QUANT
        self.quant_kernel = None

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

    def forward_quantized(self, x: torch.Tensor, residual: torch.Tensor, group: int):
        """forward(x, residual) and its output quantized per token and `group` columns for a W8A8
        GEMM, in one launch: (h, x + residual, (h e4m3, scales)); None where quant_kernel cannot
        (none set, or rows it does not take: kernels.rmsnorm.quantizes_in_norm)."""
        from kernels.rmsnorm import quantizes_in_norm

        if (self.quant_kernel is None or x.dim() != 2 or x.stride(-1) != 1 or not residual.is_contiguous()
                or not quantizes_in_norm(x.shape[1], group)):
            return None
        residual = residual.clone() if residual.data_ptr() == x.data_ptr() else residual
        h, q, s = self.quant_kernel(x, self.weight, self.eps, residual, group)
        return h, residual, (q, s)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
