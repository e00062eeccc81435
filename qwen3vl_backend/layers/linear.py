"""Linear layers that own their parameters and how they load: the seam quantization and tensor
parallelism hang on.

Each layer is built with its full (unsharded) sizes, the tensor-parallel size and rank, and a
quantization method. The method creates the parameters (for `UnquantizedLinearMethod` one
`weight` (N, K)) and runs the matmul; every parameter carries `weight_loader(param, loaded,
shard_id)`, which takes this rank's slice of a checkpoint tensor and writes it where it goes, so
sharding happens while loading and a merged weight (q/k/v, gate/up) is filled piece by piece.

| layer | weight (this rank) | checkpoint tensors (shard ids) |
| --- | --- | --- |
| `ReplicatedLinear` | (N, K) | one, whole |
| `ColumnParallelLinear` | (N/tp, K) | one, rows split |
| `MergedColumnParallelLinear` | (sum(N_i)/tp, K) | gate, up (0, 1), each's rows split |
| `QKVParallelLinear` | ((H + 2 Hkv_r) Dh, K) | q, k, v ("q", "k", "v"); KV heads replicated when tp > Hkv |
| `RowParallelLinear` | (N, K/tp) | one, columns split; the partial sums are all-reduced |
| `VocabParallelEmbedding`, `ParallelLMHead` | (V/tp, D) | one, rows split |

tp is 1 in this build (the tensor-parallel issue shards); the arithmetic is already general.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import all_reduce


class ShapeMismatch(ValueError):
    """A checkpoint tensor whose shape does not fit its parameter (the loader adds its name)."""

    def __init__(self, got, want):
        super().__init__(f"checkpoint shape {tuple(got)}, expected {tuple(want)}")


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ShapeMismatch(src.shape, dst.shape)
    dst.copy_(src.to(dst.dtype))


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    """A parameter loaded whole (norms, the vision tower, anything without a loader of its own)."""
    copy_checked(param.data, loaded)


class UnquantizedLinearMethod:
    """bf16/float32 weights. `skinny`: a kernel for 2-D inputs of few rows (decode batches on a
    GPU, qwen3vl_kernels.linear.skinny_linear), chosen by the model runner; F.linear otherwise."""

    def __init__(self):
        self.skinny = None

    def create_weights(self, layer: "LinearBase", out_features: int, in_features: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.skinny is not None and x.dim() == 2:
            return self.skinny(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)

    def apply_normed(self, layer: "LinearBase", x: torch.Tensor, norm: tuple, bias: torch.Tensor | None):
        """LinearBase.forward_normed's: the skinny kernel with the input's residual add and RMSNorm
        (`norm`: residual, weight, eps, the next residual's tensor), for one row; None where it
        does not run."""
        if self.skinny is None or x.dim() != 2 or x.shape[0] != 1:
            return None
        return self.skinny(x, layer.weight, bias, norm=norm)


class LinearBase(nn.Module):
    """A linear layer: its weight's placement per checkpoint shard (`placement`) and a method
    that creates the parameters and computes (`quant_method`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant_method=None,
                 tp_size: int = 1, tp_rank: int = 0, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_size, self.tp_rank = tp_size, tp_rank
        dtype = dtype or torch.get_default_dtype()
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, *self._local_shape(), dtype)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self._local_shape()[0], dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def _local_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def shard_sizes(self) -> list[int]:
        """Rows of this rank's weight from each checkpoint tensor, in order."""
        return [self._local_shape()[0]]

    def placement(self, shard_id=None) -> tuple[int, int, int, int, int] | None:
        """Where a checkpoint tensor goes: (dim, offset, size) in this rank's weight, and which of
        how many equal slices of the tensor along `dim` is this rank's; None: the whole of it."""
        return None

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        place = self.placement(shard_id)
        if place is None or place[0] >= param.dim():         # whole (a row-parallel layer's bias too)
            copy_checked(param.data, loaded)
            return
        dim, offset, size, rank, parts = place
        copy_checked(param.data.narrow(dim, offset, size), _part(loaded, dim, size, rank, parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor, norm) -> tuple | None:
        """(this layer on norm(x + residual), x + residual) from one kernel where the method has one
        (a decode row on the GPU: the GEMV adds, normalises and multiplies), else None."""
        fn = getattr(self.quant_method, "apply_normed", None)
        if fn is None or not (x.is_contiguous() and residual.is_contiguous()):
            return None
        new_residual = torch.empty_like(x)
        y = fn(self, x, (residual, norm.weight, norm.eps, new_residual), self.bias)
        return None if y is None else (y, new_residual)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight (the MoE router, small layers)."""


def _split(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} of {n} does not split over tensor-parallel size {tp}")
    return n // tp


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; each rank's output is its slice (no communication)."""

    def _local_shape(self):
        return _split(self.out_features, self.tp_size, "output features"), self.in_features

    def placement(self, shard_id=None):
        return 0, 0, self._local_shape()[0], self.tp_rank, self.tp_size


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel weights in one matmul (gate and up): shard i goes to its rows."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, quant_method=None,
                 tp_size: int = 1, tp_rank: int = 0, dtype: torch.dtype | None = None):
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, quant_method, tp_size, tp_rank, dtype)

    def shard_sizes(self):
        return [_split(n, self.tp_size, "output features") for n in self.output_sizes]

    def placement(self, shard_id=None):
        sizes = self.shard_sizes()
        return 0, sum(sizes[:shard_id]), sizes[shard_id], self.tp_rank, self.tp_size


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one matmul. Query heads split over ranks; KV heads too, or, when there are
    fewer KV heads than ranks, each KV head is held by tp / Hkv consecutive ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 quant_method=None, tp_size: int = 1, tp_rank: int = 0, dtype: torch.dtype | None = None):
        self.head_dim = head_dim
        self.num_heads = _split(num_heads, tp_size, "query heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads, self.kv_replicas = _split(num_kv_heads, tp_size, "KV heads"), 1
        else:
            self.num_kv_heads, self.kv_replicas = 1, _split(tp_size, num_kv_heads, "tensor-parallel size (KV heads)")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden, out, bias, quant_method, tp_size, tp_rank, dtype)

    def _local_shape(self):
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, self.in_features

    def shard_sizes(self):
        return [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2

    def placement(self, shard_id=None):
        q, kv, _ = self.shard_sizes()
        if shard_id == "q":
            return 0, 0, q, self.tp_rank, self.tp_size
        if shard_id in ("k", "v"):
            return (0, q + (kv if shard_id == "v" else 0), kv, self.tp_rank // self.kv_replicas,
                    self.tp_size // self.kv_replicas)
        raise ValueError(f"QKV shard id must be q, k or v, got {shard_id!r}")


class RowParallelLinear(LinearBase):
    """Input features split over ranks; the partial outputs are summed across them (the bias
    added once, after the sum)."""

    def _local_shape(self):
        return self.out_features, _split(self.in_features, self.tp_size, "input features")

    def placement(self, shard_id=None):
        return 1, 0, self._local_shape()[1], self.tp_rank, self.tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        out = self.quant_method.apply(self, x, None)
        all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embeddings, vocabulary rows split over ranks (whole at tp 1)."""

    def __init__(self, num_embeddings: int, dim: int, tp_size: int = 1, tp_rank: int = 0):
        super().__init__()
        self.num_embeddings, self.tp_size, self.tp_rank = num_embeddings, tp_size, tp_rank
        self.rows = -(-num_embeddings // tp_size)
        self.weight = nn.Parameter(torch.empty(self.rows, dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        if self.tp_size == 1 or loaded.shape[0] != self.num_embeddings:
            copy_checked(param.data, loaded)
            return
        part = loaded[self.tp_rank * self.rows : (self.tp_rank + 1) * self.rows]   # the last rank's is short
        param.data.zero_()
        copy_checked(param.data[: part.shape[0]], part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.tp_rank * self.rows
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine[:, None].to(self.weight.dtype)
        all_reduce(out)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection over the vocabulary; each rank's logits are its rows (gathered
    before sampling when tp > 1)."""

    # qwen3vl_kernels.linear.table_linear on a GPU (the model runner's choice): a tuned launch for the
    # vocabulary's shape where the device's table has one, else F.linear
    skinny = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        use = self.skinny if self.skinny is not None and hidden.dim() == 2 else F.linear
        logits = use(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, logits)
        return torch.cat(parts, dim=-1)[:, : self.num_embeddings]


def _part(loaded: torch.Tensor, dim: int, size: int, rank: int, parts: int) -> torch.Tensor:
    """Slice `rank` of `parts` equal slices of `size` along `dim` of a checkpoint tensor."""
    if loaded.dim() <= dim or loaded.shape[dim] != size * parts:
        want = list(loaded.shape)
        if loaded.dim() > dim:
            want[dim] = size * parts
        raise ShapeMismatch(loaded.shape, want)
    return loaded.narrow(dim, rank * size, size)
