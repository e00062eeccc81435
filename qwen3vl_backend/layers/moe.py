"""Mixture of experts: softmax router, top-k (renormalised when `norm_topk_prob`), SwiGLU experts.

Expert weights are stacked like linear weights: w13 `(E, 2I, H)` (gate rows then up rows) and
w2 `(E, H, I)` (`FusedMoE`). The released checkpoint stores the transposes, or one tensor per
expert; `FusedMoE.weight_loader` takes both.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear, ShapeMismatch


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


class FusedMoE(nn.Module):
    """One layer's experts in two stacked weights, linear layout: w13 (E, 2I/tp, H), gate rows
    then up rows, and w2 (E, H, I/tp); tensor parallelism splits the intermediate dimension.

    `weight_loader(param, loaded, shard_id, expert_id=None)` takes either layout a checkpoint has:
    the released fused tensors (shard "gate_up": (E, H, 2I); "down": (E, I, H), transposed here)
    or one tensor per expert (shards "gate", "up": (I, H); "down": (H, I), with `expert_id`).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp_size: int = 1,
                 tp_rank: int = 0):
        super().__init__()
        if intermediate_size % tp_size:
            raise ValueError(f"expert intermediate size {intermediate_size} does not split over tp {tp_size}")
        self.num_experts, self.hidden, self.inter = num_experts, hidden_size, intermediate_size
        self.tp_size, self.tp_rank = tp_size, tp_rank
        local = intermediate_size // tp_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, local), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str, expert_id: int | None = None):
        e, h, inter, local = self.num_experts, self.hidden, self.inter, self.inter // self.tp_size
        mine = slice(self.tp_rank * local, (self.tp_rank + 1) * local)
        if shard_id == "gate_up":
            _expect(loaded, (e, h, 2 * inter))
            t = loaded.transpose(1, 2)
            param.data[:, :local].copy_(t[:, :inter][:, mine].to(param.dtype))
            param.data[:, local:].copy_(t[:, inter:][:, mine].to(param.dtype))
        elif shard_id == "down" and expert_id is None:
            _expect(loaded, (e, inter, h))
            param.data.copy_(loaded.transpose(1, 2)[:, :, mine].to(param.dtype))
        elif shard_id in ("gate", "up"):
            _expect(loaded, (inter, h))
            rows = slice(0, local) if shard_id == "gate" else slice(local, 2 * local)
            param.data[expert_id, rows].copy_(loaded[mine].to(param.dtype))
        elif shard_id == "down":
            _expect(loaded, (h, inter))
            param.data[expert_id].copy_(loaded[:, mine].to(param.dtype))
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")


def _expect(t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != shape:
        raise ShapeMismatch(t.shape, shape)


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, tp_size: int = 1, tp_rank: int = 0):
        super().__init__()
        self.top_k, self.renormalize, self.tp_size = top_k, renormalize, tp_size
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)     # the router stays unquantized
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, tp_size, tp_rank)
        self.experts_fn = moe_experts_torch
        self.route_fn = route          # kernels.fused_moe.route on GPU (one launch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route_fn(self.gate(x), self.top_k, self.renormalize)
        out = self.experts_fn(x, self.experts.w13, self.experts.w2, weights, ids)
        if self.tp_size > 1:                     # each rank summed its slice of every expert
            torch.distributed.all_reduce(out)
        return out


class GatedMLP(nn.Module):
    """Dense SwiGLU MLP: gate and up in one column-parallel matmul, down row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp_size: int = 1, tp_rank: int = 0):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, False,
                                                       tp_size=tp_size, tp_rank=tp_rank)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp_size=tp_size, tp_rank=tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
