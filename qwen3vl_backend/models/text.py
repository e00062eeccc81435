"""Qwen3 text decoder (dense or MoE) over a flat token batch and a paged KV cache.

Shapes: T = new tokens in the step, D = hidden, H/Hkv = query/KV heads, Dh = head dim.
Attention: q/k RMSNorm per head before interleaved mRoPE, grouped-query. DeepStack: the
vision features of the first len(deepstack) layers are added to those layers' outputs at the
visual token positions.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.attention import AttentionMetadata, packed_prefill_attention, paged_attention_torch, write_kv
from ..layers.linear import QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding
from ..layers.moe import GatedMLP, SparseMoE
from ..layers.norm import RMSNorm
from ..layers.rotary import apply_rotary
from ..layers.quantization import linear_method
from ..model_config import QuantConfig, TextConfig
from ..parallel import Parallel


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float, bias: bool,
                 tp_size: int = 1, tp_rank: int = 0, qkv_method=None, o_method=None):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias, qkv_method, tp_size=tp_size,
                                          tp_rank=tp_rank)
        self.heads, self.kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim
        self.o_proj = RowParallelLinear(heads * head_dim, hidden, bias, o_method, tp_size=tp_size, tp_rank=tp_rank)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.attn_fn = paged_attention_torch
        self.decode_fn = None          # a paged decode kernel, set by the model runner on GPU
        self.prep_fn = None            # q/k norm + rotary + cache write in one kernel (qwen3vl_kernels.rope.qkv_prep_)
        # decode steps: prep_fn's work inside the decode kernel (qwen3vl_kernels.attention.paged_decode_attention_prep)
        self.decode_prep_fn = None

    def forward(self, x, cos, sin, cache: torch.Tensor, meta: AttentionMetadata, qkv=None):
        """`qkv`: the projection already made (DecoderLayer's input norm inside it); x unused then."""
        qkv = self.qkv_proj(x) if qkv is None else qkv
        t = qkv.shape[0]
        if self.decode_prep_fn is not None and meta.is_decode_only:
            o = self.decode_prep_fn(qkv, self.heads, self.kv_heads, self.q_norm.weight, self.k_norm.weight,
                                    self.q_norm.eps, cos, sin, cache, meta.slot_mapping, meta.block_tables,
                                    meta.context_lens_t, self.head_dim ** -0.5)
            return self.o_proj(o.reshape(t, -1))
        if self.prep_fn is not None:
            q, k, v = self.prep_fn(qkv, self.heads, self.kv_heads, self.q_norm.weight, self.k_norm.weight,
                                   self.q_norm.eps, cos, sin, cache, meta.slot_mapping)
        else:
            q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                 self.kv_heads * self.head_dim], dim=-1)
            q = self.q_norm(q.reshape(t, self.heads, self.head_dim))
            k = self.k_norm(k.reshape(t, self.kv_heads, self.head_dim))
            v = v.reshape(t, self.kv_heads, self.head_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            write_kv(cache, k, v, meta.slot_mapping)
        if self.decode_fn is not None and meta.is_decode_only:
            o = self.decode_fn(q, cache, meta.block_tables, meta.context_lens_t, self.head_dim ** -0.5)
        elif meta.cu_seqlens_t is not None:
            o = packed_prefill_attention(q, k, v, meta, self.head_dim ** -0.5)
        else:
            o = self.attn_fn(q, k, v, cache, meta, self.head_dim ** -0.5)
        return self.o_proj(o.reshape(t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, quant: QuantConfig | None = None, par: Parallel = Parallel()):
        super().__init__()
        at = f"model.language_model.layers.{layer_idx}"          # the checkpoint's module names
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                   cfg.head_dim, cfg.rms_norm_eps, cfg.attention_bias, par.tp_size, par.tp_rank,
                                   qkv_method=linear_method(quant, *(f"{at}.self_attn.{p}_proj" for p in "qkv")),
                                   o_method=linear_method(quant, f"{at}.self_attn.o_proj"))
        if cfg.is_moe_layer(layer_idx):
            fp8 = quant is not None and not quant.skips(f"{at}.mlp.experts")
            self.mlp = SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                                 cfg.num_experts_per_tok, cfg.norm_topk_prob, par,
                                 router_method=linear_method(quant, f"{at}.mlp.gate"),
                                 fp8_block=quant.block if fp8 else None, fp8_online=fp8 and quant.online)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, par,
                                gate_up_method=linear_method(quant, f"{at}.mlp.gate_proj", f"{at}.mlp.up_proj"),
                                down_method=linear_method(quant, f"{at}.mlp.down_proj"))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # the model runner's (QWEN3VL_FUSED_INPUT_NORM): a decode row's residual add and input norm
        # inside the qkv GEMV (LinearBase.forward_normed), where its method can
        self.fuse_input_norm = False

    def forward(self, x, residual, cos, sin, cache, meta):
        """-> (this layer's output, the residual stream before it): their sum is the layer's result,
        left unsummed so the next norm adds it in its own kernel. `residual` None: x is the stream."""
        fused = None
        if residual is not None and self.fuse_input_norm and x.shape[0] == 1:
            fused = self.self_attn.qkv_proj.forward_normed(x, residual, self.input_layernorm)
        if fused is not None:
            qkv, residual = fused
            h = self.self_attn(None, cos, sin, cache, meta, qkv=qkv)
        else:
            if residual is None:
                residual, h = x, self.input_layernorm(x)
            else:
                h, residual = self.input_layernorm(x, residual)
            h = self.self_attn(h, cos, sin, cache, meta)
        if isinstance(self.mlp, SparseMoE):         # the norm may run inside the router's kernel
            return self.mlp.forward_after_norm(h, residual, self.post_attention_layernorm)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, quant: QuantConfig | None = None, par: Parallel = Parallel()):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, par.tp_size, par.tp_rank)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, quant, par) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds, cos, sin, kv_caches, meta, visual_mask=None, deepstack=(), dense_visual=False):
        """`dense_visual`: deepstack[i] is (T, D), zero off the visual rows (Qwen3VL...forward)."""
        h, residual = embeds, None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, cos, sin, kv_caches[i], meta)
            if i < len(deepstack):
                h, residual = h + residual, None
                if dense_visual:
                    h = h + deepstack[i].to(h.dtype)
                else:
                    h = h.index_put((visual_mask,), h[visual_mask] + deepstack[i].to(h.dtype))
        return self.norm(h, residual)[0] if residual is not None else self.norm(h)
