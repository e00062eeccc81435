"""Quantization methods for the layer seam: block-scaled FP8 (qwen3vl_kernels/fp8.py has the format).

`Fp8BlockLinearMethod` gives a linear layer an fp8 `weight` (N, K) and a float32
`weight_scale_inv` (ceil(N/bn), ceil(K/bk)). Each checkpoint tensor lands where the layer's
`placement` says, its scales at the same place in block units, so every merged shard (q, k, v;
gate, up) must start on a block boundary. With `online` (`--quantization fp8` on a bf16
checkpoint), each tensor is quantized as it loads and its scales come with it.

On CPU the product is the W8A8 reference (activations per token and bk group, dynamic); on a
GPU qwen3vl_kernels.fp8.fp8_linear (an fp8-weight GEMV for decode rows, cuBLAS's block-scaled GEMM for
prefill).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen3vl_kernels.fp8 import FP8, fp8_gemv, fp8_linear, quantize_weight_blocks, scale_grid, w8a8_block_linear_reference

from .linear import UnquantizedLinearMethod, _part, copy_checked


def linear_method(quant, *names: str):
    """The method for a linear layer whose checkpoint modules are `names` (one, or the shards of
    a merged layer): unquantized unless the checkpoint quantizes it."""
    if quant is None or quant.skips(*names):
        return UnquantizedLinearMethod()
    return Fp8BlockLinearMethod(quant.block, quant.online)


class Fp8BlockLinearMethod:
    def __init__(self, block: tuple[int, int], online: bool = False):
        self.block, self.online = tuple(block), online

    def create_weights(self, layer, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        bn, _ = self.block
        sizes = layer.shard_sizes()
        if any(n % bn for n in sizes[:-1]):
            raise ValueError(f"fp8 blocks of {bn} rows: this layer's checkpoint tensors of {sizes} rows do not "
                             f"start on block boundaries")
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(torch.empty(scale_grid(out_features, in_features, self.block),
                                                          dtype=torch.float32), requires_grad=False)
        layer.weight.weight_loader = self.weight_loader_for(layer)
        layer.weight_scale_inv.weight_loader = self.scale_loader_for(layer)

    def weight_loader_for(self, layer):
        def load(param, loaded, shard_id=None):
            if self.online and loaded.dtype != FP8:        # a bf16 checkpoint: quantize as it loads
                loaded, scale = quantize_weight_blocks(loaded, self.block)
                self._place_scale(layer, layer.weight_scale_inv, scale, shard_id)
            layer.weight_loader(param, loaded, shard_id)
        return load

    def scale_loader_for(self, layer):
        return lambda param, loaded, shard_id=None: self._place_scale(layer, param, loaded, shard_id)

    def _place_scale(self, layer, param, loaded, shard_id) -> None:
        place = layer.placement(shard_id)
        if place is None:
            copy_checked(param.data, loaded)
            return
        dim, offset, size, rank, parts = place
        b = self.block[dim]
        nb = -(-size // b)
        copy_checked(param.data.narrow(dim, offset // b, nb), _part(loaded.float(), dim, nb, rank, parts))

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            return fp8_linear(x, layer.weight, layer.weight_scale_inv, self.block, bias)
        return w8a8_block_linear_reference(x, layer.weight, layer.weight_scale_inv, self.block, bias)

    def apply_normed(self, layer, x: torch.Tensor, norm: tuple, bias: torch.Tensor | None):
        """LinearBase.forward_normed's: the fp8 GEMV with the input's residual add and RMSNorm
        (`norm`: residual, weight, eps, the next residual's tensor), for one row on the GPU; None
        elsewhere, or where the row's launch shape is INT_CVT's."""
        if not x.is_cuda or x.dim() != 2 or x.shape[0] != 1:
            return None
        return fp8_gemv(x, layer.weight, layer.weight_scale_inv, self.block, bias, norm=norm)
