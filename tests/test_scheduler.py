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


def steps_of(sched, n):
    return [[(c.seq.request_id, c.start, c.num_tokens) for c in run_step(sched)] for _ in range(n)]


def test_solo_prefill_gives_each_long_prompt_a_step_ahead_of_decoding():
    """solo_prefill (8, 40): prompts of 8..40 tokens each get a step of their own, whole, while the
    decoding sequence waits; a short prompt (under 8) and a long one (past 40, chunked) join the
    regular steps with the decode rows."""
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=48, solo_prefill=(8, 40))
    sched.add(seq("d", 4))
    assert steps_of(sched, 1) == [[("d", 0, 4)]]                 # short: a regular step
    for rid, n, first in (("a", 30, 100), ("b", 12, 200), ("s", 5, 300), ("l", 60, 400)):
        sched.add(seq(rid, n, first))
    assert steps_of(sched, 4) == [
        [("a", 0, 30)],                                         # alone, whole: d waits
        [("b", 0, 12)],
        [("d", 4, 1), ("a", 30, 1), ("b", 12, 1), ("s", 0, 5), ("l", 0, 40)],    # s short, l past 40
        [("d", 5, 1), ("a", 31, 1), ("b", 13, 1), ("s", 5, 1), ("l", 40, 20)]]


def test_solo_prefill_streak_lets_decoding_sequences_through():
    """At most max_solo_streak solo steps in a row while sequences decode, then a step of the
    decoding sequences alone (the waiting prompts keep their solo steps); none while a prompt is
    still prefilling in chunks."""
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=64, solo_prefill=(8, 40),
                      max_solo_streak=2)
    for i in range(4):
        sched.add(seq(f"p{i}", 10, 100 * i))
    assert steps_of(sched, 6) == [
        [("p0", 0, 10)], [("p1", 0, 10)],
        [("p0", 10, 1), ("p1", 10, 1)],                          # the streak's end: p0 waited two steps
        [("p2", 0, 10)], [("p3", 0, 10)],                        # a new streak
        [("p0", 11, 1), ("p1", 11, 1), ("p2", 10, 1), ("p3", 10, 1)]]
    chunked = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=16, solo_prefill=(8, 40))
    chunked.add(seq("long", 30))
    chunked.add(seq("next", 10, 100))
    assert steps_of(chunked, 2) == [[("long", 0, 16)], [("long", 16, 14), ("next", 0, 2)]]


def test_solo_prefill_streak_of_one_alternates_with_decoding():
    """A streak of one: each waiting prompt's solo step, then a step of the decoding sequences,
    and so on; the first prompt, with nothing decoding, starts at once."""
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=64, solo_prefill=(8, 40),
                      max_solo_streak=1)
    for rid, first in (("a", 0), ("b", 100), ("c", 200)):
        sched.add(seq(rid, 10, first))
    assert steps_of(sched, 5) == [[("a", 0, 10)], [("a", 10, 1)], [("b", 0, 10)], [("a", 11, 1), ("b", 10, 1)],
                                  [("c", 0, 10)]]
    with pytest.raises(ValueError):
        Scheduler(BlockManager(8, 4), 8, 64, (8, 40), max_solo_streak=0)


def test_a_prompt_refused_for_blocks_counts_its_prefix_lookup_once():
    """A waiting prompt that does not fit the free blocks is looked up in the prefix cache at
    every step (the solo step's try and the regular step's), but the hit-rate counters take it
    once, when it is admitted."""
    bm = BlockManager(12, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, solo_prefill=(8, 40))
    sched.add(seq("big", 30))                   # 8 blocks
    run_step(sched)
    sched.add(seq("next", 20, 100))             # 5 blocks: 4 are free
    queries = bm.prefix_queries
    for _ in range(3):
        assert [c.seq.request_id for c in run_step(sched)] == ["big"]
    assert bm.prefix_queries == queries
    sched.finish(sched.running[0], "stop")
    assert [c.seq.request_id for c in run_step(sched)] == ["next"]
    assert bm.prefix_queries == queries + 20


def test_solo_prefill_packs_the_prompts_queued_behind_the_first():
    """solo_pack 3: the qualifying prompts queued behind a solo step's first join it, in order, up
    to three and hi (40) tokens in all (or solo_pack_tokens; 0: no packing); one with a prefix-cache hit ends the pack (looked up, not
    counted, and admitted on its own next, its cached block read eagerly), and so does a short
    prompt (it keeps its place in the queue)."""
    bm = BlockManager(256, 4)
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=48, solo_prefill=(8, 40), solo_pack=3)
    sched.add(seq("d", 4))
    assert steps_of(sched, 1) == [[("d", 0, 4)]]                 # short: a regular step (d's block cached)
    for rid, n, first in (("a", 12, 100), ("b", 12, 200), ("c", 12, 300), ("e", 12, 400), ("f", 30, 500),
                          ("g", 12, 600), ("x", 10, 800), ("h", 12, 0), ("y", 10, 900), ("s", 5, 700)):
        sched.add(seq(rid, n, first))
    hits = bm.prefix_hits
    assert steps_of(sched, 5) == [[("a", 0, 12), ("b", 0, 12), ("c", 0, 12)],      # three at most
                                  [("e", 0, 12)],                                  # f would make 42
                                  [("f", 0, 30)],                                  # g would make 42
                                  [("g", 0, 12), ("x", 0, 10)],
                                  [("h", 4, 8)]]               # a hit on d's block: not packed, then alone
    assert bm.prefix_hits == hits + 4                          # counted once, when admitted
    assert steps_of(sched, 1) == [[("y", 0, 10)]]              # s, short, ends the pack
    assert ("s", 0, 5) in steps_of(sched, 1)[0]                # and joins the decode rows
    with pytest.raises(ValueError):
        Scheduler(BlockManager(8, 4), 8, 64, (8, 40), solo_pack=0)
    for cap, want in ((24, [[("a", 0, 12), ("b", 0, 12)], [("c", 0, 12)]]), (0, [[("a", 0, 12)], [("b", 0, 12)]])):
        capped = Scheduler(BlockManager(256, 4), 16, 48, (8, 40), solo_pack=3, solo_pack_tokens=cap)
        for rid, first in (("a", 100), ("b", 200), ("c", 300)):
            capped.add(seq(rid, 12, first))
        assert steps_of(capped, 2) == want             # solo_pack_tokens: 24 tokens a pack; 0: none
