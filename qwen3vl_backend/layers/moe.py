"""Mixture of experts: softmax router, top-k (renormalised when `norm_topk_prob`), SwiGLU experts.

Expert weights are stacked like linear weights: w13 `(E, 2I, H)` (gate rows then up rows) and
w2 `(E, H, I)`. The released checkpoint stores the transposes; the loader's table maps them.
"""

import torch
import torch.nn.functional as F
from torch import nn


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """router_logits (T, E) -> weights (T, A) float32, expert ids (T, A)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Reference expert computation, one expert at a time over the tokens routed to it."""
    out = torch.zeros_like(x)
    weights = weights.to(x.dtype)
    for e in ids.unique().tolist():
        token_idx, slot = torch.where(ids == e)
        gate, up = F.linear(x[token_idx], w13[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[e]) * weights[token_idx, slot, None]
        out.index_add_(0, token_idx, h)
    return out


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.Module()
        self.experts.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.experts.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.experts_fn = moe_experts_torch
        self.route_fn = route          # kernels.fused_moe.route on GPU (one launch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route_fn(self.gate(x), self.top_k, self.renormalize)
        return self.experts_fn(x, self.experts.w13, self.experts.w2, weights, ids)


class GatedMLP(nn.Module):
    """Dense SwiGLU MLP with the checkpoint's gate/up/down names."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
