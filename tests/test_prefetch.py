"""kernels.prefetch (L2_NEXT's asking) and MOE_EVICT_FIRST's policy, on the CPU: what is asked
for and when. That a GPU runs them without changing a token is tests/test_gpu.py's switches test;
that they compile to the copy engine's prefetch and the cache hints, test_zz_sm90_compile's."""

import pytest
import torch

import launch_record
from kernels import switches
from kernels.fused_moe import fused_moe, moe_evict
from kernels.prefetch import MAX_TENSORS, l2_prefetch, prefetch_pieces


def test_prefetch_pieces_are_whole_tensors_in_units_of_16_bytes():
    a = torch.empty(5120, 2048, dtype=torch.float8_e4m3fn)
    b = torch.empty(7, 3, dtype=torch.bfloat16)             # 42 bytes: 32 asked, none past the end
    c = torch.empty(5, dtype=torch.float32)[1:]              # a view: 16 bytes from its own first element
    assert [n for _, n in prefetch_pieces([a, b, c])] == [5120 * 2048, 32, 16]
    with pytest.raises(ValueError, match="at most"):
        prefetch_pieces([a] * (MAX_TENSORS + 1))
    with pytest.raises(ValueError, match="contiguous"):
        prefetch_pieces([a.t()])


def test_l2_prefetch_off_a_gpu_launches_nothing():
    with launch_record.only_recording() as rec:
        l2_prefetch([torch.empty(64, 64, dtype=torch.bfloat16), None])
        l2_prefetch([])
    assert rec.records == {}


def test_parse_l2_next_names():
    assert switches.parse_l2_next(" qkv, router ,") == ("qkv", "router")
    with pytest.raises(ValueError, match="gate_up"):
        switches.parse_l2_next("qkv,gate_up")


def test_moe_evict_first_only_for_decode_batches(monkeypatch):
    monkeypatch.setattr(switches, "MOE_EVICT_FIRST", False)
    assert moe_evict(1) == ""
    monkeypatch.setattr(switches, "MOE_EVICT_FIRST", True)
    assert [moe_evict(m) for m in (1, switches.L2_NEXT_MAX_T, switches.L2_NEXT_MAX_T + 1)] == \
        ["evict_first", "evict_first", ""]


@pytest.mark.parametrize("m", [1, 5])
def test_moe_evict_first_changes_no_value(monkeypatch, m):
    """The hint reaches the pair kernels (m = 1) and the sorted path's GEMMs (5, with a config),
    and the interpreter computes the same output with it."""
    gen = torch.Generator().manual_seed(m)
    e, inter, hidden = 4, 32, 64
    x = torch.randn(m, hidden, generator=gen)
    w13 = torch.randn(e, 2 * inter, hidden, generator=gen) / 8
    w2 = torch.randn(e, hidden, inter, generator=gen) / 8
    ids = torch.stack([torch.randperm(e, generator=gen)[:2] for _ in range(m)]).to(torch.int32)
    weights = torch.rand(m, 2, generator=gen)
    cfg = None if m == 1 else {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4,
                               "num_stages": 2}
    out = {}
    for on in (False, True):
        monkeypatch.setattr(switches, "MOE_EVICT_FIRST", on)
        out[on] = fused_moe(x, w13, w2, weights, ids, cfg)
        with launch_record.only_recording() as rec:
            fused_moe(x, w13, w2, weights, ids, cfg)
        evicts = {r["consts"].get("EVICT") for r in rec.records.values() if "EVICT" in r["consts"]}
        assert evicts == {"evict_first" if on else ""}, evicts
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=0)
