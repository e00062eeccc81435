"""The layer seam (layers/linear.py, layers/moe.py): each parameter's loader puts its slice of a
checkpoint tensor where it belongs, for one rank or several, and refuses what does not fit."""

import pytest
import torch

from qwen3vl_backend.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead,
                                           QKVParallelLinear, ReplicatedLinear, RowParallelLinear, ShapeMismatch,
                                           VocabParallelEmbedding)
from qwen3vl_backend.layers.moe import FusedMoE

H, DH, HEADS, KV = 16, 4, 8, 2


def _load(layer, shards: dict):
    for shard_id, t in shards.items():
        layer.weight.weight_loader(layer.weight, t, shard_id)
    return layer.weight.data


def test_qkv_rank_slices_and_kv_heads_replicated_past_their_count():
    q, k, v = (torch.randn(n * DH, H) for n in (HEADS, KV, KV))
    whole = _load(QKVParallelLinear(H, DH, HEADS, KV, False), {"q": q, "k": k, "v": v})
    assert torch.equal(whole, torch.cat([q, k, v]))
    for tp in (2, 4, 8):                     # 8 ranks, 2 KV heads: each KV head on 4 ranks
        for rank in range(tp):
            layer = QKVParallelLinear(H, DH, HEADS, KV, False, tp_size=tp, tp_rank=rank)
            got = _load(layer, {"q": q, "k": k, "v": v})
            hq = HEADS // tp
            kv_head = rank * KV // tp
            nkv = max(KV // tp, 1)
            want = torch.cat([q[rank * hq * DH:(rank + 1) * hq * DH],
                              k[kv_head * DH:(kv_head + nkv) * DH], v[kv_head * DH:(kv_head + nkv) * DH]])
            assert torch.equal(got, want), (tp, rank)
    with pytest.raises(ValueError, match="query heads of 8 does not split over tensor-parallel size 3"):
        QKVParallelLinear(H, DH, HEADS, KV, False, tp_size=3)


def test_merged_column_and_row_slices():
    gate, up = torch.randn(12, H), torch.randn(12, H)
    for rank in range(2):
        layer = MergedColumnParallelLinear(H, [12, 12], False, tp_size=2, tp_rank=rank)
        got = _load(layer, {0: gate, 1: up})
        assert torch.equal(got, torch.cat([gate[rank * 6:(rank + 1) * 6], up[rank * 6:(rank + 1) * 6]]))
        row = RowParallelLinear(12, H, True, tp_size=2, tp_rank=rank)
        w, b = torch.randn(H, 12), torch.randn(H)
        row.weight.weight_loader(row.weight, w)
        row.bias.weight_loader(row.bias, b)
        assert torch.equal(row.weight.data, w[:, rank * 6:(rank + 1) * 6]) and torch.equal(row.bias.data, b)
        col = ColumnParallelLinear(H, 12, False, tp_size=2, tp_rank=rank)
        assert torch.equal(_load(col, {None: gate}), gate[rank * 6:(rank + 1) * 6])


def test_layers_compute_like_f_linear_at_one_rank():
    x = torch.randn(5, H)
    layer = QKVParallelLinear(H, DH, HEADS, KV, True)
    q, k, v = (torch.randn(n * DH, H) for n in (HEADS, KV, KV))
    _load(layer, {"q": q, "k": k, "v": v})
    for shard, t in zip("qkv", (torch.randn(HEADS * DH), torch.randn(KV * DH), torch.randn(KV * DH))):
        layer.bias.weight_loader(layer.bias, t, shard)
    ref = torch.cat([torch.nn.functional.linear(x, w) for w in (q, k, v)], -1) + layer.bias
    torch.testing.assert_close(layer(x), ref)
    emb, head = VocabParallelEmbedding(10, H), ParallelLMHead(10, H)
    table = torch.randn(10, H)
    emb.weight.weight_loader(emb.weight, table)
    head.weight.weight_loader(head.weight, table)
    ids = torch.tensor([3, 0, 9])
    assert torch.equal(emb(ids), table[ids]) and torch.allclose(head(x), x @ table.T)


def test_vocab_rows_split_with_a_short_last_rank():
    table = torch.randn(10, H)
    rows = []
    for rank in range(4):                    # ceil(10 / 4) = 3 rows each, the last rank holds 1
        emb = VocabParallelEmbedding(10, H, tp_size=4, tp_rank=rank)
        emb.weight.weight_loader(emb.weight, table)
        rows.append(emb.weight.data)
    assert torch.equal(torch.cat(rows)[:10], table) and not rows[3][1:].any()


@pytest.mark.parametrize("tp", [1, 2])
def test_experts_load_from_either_layout_into_the_same_weights(tp):
    e, inter = 3, 8
    gate_up, down = torch.randn(e, H, 2 * inter), torch.randn(e, inter, H)
    for rank in range(tp):
        fused, split = FusedMoE(e, H, inter, tp, rank), FusedMoE(e, H, inter, tp, rank)
        fused.weight_loader(fused.w13, gate_up, "gate_up")
        fused.weight_loader(fused.w2, down, "down")
        for x in range(e):
            split.weight_loader(split.w13, gate_up[x, :, :inter].T, "gate", x)
            split.weight_loader(split.w13, gate_up[x, :, inter:].T, "up", x)
            split.weight_loader(split.w2, down[x].T, "down", x)
        assert torch.equal(fused.w13, split.w13) and torch.equal(fused.w2, split.w2)
        local = inter // tp
        mine = slice(rank * local, (rank + 1) * local)
        assert torch.equal(fused.w13[:, :local], gate_up[:, :, :inter].transpose(1, 2)[:, mine])
        assert torch.equal(fused.w2, down.transpose(1, 2)[:, :, mine])


def test_misshaped_tensors_are_refused_not_sliced():
    layer = QKVParallelLinear(H, DH, HEADS, KV, False, tp_size=2, tp_rank=1)
    with pytest.raises(ShapeMismatch, match=r"checkpoint shape \(12, 16\), expected \(8, 16\)"):
        layer.weight.weight_loader(layer.weight, torch.randn(12, H), "k")
    with pytest.raises(ShapeMismatch, match=r"expected \(16, 20\)"):
        ReplicatedLinear(20, H, False).weight.weight_loader(ReplicatedLinear(20, H, False).weight, torch.randn(H, 21))
    moe = FusedMoE(3, H, 8)
    with pytest.raises(ShapeMismatch, match=r"checkpoint shape \(3, 16, 8\), expected \(3, 8, 16\)"):
        moe.weight_loader(moe.w2, torch.randn(3, H, 8), "down")


def test_sdpa_priority_puts_cudnn_first_inside_the_block_only():
    """The ViT's exact-grid captures ask SDPA for cuDNN's attention first (layers.attention):
    inside the block cuDNN leads the order and every backend stays enabled (a CPU still runs
    SDPA); after it, the order and the enabled set are what they were."""
    import torch
    import torch.nn.functional as F

    from qwen3vl_backend.layers.attention import CUDNN_FIRST, sdpa_priority

    before = torch._C._get_sdp_priority_order()
    enabled = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    q = torch.randn(1, 2, 5, 8)
    with sdpa_priority(CUDNN_FIRST):
        assert int(torch._C._get_sdp_priority_order()[0]) == int(CUDNN_FIRST[0])
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        inside = F.scaled_dot_product_attention(q, q, q)
    assert torch._C._get_sdp_priority_order() == before
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == enabled
    assert torch.equal(inside, F.scaled_dot_product_attention(q, q, q))
    with sdpa_priority(None):
        assert torch._C._get_sdp_priority_order() == before
