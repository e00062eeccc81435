"""Mixture of experts: softmax router, top-k (renormalised when `norm_topk_prob`), SwiGLU experts.

Expert weights are stacked like linear weights: w13 `(E, 2I, H)` (gate rows then up rows) and
w2 `(E, H, I)` (`FusedMoE`). The released checkpoint stores the transposes, or one tensor per
expert; `FusedMoE.weight_loader` takes both.
"""

import torch
import torch.nn.functional as F
from torch import nn

from qwen3vl_kernels.fp8 import FP8, quantize_weight_blocks, scale_grid, w8a8_block_linear_reference
from qwen3vl_kernels.fused_moe import NORM_ROUTE_MAX_D

from ..parallel import Parallel, all_reduce, check_moe_split
from .linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear, ShapeMismatch, UnquantizedLinearMethod


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool, first_expert: int = 0,
          num_local: int | None = None):
    """router_logits (T, E) -> weights (T, A) float32, expert ids (T, A). Expert parallelism
    (`num_local` of the layer's experts held here, from `first_expert`): ids as this rank's
    experts see them, id - first_expert, and another rank's expert as the sentinel num_local
    with weight 0 (the kernels skip it)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if num_local is not None:
        local = ids - first_expert
        mine = (local >= 0) & (local < num_local)
        ids = torch.where(mine, local, num_local).to(ids.dtype)
        weights = torch.where(mine, weights, 0.0)
    return weights, ids


def moe_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      weights: torch.Tensor, ids: torch.Tensor, sentinel: bool = False) -> torch.Tensor:
    """Reference expert computation, one expert at a time over the tokens routed to it. Ids past
    the experts held (`sentinel`: other ranks' experts, as qwen3vl_kernels.fused_moe takes them) add nothing."""
    out = torch.zeros_like(x)
    weights = weights.to(x.dtype)
    for e in ids.unique().tolist():
        if e >= w13.shape[0]:                   # another rank's experts (expert parallelism)
            continue
        token_idx, slot = torch.where(ids == e)
        gate, up = F.linear(x[token_idx], w13[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[e]) * weights[token_idx, slot, None]
        out.index_add_(0, token_idx, h)
    return out


class FusedMoE(nn.Module):
    """One layer's experts in two stacked weights, linear layout: w13 (E/ep, 2I/tp, H), gate rows
    then up rows, and w2 (E/ep, H, I/tp): expert parallelism holds experts
    [ep_rank * E/ep, (ep_rank + 1) * E/ep), tensor parallelism (here the MoE's own, tp / ep
    ranks per expert group) splits their intermediate dimension.

    `weight_loader(param, loaded, shard_id, expert_id=None)` takes either layout a checkpoint has:
    the released fused tensors (shard "gate_up": (E, H, 2I); "down": (E, I, H), transposed here)
    or one tensor per expert (shards "gate", "up": (I, H); "down": (H, I), with `expert_id`).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp_size: int = 1,
                 tp_rank: int = 0, fp8_block: tuple[int, int] | None = None, fp8_online: bool = False,
                 ep_size: int = 1, ep_rank: int = 0):
        super().__init__()
        check_moe_split(num_experts, intermediate_size, tp_size * ep_size, ep_size, fp8_block)
        self.num_experts, self.hidden, self.inter = num_experts, hidden_size, intermediate_size
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.num_local = num_experts // ep_size
        self.first_expert = ep_rank * self.num_local
        self.block, self.online = fp8_block, fp8_online
        local = intermediate_size // tp_size
        dtype = FP8 if fp8_block else None
        e_local = self.num_local
        self.w13 = nn.Parameter(torch.empty(e_local, 2 * local, hidden_size, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e_local, hidden_size, local, dtype=dtype), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader
        if fp8_block:
            grid13, grid2 = scale_grid(2 * local, hidden_size, fp8_block), scale_grid(hidden_size, local, fp8_block)
            self.w13_weight_scale_inv = nn.Parameter(torch.empty(e_local, *grid13, dtype=torch.float32),
                                                     requires_grad=False)
            self.w2_weight_scale_inv = nn.Parameter(torch.empty(e_local, *grid2, dtype=torch.float32),
                                                    requires_grad=False)
            self.w13_weight_scale_inv.weight_loader = self.w2_weight_scale_inv.weight_loader = self.scale_loader

    @property
    def quantized(self) -> bool:
        return self.block is not None

    def _local_expert(self, expert_id: int) -> int | None:
        local = expert_id - self.first_expert
        return local if 0 <= local < self.num_local else None

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str, expert_id: int | None = None):
        e, h, inter, local = self.num_experts, self.hidden, self.inter, self.inter // self.tp_size
        mine = slice(self.tp_rank * local, (self.tp_rank + 1) * local)
        if expert_id is not None:
            expert_id = self._local_expert(expert_id)
            if expert_id is None:                     # another rank's expert
                return
        ours = slice(self.first_expert, self.first_expert + self.num_local)
        if self.online and loaded.dtype != FP8:       # --quantization fp8: quantize expert by expert
            self._quantize_on_load(param, loaded, shard_id, expert_id)
            return
        if shard_id == "gate_up":
            _expect(loaded, (e, h, 2 * inter))
            t = loaded[ours].transpose(1, 2)
            param.data[:, :local].copy_(t[:, :inter][:, mine].to(param.dtype))
            param.data[:, local:].copy_(t[:, inter:][:, mine].to(param.dtype))
        elif shard_id == "down" and expert_id is None:
            _expect(loaded, (e, inter, h))
            param.data.copy_(loaded[ours].transpose(1, 2)[:, :, mine].to(param.dtype))
        elif shard_id in ("gate", "up"):
            _expect(loaded, (inter, h))
            rows = slice(0, local) if shard_id == "gate" else slice(local, 2 * local)
            param.data[expert_id, rows].copy_(loaded[mine].to(param.dtype))
        elif shard_id == "down":
            _expect(loaded, (h, inter))
            param.data[expert_id].copy_(loaded[:, mine].to(param.dtype))
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")


    def _quantize_on_load(self, param, loaded, shard_id, local_id) -> None:
        """`local_id`: this rank's index of the expert (None: a fused tensor of all of them)."""
        if local_id is None:                          # a fused tensor: one expert's shards at a time
            t = loaded.transpose(1, 2)
            for x in range(self.num_local):
                g = self.first_expert + x
                if shard_id == "gate_up":
                    _expect(loaded, (self.num_experts, self.hidden, 2 * self.inter))
                    self._quantize_on_load(param, t[g, : self.inter], "gate", x)
                    self._quantize_on_load(param, t[g, self.inter :], "up", x)
                else:
                    self._quantize_on_load(param, t[g], "down", x)
            return
        q, scale = quantize_weight_blocks(loaded, self.block)
        global_id = self.first_expert + local_id
        self.weight_loader(param, q, shard_id, global_id)
        target = self.w13_weight_scale_inv if param is self.w13 else self.w2_weight_scale_inv
        self.scale_loader(target, scale, shard_id, global_id)

    def scale_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str, expert_id: int | None = None):
        """One expert's block scales (the per-expert layout of the FP8 releases)."""
        if expert_id is None:
            raise ValueError("fp8 experts load from per-expert tensors (experts.N.gate_proj.weight_scale_inv, ...)")
        expert_id = self._local_expert(expert_id)
        if expert_id is None:
            return
        bn, bk = self.block
        local = self.inter // self.tp_size
        if shard_id in ("gate", "up"):
            _expect(loaded, scale_grid(self.inter, self.hidden, self.block))
            rows = local // bn
            start = 0 if shard_id == "gate" else rows
            param.data[expert_id, start : start + rows].copy_(loaded[self.tp_rank * rows : (self.tp_rank + 1) * rows])
        elif shard_id == "down":
            _expect(loaded, scale_grid(self.hidden, self.inter, self.block))
            cols = local // bk
            param.data[expert_id].copy_(loaded[:, self.tp_rank * cols : (self.tp_rank + 1) * cols])
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")

    def fp8_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """On a GPU the fused MoE kernels with fp8 weights (dequantized in registers); on CPU the
        W8A8 reference, one expert at a time: activations quantized per token and group, SiLU(gate)
        * up quantized again before the down projection."""
        if x.is_cuda:
            from qwen3vl_kernels.fused_moe import fused_moe

            return fused_moe(x, self.w13, self.w2, weights, ids, w13_scale=self.w13_weight_scale_inv,
                             w2_scale=self.w2_weight_scale_inv, block=self.block, sentinel=self.num_local < self.num_experts)
        out = torch.zeros_like(x)
        weights = weights.to(x.dtype)
        for e in ids.unique().tolist():
            if e >= self.num_local:
                continue
            token_idx, slot = torch.where(ids == e)
            gate, up = w8a8_block_linear_reference(x[token_idx], self.w13[e], self.w13_weight_scale_inv[e],
                                                   self.block).chunk(2, dim=-1)
            h = w8a8_block_linear_reference(F.silu(gate) * up, self.w2[e], self.w2_weight_scale_inv[e], self.block)
            out.index_add_(0, token_idx, h * weights[token_idx, slot, None])
        return out


def _expect(t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != shape:
        raise ShapeMismatch(t.shape, shape)


class SparseMoE(nn.Module):
    """Router (replicated) and experts. Under `par` (parallel.Parallel) each rank computes its
    experts' share of every token (the pairs routed elsewhere map to the sentinel id E/ep and add
    nothing), and one all-reduce sums the ranks' partial outputs."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, par: Parallel = Parallel(), router_method=None,
                 fp8_block: tuple[int, int] | None = None, fp8_online: bool = False):
        super().__init__()
        self.top_k, self.renormalize, self.tp_size = top_k, renormalize, par.tp_size
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, quant_method=router_method)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, par.moe_tp_size, par.moe_tp_rank,
                                fp8_block, fp8_online, par.ep_size, par.ep_rank)
        self.experts_fn = moe_experts_torch
        self.route_fn = route          # qwen3vl_kernels.fused_moe.route on GPU (one launch)
        # qwen3vl_kernels.fused_moe.norm_route on GPU: the norm before this layer and the router in one launch
        self.norm_route_fn = None
        self.fixed_logits = None       # route_uniformly's: the router runs, the top-k is taken over these
        self._counter = None           # norm_route's arrival count (allocated on first use)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)            # it runs with fixed logits too (the benchmarks time it)
        fixed = self._fixed(x.shape[0])
        logits = logits if fixed is None else fixed
        weights, ids = self.route_fn(logits, self.top_k, self.renormalize, **self._ep_routing())
        return self._experts(x, weights, ids)

    def _ep_routing(self) -> dict:
        """The routers' arguments that map ids to this rank's experts (expert parallelism)."""
        ex = self.experts
        return {"first_expert": ex.first_expert, "num_local": ex.num_local} if ex.num_local < ex.num_experts else {}

    def forward_after_norm(self, x: torch.Tensor, residual: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output on norm(x + residual), x + residual): with `norm_route_fn`, the norm
        and the router are one launch (batch-1 decode: the launches, not the bytes, are its cost)."""
        if (self.norm_route_fn is None or x.shape[0] != 1 or x.shape[1] > NORM_ROUTE_MAX_D or self.gate.bias is not None
                or not isinstance(self.gate.quant_method, UnquantizedLinearMethod)):
            h, residual = norm(x, residual)
            return self(h), residual
        if self._counter is None or self._counter.device != x.device:
            self._counter = torch.zeros(1, dtype=torch.int32, device=x.device)
        h, residual, weights, ids = self.norm_route_fn(x.contiguous(), residual.contiguous(), norm.weight, norm.eps,
                                                       self.gate.weight, self.top_k, self.renormalize,
                                                       self._counter, self._fixed(x.shape[0]), **self._ep_routing())
        return self._experts(h, weights, ids), residual

    def _fixed(self, t: int) -> torch.Tensor | None:
        """route_uniformly's logits for t tokens, or None (routed on the router's own)."""
        noise = self.fixed_logits
        if noise is None:
            return None
        return (noise[:t] if t <= noise.shape[0] else noise.repeat(-(-t // noise.shape[0]), 1)[:t]).contiguous()

    def _experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """ids as this rank's experts see them (the routers map them: `_ep_routing`)."""
        ex = self.experts
        if ex.quantized:
            out = ex.fp8_forward(x, weights, ids)
        else:
            out = self.experts_fn(x, ex.w13, ex.w2, weights, ids, sentinel=ex.num_local < ex.num_experts)
        if self.tp_size > 1:                     # each rank summed its share of every token's experts
            all_reduce(out)
        return out


def route_uniformly(model: nn.Module, seed: int = 0, rows: int = 4096) -> None:
    """Benchmarks (`moe_routing: uniform`): route like a real checkpoint, each token to top-k
    experts drawn uniformly (seeded), as measured real batches do (~126 of 128 experts at 64
    tokens), where dummy weights send a batch to a dozen. The router still runs, but the top-k is
    taken over fixed random logits in [0, 8) instead of its output: no random draw inside the CUDA
    graphs, the same kernels, and the same routing on every tensor-parallel rank (each draws the
    same seeded table). (Not a wider range: the softmax would round all but one expert to zero,
    and the top-k would break those ties towards the lowest ids.)"""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for m in (x for x in model.modules() if isinstance(x, SparseMoE)):
        m.fixed_logits = (torch.rand(rows, m.experts.num_experts, generator=gen) * 8).to(m.gate.weight.device)


class GatedMLP(nn.Module):
    """Dense SwiGLU MLP: gate and up in one column-parallel matmul, down row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int, par: Parallel = Parallel(),
                 gate_up_method=None, down_method=None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, False, gate_up_method,
                                                       tp_size=par.tp_size, tp_rank=par.tp_rank)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, down_method, tp_size=par.tp_size,
                                           tp_rank=par.tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
