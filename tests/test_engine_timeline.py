"""benchmarks.engine's step timeline: what each kernel's end adds to the span, the critical path
when PDL starts kernels early (their durations overlap), on a made-up profile."""

from types import SimpleNamespace

import pytest

from benchmarks.engine import end_increments, idle_gaps, kernel_timeline


def kernel(name, start, end):
    span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, time_range=span, device_index=0)


def test_end_increments_and_idle_gaps_sum_to_the_span():
    # gemv starts early (PDL) and waits for norm inside; attention starts after 1 us idle; merge
    # ends before attention does (no time of its own on the path)
    seq = [kernel("norm", 0, 2), kernel("gemv", 1, 7), kernel("attn", 8, 12), kernel("merge", 9, 11),
           kernel("o_proj", 10, 15)]
    adds = end_increments(seq)
    assert adds == [2, 5, 4, 0, 3]
    assert sum(adds) + 1 == seq[-1].time_range.end - seq[0].time_range.start


def test_timeline_ranks_kernels_by_what_their_ends_add():
    steps = [[kernel("norm", t, t + 2), kernel("gemv", t + 1, t + 7), kernel("attn", t + 7, t + 16)]
             for t in (0, 100)]
    text = kernel_timeline([k for step in steps for k in step], steps=2)
    ranked = [line.split()[-1] for line in text.splitlines()[2:5]]
    assert ranked == ["attn", "gemv", "norm"]
    assert "9.0 us" in text.splitlines()[2] and "ends +" in text


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1]])
def test_end_increments_need_kernels_in_start_order(order):
    ks = [kernel("a", 0, 4), kernel("b", 2, 6), kernel("c", 5, 9)]
    got = end_increments(sorted((ks[i] for i in order), key=lambda e: e.time_range.start))
    assert got == [4, 2, 3]
    assert end_increments([kernel("a", 0, 4), kernel("idle-then-b", 10, 12)]) == [4, 2]


def test_idle_gaps_are_named_by_the_kernels_around_them():
    # step: norm, then 3 us idle before gemv; attn overlaps merge, which ends first: the idle
    # time before sample starts at attn's end (the latest), not merge's
    steps = [[kernel("norm", t, t + 2), kernel("gemv", t + 5, t + 7), kernel("attn", t + 7, t + 16),
              kernel("merge", t + 8, t + 10), kernel("sample", t + 20, t + 21)] for t in (0, 100)]
    text = idle_gaps([k for step in steps for k in step], steps=2)
    lines = text.splitlines()[1:]
    # per step: attn -> sample 4 us, norm -> gemv 3, and sample -> norm (once, between the steps) 79 / 2
    assert lines[0].split()[0] == "39.5" and lines[0].endswith("sample -> norm")
    assert lines[1].split()[0] == "4.0" and lines[1].endswith("attn -> sample")
    assert lines[2].split()[0] == "3.0" and lines[2].endswith("norm -> gemv")
    assert len(lines) == 3



def test_the_benchmark_samples_with_the_rows_top_p_and_top_k(monkeypatch):
    """benchmarks.engine's --temperature / --top-p / --top-k reach every request of a row (its run
    on a stand-in engine whose requests each take three steps)."""
    import torch

    from benchmarks import engine as bench

    added = []

    class Engine:
        steps = 0

        def add_request(self, prompt, params, request_id):
            added.append(params)
            return request_id

        def has_unfinished(self):
            return self.steps < 3

        def step(self):
            self.steps += 1
            return [SimpleNamespace(request_id=f"b{i}", num_output_tokens=self.steps) for i in range(len(added))]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    row = bench.run(Engine(), ["a", "b"], 4, 0.7, top_p=0.8, top_k=20)
    assert [(p.temperature, p.top_p, p.top_k, p.max_tokens) for p in added] == [(0.7, 0.8, 20, 4)] * 2
    assert row["ttft_p50_ms"] >= 0


def test_replay_timing_and_profiles_sample_as_the_rows(monkeypatch, tmp_path):
    """--replay-timing's and --profile's decode steps take the run's --temperature / --top-p /
    --top-k (they were greedy whatever the rows sampled)."""
    from benchmarks import engine as bench

    args = SimpleNamespace(temperature=0.7, top_p=0.8, top_k=20)
    seen = []

    class Stop(Exception):
        pass

    def start_decoding(engine, prompts, params, tag, tokens):
        seen.append((tag, params.temperature, params.top_p, params.top_k))
        raise Stop

    monkeypatch.setattr(bench, "start_decoding", start_decoding)
    engine = SimpleNamespace(runner=SimpleNamespace(graphs=SimpleNamespace(fits=lambda n: True)))
    for call in (lambda: bench.replay_timing(engine, ["a"], bench.decode_params(args)),
                 lambda: bench.profile_decode(engine, ["a"], tmp_path, bench.decode_params(args))):
        with pytest.raises(Stop):
            call()
    assert seen == [("replay", 0.7, 0.8, 20), ("prof", 0.7, 0.8, 20)]
    greedy = bench.decode_params(SimpleNamespace(temperature=0.0, top_p=1.0, top_k=0))
    assert greedy.temperature == 0 and greedy.max_tokens == 64 and greedy.ignore_eos
