"""Scheduler and block manager: plain Python, no model."""

import pytest

from qwen3vl_backend.engine.block_manager import BlockManager
from qwen3vl_backend.engine.scheduler import Scheduler
from qwen3vl_backend.engine.sequence import Sequence, Status
from qwen3vl_backend.sampling_params import SamplingParams


def seq(rid, n, first=0):
    return Sequence(rid, list(range(first, first + n)), SamplingParams(max_tokens=8))


def run_step(sched):
    batch = sched.schedule()
    sched.computed(batch)
    for c in batch:
        if c.samples:
            c.seq.output_ids.append(7)
    return batch


def test_token_budget_chunks_long_prefill():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    s = seq("a", 25)
    sched.add(s)
    sizes = [sum(c.num_tokens for c in run_step(sched)) for _ in range(3)]
    assert sizes == [10, 10, 5] and s.output_ids == [7]


def test_decodes_join_prefills_in_one_step():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    a = seq("a", 5)
    sched.add(a)
    run_step(sched)
    sched.add(seq("b", 30, first=100))
    batch = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in batch] == [("a", 1), ("b", 15)]


def test_max_num_seqs_caps_running():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for r in "abc":
        sched.add(seq(r, 3))
    run_step(sched)
    assert [s.request_id for s in sched.running] == ["a", "b"] and len(sched.waiting) == 1


def test_preemption_instead_of_failure_when_blocks_run_out():
    bm = BlockManager(6, 4, enable_prefix_cache=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq("a", 8), seq("b", 8, first=50)
    sched.add(a)
    sched.add(b)
    run_step(sched)                      # 4 blocks used, both sampled their first token
    for _ in range(8):
        run_step(sched)
    assert sched.num_preemptions >= 1
    assert b.status in (Status.WAITING, Status.RUNNING)
    assert len(a.output_ids) > 1         # the earlier request kept running


def test_abort_frees_blocks_at_once():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    s = seq("a", 10)
    sched.add(s)
    run_step(sched)
    assert bm.num_free < 16
    assert sched.abort("a") is s
    assert bm.num_free == 16 and s.finish_reason == "abort" and not sched.has_work()


def test_prompt_larger_than_cache_is_refused():
    sched = Scheduler(BlockManager(2, 4), max_num_seqs=8, max_num_batched_tokens=100)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        sched.add(seq("a", 8))


def test_prefix_cache_shares_full_blocks_only():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a = seq("a", 10)
    sched.add(a)
    run_step(sched)
    sched.finish(a, "stop")
    b = seq("b", 10)
    sched.add(b)
    batch = run_step(sched)
    assert b.num_cached_prompt == 8 and batch[0].start == 8 and batch[0].num_tokens == 2
    c = Sequence("c", [0, 1, 2, 99, 4, 5, 6, 7, 8, 9], SamplingParams())
    sched.add(c)
    run_step(sched)
    assert c.num_cached_prompt == 0      # differs inside the first block
    assert bm.prefix_hits == 8


def test_prefix_cache_keys_distinguish_media_with_equal_token_ids():
    bm = BlockManager(32, 4)
    a, b = seq("a", 9), seq("b", 9)
    a.cache_keys = [("img-1", i) for i in range(9)]
    b.cache_keys = [("img-2", i) for i in range(9)]
    bm.ensure(a, 9)
    a.num_computed = 9
    bm.register(a)
    bm.free(a)
    assert bm.match_prefix(b) == 0


def test_evicted_blocks_are_reused_when_free_list_is_empty():
    bm = BlockManager(3, 4)
    a = seq("a", 12)
    bm.ensure(a, 12)
    a.num_computed = 12
    bm.register(a)
    bm.free(a)
    b = seq("b", 12, first=500)
    assert bm.ensure(b, 12) and bm.num_free == 0
