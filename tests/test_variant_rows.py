"""benchmarks.common's launch-variant rows (moe_variants, dense_variants): the error against the
reference, an error row for a variant that fails, and each row's time over its own group's
"table" row."""

from __future__ import annotations

from unittest import mock

import torch

import benchmarks.common as common


def test_variant_rows_and_their_ratio_to_the_table():
    times = iter([0.002, 0.003, 0.004])
    want = torch.ones(4)
    with mock.patch.object(common, "per_call_ms", lambda call, n: next(times)), \
            mock.patch.object(torch.cuda, "synchronize", lambda: None):
        rows = [common.variant_row({"M": 1, "variant": "table"}, lambda i: torch.ones(4), want, 1.0, 4),
                common.variant_row({"M": 1, "variant": "x"}, lambda i: torch.ones(4) * 1.1, want, 1.0, 4),
                common.variant_row({"M": 1, "variant": "bad"}, lambda i: 1 / 0, want, 1.0, 4),
                common.variant_row({"M": 2, "variant": "x"}, lambda i: torch.ones(4), want, 1.0, 4)]
        assert common.variant_row({"M": 1, "variant": "n"}, lambda i: torch.ones(4), want, 1.0, 4, ncu=True) is None
    for m in (1, 2):
        common.against_table(rows, M=m)
    table, x, bad, other = rows
    assert (table["us"], x["us"], other["us"]) == (2.0, 3.0, 4.0)
    assert table["vs_table"] == 1.0 and x["vs_table"] == 1.5
    assert float(x["rel_err"]) == 0.1 and float(table["rel_err"]) == 0.0 and x["floor_over"] == round(1 / 3, 3)
    assert bad["error"].startswith("ZeroDivisionError") and "us" not in bad
    assert "vs_table" not in other            # M=2 has no table row of its own


def test_attention_variants_inputs_own_their_pages():
    """benchmarks.attention_variants' inputs: each sequence's pages cover its context (the last
    one partly), every page is one sequence's alone, in order or shuffled; the cache in the dtype asked."""
    from benchmarks.attention_variants import PAGE, inputs

    gen = torch.Generator().manual_seed(0)
    for shuffle in (False, True):
        q, cache, tables, ctx = inputs(3, 40, fp8=shuffle, shuffle=shuffle, gen=gen, device="cpu")
        assert tables.shape == (3, -(-40 // PAGE)) and cache.shape[1] == tables.numel()
        assert sorted(tables.flatten().tolist()) == list(range(tables.numel()))
        assert (tables.flatten().tolist() == list(range(tables.numel()))) != shuffle
        assert cache.dtype == (torch.float8_e4m3fn if shuffle else torch.bfloat16)
        assert q.shape == (3, 32, 128) and ctx.tolist() == [40] * 3
