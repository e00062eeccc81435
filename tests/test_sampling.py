"""Sampling parameters, the sampler and incremental detokenisation."""

import pytest
import torch

from qwen3vl_backend.engine.detokenizer import IncrementalDetokenizer
from qwen3vl_backend.layers.sampler import SampleRow, Sampler, apply_penalties, filter_probs
from qwen3vl_backend.processing.tokenizer import Tokenizer
from qwen3vl_backend.sampling_params import SamplingError, SamplingParams


@pytest.mark.parametrize("kwargs,message", [
    ({"max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"temperature": -0.5}, r"temperature must be in \[0, 100\]"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -3}, "top_k must be"),
    ({"presence_penalty": 3}, r"presence_penalty must be in \[-2, 2\]"),
    ({"stop": [""]}, "stop must be"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens must not exceed max_tokens"),
])
def test_invalid_sampling_parameters_are_refused(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**kwargs)


def test_unknown_sampling_parameter_is_refused():
    with pytest.raises(SamplingError, match="unknown sampling parameters: \\['beam_width'\\]"):
        SamplingParams.from_dict({"beam_width": 2})


def test_max_completion_tokens_is_max_tokens():
    assert SamplingParams.from_dict({"max_completion_tokens": 5}).max_tokens == 5


def test_unset_fields_take_the_sampling_defaults(tmp_path):
    """`defaults` fill what a request leaves out or sets null, never what it sets (0 included);
    generation_defaults reads the checkpoint's recommendations, and refuses a broken file."""
    from qwen3vl_backend.sampling_params import generation_defaults

    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    p = SamplingParams.from_dict({"max_tokens": 5, "top_p": None}, defaults=defaults)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (0.7, 0.8, 20, 1.05, 5)
    p = SamplingParams.from_dict({"temperature": "0", "top_k": "-1"}, coerce_strings=True, defaults=defaults)
    assert (p.temperature, p.top_k, p.top_p) == (0.0, -1, 0.8)
    assert SamplingParams.from_dict({}).temperature == 1.0                        # no defaults: the dataclass's
    (tmp_path / "generation_config.json").write_text(
        '{"do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0, "eos_token_id": 2}')
    assert generation_defaults(tmp_path) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0}
    (tmp_path / "generation_config.json").write_text('{"top_p": 1.5}')
    with pytest.raises(ValueError, match="top_p must be in"):
        generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"top_p": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        generation_defaults(tmp_path)
    assert generation_defaults(tmp_path / "missing") == {}


def test_top_k_top_p_min_p_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert filter_probs(probs, SamplingParams(top_k=2)).nonzero().flatten().tolist() == [0, 1]
    assert filter_probs(probs, SamplingParams(top_p=0.7)).nonzero().flatten().tolist() == [0, 1]
    assert filter_probs(probs, SamplingParams(min_p=0.5)).nonzero().flatten().tolist() == [0, 1]


def test_batched_sampling_draws_from_the_filtered_distributions():
    """Unseeded rows are drawn together (sample_batch): each row's draws follow its own filters."""
    from qwen3vl_backend.layers.sampler import sample_batch

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.7),
              SamplingParams(temperature=1.0, min_p=0.5), SamplingParams(temperature=1.0)]
    draws = torch.stack([sample_batch(logits, params) for _ in range(4000)])
    for row in range(3):                      # the filters keep tokens 0 and 1, renormalised 5:3
        counts = torch.bincount(draws[:, row], minlength=4)
        assert counts[2:].sum() == 0 and abs(counts[0] / 4000 - 0.625) < 0.03
    freq = torch.bincount(draws[:, 3], minlength=4) / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


@pytest.mark.parametrize("kw", [dict(top_k=20), dict(top_k=20, top_p=0.8), dict(top_k=20, top_p=0.01),
                                dict(top_k=1000, top_p=0.5, min_p=0.02), dict(top_k=1500), dict(top_p=0.3),
                                dict(min_p=0.05), dict()])
def test_candidates_keep_filter_probs_distribution(kw):
    """`candidates` (a top-k of the logits with the whole vocabulary's log-sum-exp, or a sort past
    TOPK_CANDIDATES) against filter_probs' definition over the whole vocabulary, rows of different
    temperatures. top_k 20 + top_p 0.8 keeps all 20 here (their mass is far under 0.8): top-p reads
    the softmax of the vocabulary, not of the top-k renormalised."""
    from qwen3vl_backend.layers.sampler import TOPK_CANDIDATES, candidates

    g = torch.Generator().manual_seed(len(kw))
    logits = torch.randn(3, 2000, generator=g) * torch.tensor([[1.0], [3.0], [6.0]])
    params = [SamplingParams(temperature=t, **kw) for t in (1.0, 0.7, 1.5)]
    probs, ids = candidates(logits, params)
    k = kw.get("top_k", 0)
    assert probs.shape == (3, k if 0 < k <= TOPK_CANDIDATES else 2000)
    assert (ids is None) == (not kw) and (ids is None or ids.shape == probs.shape)   # no filter: no sort
    for row, p in enumerate(params):
        got = probs[row] if ids is None else torch.zeros(2000).scatter(0, ids[row], probs[row])
        want = filter_probs(torch.softmax(logits[row] / p.temperature, dim=-1), p)
        assert torch.allclose(got / got.sum(), want, atol=1e-6, rtol=1e-4), (row, kw)
    if kw == dict(top_k=20, top_p=0.8):
        assert (probs > 0).sum(-1).tolist()[0] == 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_logsumexp_kernel_matches_torch(dtype):
    """qwen3vl_kernels.sample.row_logsumexp (the larger batches' softmax denominator: parts' maxima and sums,
    then one program a row) against the torch path's: rows of different temperatures, a vocabulary
    no multiple of the parts, a row of NaN (-inf), one with a +inf (the largest float) and one of
    -inf; at the vocabulary and 64 parts on a GPU."""
    from qwen3vl_kernels.sample import row_logsumexp
    from qwen3vl_backend.layers.sampler import _filter_rows, _logsumexp

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    for v, parts in ((1001, 4), (151936, 64)) if dev == "cuda" else ((1001, 4),):
        logits = (torch.randn(6, v, generator=g) * torch.tensor([[1.0], [4.0], [0.5], [2.0], [1.0], [1.0]])).to(dtype)
        logits[3], logits[4, 17], logits[5] = float("nan"), float("inf"), float("-inf")
        params = [SamplingParams(temperature=t, top_k=20) for t in (1.0, 0.7, 1.5, 0.3, 1.0, 2.0)]
        rows = _filter_rows(params, [20] * 6, dev)
        got = row_logsumexp(logits.to(dev), rows, parts=parts).cpu()
        want = _logsumexp(logits, rows.cpu())
        assert got[3].item() == want[3].item() == float("-inf") and got[5].item() == float("-inf")
        assert got[4].item() == want[4].item() == torch.finfo(torch.float32).max
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    with pytest.raises(ValueError, match="row_logsumexp"):
        row_logsumexp(logits.to(dev), rows[:2])


@pytest.mark.parametrize("kw", [dict(top_k=20, top_p=0.8), dict(top_k=7, min_p=0.1)])
def test_candidates_of_bf16_logits(kw):
    """`candidates` takes the logits in their own dtype (bf16 as the GPU's lm_head gives them): the
    top-k in bf16 and the log-sum-exp of the whole row give what the float32 copy gave. The logits
    are 2,048 distinct bf16 values, every one of magnitude 1/16 to 16 (no ties: a tie's order is
    each top-k's own; multiples of 1/16 up to 94 tied in bf16 and failed this on the H200)."""
    from qwen3vl_backend.layers.sampler import candidates

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(9)
    mags = torch.arange(0x3D80, 0x4180, dtype=torch.int16).view(torch.bfloat16)      # [1/16, 16): 1,024 values
    values = torch.cat([mags, -mags])
    logits = torch.stack([values[torch.randperm(len(values), generator=g)] for _ in range(3)])
    assert logits[0].unique().numel() == 2048
    params = [SamplingParams(temperature=t, **kw) for t in (1.0, 0.7, 2.5)]
    probs, ids = candidates(logits.to(dev), params)
    want_probs, want_ids = candidates(logits.float(), params)
    assert probs.dtype == torch.float32 and torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(probs.cpu(), want_probs, rtol=1e-5, atol=1e-7)


def test_one_sampled_row_draws_from_its_filtered_distribution():
    """A lone unseeded row takes the batched draw (the c1 case) and keeps to its filters."""
    torch.manual_seed(1)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    row = [SampleRow("a", SamplingParams(temperature=1.0, top_k=3, top_p=0.65), [], [], None)]
    draws = torch.stack([Sampler().sample(logits, row)[0] for _ in range(3000)])
    freq = torch.bincount(draws, minlength=4) / 3000       # top-p keeps 0 and 1 (0.4 < 0.65 <= 0.7)
    assert freq[2:].sum() == 0 and abs(freq[0] - 4 / 7) < 0.03


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_queues_every_path_without_a_host_sync():
    """The engine prepares the next step while this one runs: no draw may wait for the GPU (unseeded
    top-k candidates alone and batched, top-p over the sorted vocabulary, seeded, penalised, greedy,
    and logit_bias on a greedy and a sampled row, which it forces)."""
    logits = torch.randn(7, 151936, device="cuda").to(torch.bfloat16)
    rows = [SampleRow("a", SamplingParams(temperature=0.7, top_p=0.8, top_k=20), [], []),
            SampleRow("b", SamplingParams(temperature=1.0, top_p=0.9), [], []),
            SampleRow("c", SamplingParams(temperature=0.7, top_k=20, seed=3), [], []),
            SampleRow("d", SamplingParams(temperature=0.7, repetition_penalty=1.2), [5, 7], [9]),
            SampleRow("e", SamplingParams(temperature=0), [], [], {3}),
            SampleRow("f", SamplingParams(temperature=0, logit_bias={7: 100}), [], []),
            SampleRow("g", SamplingParams(temperature=1.0, logit_bias={"11": 100, "12": -100}), [], [])]
    s = Sampler()
    s.sample(logits, rows)                          # the seeded row's generator is made here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [s.sample(logits, rows), s.sample(logits[:1], rows[:1]), s.sample(logits[:2], rows[:2])]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(((o >= 0) & (o < 151936)).all() for o in outs)
    assert outs[0][4].item() == int(logits[4].float().index_fill(0, torch.tensor([3], device="cuda"), -1e9).argmax())
    assert outs[0][5:].tolist() == [7, 11]


def _race_reference(logits, params, u):
    """The kernel's draw by the torch path's pieces: `candidates`, then the largest p / E, E = -log(1 - u)."""
    from qwen3vl_backend.layers.sampler import candidates

    probs, ids = candidates(logits.float(), params)
    e = (-torch.log1p(-u[:, : probs.shape[1]].double())).clamp(min=1e-30)
    return ids.gather(1, (probs.double() / e).argmax(-1, keepdim=True))[:, 0]


def _kernel_rows(params, dev):
    return torch.tensor([[p.temperature, p.top_p if p.top_p < 1 else 2.0, p.min_p, p.top_k] for p in params],
                        device=dev)


def test_sample_kernel_takes_batches_with_top_k_only(monkeypatch):
    """kernel_top_k: batches whose rows each have a top_k up to MAX_K (past the vocabulary: the
    vocabulary), the switch on; else the torch path."""
    from qwen3vl_kernels import switches
    from qwen3vl_kernels.sample import MAX_K
    from qwen3vl_backend.layers.sampler import kernel_top_k

    def rows(n, k=20, **kw):
        return [SamplingParams(temperature=0.7, top_k=k, **kw)] * n

    assert kernel_top_k(rows(1), 151936) == 20 and kernel_top_k(rows(16, top_p=0.8), 151936) == 20
    assert kernel_top_k(rows(128), 151936) == 20
    assert kernel_top_k(rows(2, MAX_K), 151936) == MAX_K and kernel_top_k(rows(2, MAX_K + 1), 151936) == 0
    assert kernel_top_k(rows(1, 100), 50) == 50 and kernel_top_k(rows(1, 100), 151936) == 0
    assert kernel_top_k(rows(1) + rows(1, 0), 151936) == 0 and kernel_top_k([], 151936) == 0
    monkeypatch.setattr(switches, "SAMPLE_KERNEL", False)
    assert kernel_top_k(rows(1), 151936) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_kernel_draws_as_the_torch_path(dtype):
    """qwen3vl_kernels.sample (parts' maxima and log-sum-exp, each part's candidates at or above the row's
    threshold, then one program a row) against `candidates` + the same race for the same uniforms:
    rows of different temperature, top_k, top_p and min_p, a vocabulary no multiple of the parts;
    fewer parts than candidates (no threshold: each part's largest) and as many (the threshold from
    their maxima; the ties test below takes more parts). The logits are distinct multiples of 1/16, exact in bf16 (a tie's order is the
    kernel's own: lower index first)."""
    from qwen3vl_kernels.sample import candidates_width, sample_top_k

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(7)
    v = 501
    logits = torch.stack([(torch.randperm(v, generator=g) - 250.0) / 16 for _ in range(6)]).to(dtype)
    params = [SamplingParams(temperature=0.7, top_p=0.8, top_k=16), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=4.0, top_p=0.3, top_k=12), SamplingParams(temperature=2.5, min_p=0.5, top_k=16),
              SamplingParams(temperature=0.05, top_k=1), SamplingParams(temperature=3.0, top_p=0.05, top_k=9)]
    kp = candidates_width(16)
    for trial, parts in enumerate((4, 16)):
        u = torch.rand(6, kp, generator=g)
        got = sample_top_k(logits.to(dev), _kernel_rows(params, dev), u.to(dev), parts=parts).cpu()
        assert got.tolist() == _race_reference(logits, params, u).tolist(), (trial, parts)
    with pytest.raises(ValueError, match="sample_top_k"):
        sample_top_k(logits.to(dev), _kernel_rows(params, dev), torch.rand(6, 24, device=dev), parts=4)


def test_sample_kernel_threshold_keeps_ties_and_flat_rows():
    """With at least as many parts as candidates, a part offers only its values at or above the row's
    threshold (the KP-th largest part maximum), at most KP of them: rows of few distinct values
    (ties across and within parts), a flat row and a row of -inf but three draw as with two parts
    (every part's KP largest, no threshold). Keys order ties by index, so both see the same
    candidates; the draw stays among the row's top_k values."""
    from qwen3vl_kernels.sample import sample_top_k

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    v = 161
    logits = torch.stack([torch.randint(0, 3, (v,), generator=g).float(), torch.randint(0, 40, (v,), generator=g) / 8,
                          torch.zeros(v), torch.full((v,), float("-inf"))])
    logits[3, [7, 100, 159]] = torch.tensor([1.0, 3.0, 2.0])
    params = [SamplingParams(temperature=1.0, top_k=16), SamplingParams(temperature=0.5, top_p=0.9, top_k=12),
              SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, top_k=16)]
    rows = _kernel_rows(params, dev)
    u = torch.rand(4, 16, generator=g).to(dev)     # the candidates are the same for every u
    two = sample_top_k(logits.to(dev), rows, u, parts=2).cpu()
    assert sample_top_k(logits.to(dev), rows, u, parts=32).cpu().tolist() == two.tolist()
    for r, p in enumerate(params):      # among the top_k values; the flat row's among its first top_k ids
        assert logits[r, two[r]] >= logits[r].topk(p.top_k).values[-1], r
    assert two[2] < 3 and two[3] in (7, 100, 159)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sample_kernel_at_the_vocabulary_gpu():
    """The serving launch (64 parts a row, 151,936 columns, top_k up to 64) against the torch path's race."""
    from qwen3vl_kernels.sample import MAX_K, candidates_width, sample_top_k

    g = torch.Generator(device="cuda").manual_seed(11)
    logits = torch.randn(16, 151936, device="cuda", generator=g) * 2
    for ks in ([20] * 16, [1, 7, 20, 33, 64, 2, 3, 50] * 2):
        params = [SamplingParams(temperature=0.5 + i / 8, top_p=0.8 if i % 2 else 1.0, min_p=0.1 * (i % 3 == 0), top_k=k)
                  for i, k in enumerate(ks)]
        u = torch.rand(16, candidates_width(max(ks)), device="cuda", generator=g)
        assert max(ks) <= MAX_K
        assert sample_top_k(logits, _kernel_rows(params, "cuda"), u).tolist() == _race_reference(logits, params, u).tolist()


def test_sample_kernel_warm_launches_every_width():
    """warm (LLMEngine.warm_up on a GPU) launches each candidates width a top_k up to MAX_K takes."""
    from qwen3vl_kernels import sample

    launched = []
    real = sample.sample_top_k
    sample.sample_top_k = lambda logits, rows, u, parts=sample.PARTS: launched.append(u.shape[1]) or real(logits, rows, u, 4)
    try:
        widths = sample.warm(40, torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
    finally:
        sample.sample_top_k = real
    assert widths == launched == sorted({sample.candidates_width(k) for k in range(1, sample.MAX_K + 1)})


def test_sample_kernel_frequencies_and_non_finite_rows():
    """A row of NaN draws its first token, a +inf takes the mass, a row of -inf but one draws that
    one; on a GPU also: many rows of one distribution in one launch draw its filtered probabilities
    (the interpreter would take minutes; the draw against the torch path's race is tested above)."""
    from qwen3vl_kernels.sample import sample_top_k

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 1200 if dev == "cuda" else 3
    logits = torch.log(torch.tensor([0.05, 0.3, 0.1, 0.35, 0.2] + [0.0] * 3) + 1e-12)
    p = SamplingParams(temperature=1.0, top_k=4, top_p=0.8)      # keeps 3, 1, 4 (0.65 < 0.8 <= 0.85)
    u = torch.rand(n, 16, generator=torch.Generator().manual_seed(3))
    if dev == "cuda":
        got = sample_top_k(logits.expand(n, -1).contiguous().to(dev), _kernel_rows([p] * n, dev), u.to(dev), parts=2)
        freq = torch.bincount(got.cpu(), minlength=8) / n
        want = filter_probs(torch.softmax(logits, -1), p)
        assert freq[[0, 2, 5, 6, 7]].sum() == 0 and torch.allclose(freq, want, atol=0.04), (freq, want)
    odd = torch.zeros(3, 8)
    odd[0], odd[1, 6], odd[2] = float("nan"), float("inf"), float("-inf")
    odd[2, 5] = 0.0
    got = sample_top_k(odd.to(dev), _kernel_rows([p] * 3, dev), u[:3].to(dev), parts=2)
    assert got.tolist() == [0, 6, 5]
    # top-p keeps the token that crosses it (0.5 before it < 0.6): a near-zero uniform makes it win
    crossing = torch.log(torch.tensor([[0.5, 0.45, 0.05] + [1e-9] * 5]))
    u_cross = torch.full((1, 16), 0.5)
    u_cross[0, 1] = 1e-6
    got = sample_top_k(crossing.to(dev), _kernel_rows([SamplingParams(top_k=2, top_p=0.6)], dev), u_cross.to(dev), parts=2)
    assert got.tolist() == [1]


def test_penalties():
    logits = apply_penalties(torch.tensor([2.0, -2.0, 1.0]), SamplingParams(repetition_penalty=2.0), [0, 1], [])
    assert logits.tolist() == [1.0, -4.0, 1.0]
    logits = apply_penalties(torch.zeros(3), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [], [2, 2])
    assert logits.tolist() == [0.0, 0.0, -1.0]


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [Sampler().sample(logits[:1], [SampleRow("r", p, [], [], None)])[0] for _ in range(2)]
    s = Sampler()
    batched = s.sample(logits, [SampleRow("r", p, [], [], None),
                                SampleRow("x", SamplingParams(temperature=1.0), [], [], None),
                                SampleRow("y", SamplingParams(temperature=0.0), [], [], None)])
    assert alone[0] == alone[1] == batched[0]
    assert batched[2] == int(logits[2].argmax())


def test_banned_tokens_are_never_sampled():
    """Each row's own bans only, greedy or sampled, and the caller's logits left raw (logprobs)."""
    logits = torch.zeros(3, 10)
    logits[:, 3], logits[:, 5] = 100, 50
    raw = logits.clone()
    greedy = SamplingParams(temperature=0)
    rows = [SampleRow("a", greedy, [], [], {3}), SampleRow("b", greedy, [], [], None),
            SampleRow("c", SamplingParams(temperature=1.0, seed=1), [], [], {3, 5})]
    for _ in range(5):
        out = Sampler().sample(logits, rows).tolist()
        assert out[:2] == [5, 3] and out[2] not in (3, 5)
    assert torch.equal(logits, raw)


def test_greedy_rows_of_bf16_logits_with_bans():
    """Plain greedy rows take the argmax in the logits' own dtype (bf16 here, as the GPU's lm_head
    gives them), bans included, and leave the caller's logits raw."""
    logits = torch.zeros(2, 10, dtype=torch.bfloat16)
    logits[:, 3], logits[:, 5] = 100, 50
    raw = logits.clone()
    greedy = SamplingParams(temperature=0)
    assert Sampler().sample(logits, [SampleRow("a", greedy, [], [], {3}), SampleRow("b", greedy, [], [])]).tolist() \
        == [5, 3]
    assert torch.equal(logits, raw)


@pytest.mark.parametrize("v", [1, 63, 64, 1000, 151936])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_kernel_picks_torchs_index(v, dtype):
    """qwen3vl_kernels.argmax (a row split over 64 programs, then one a row) against torch.argmax: random
    rows, rows whose maximum repeats within a program's chunk and across chunks (the first
    wins), all -inf, and the maximum in the last, partial chunk."""
    from qwen3vl_kernels.argmax import argmax_rows

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(v)
    x = torch.randn(6, v, generator=g).to(dtype)
    x[1] = 0
    x[1, v // 2 :: 7] = 3                                   # ties across chunks: the first one wins
    x[2] = float("-inf")
    x[3, -1] = 50                                           # the last column
    x[4, : v // 3] = x[4].max()                             # a run of equal maxima from column 0
    want = x.argmax(dim=-1)
    assert torch.equal(argmax_rows(x.to(dev)).cpu(), want)
    assert torch.equal(argmax_rows(x[:, :0].to(dev).new_zeros(0, v)).cpu(), want[:0])
    with pytest.raises(ValueError, match="argmax_rows"):
        argmax_rows(torch.randn(3, 8, device=dev)[:, ::2])


@pytest.fixture(scope="module")
def tokenizer(tiny_dense):
    return Tokenizer(tiny_dense)


def test_known_tokenizations(tokenizer):
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n") == \
        [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]
    assert tokenizer.eos_token_ids == (151645, 151643)


@pytest.mark.parametrize("text", ["Hello  world,  with   spaces", "中文字符和emoji 🎉🚀 mixed", "tabs\tand\nnewlines\n\n x"])
def test_incremental_detokenizer_reassembles_text_exactly(tokenizer, text):
    ids = tokenizer.encode(text)
    d = IncrementalDetokenizer(tokenizer)
    pieces = [d.push(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_detokenizer_equals_a_whole_decode_on_arbitrary_ids(tokenizer):
    """Random ids (byte tokens mid-character, special tokens) decode incrementally to the same
    text as all at once, also when they stop inside a character (flush gives its U+FFFD)."""
    import random

    rng = random.Random(0)
    half_char = tokenizer.encode("𓀀")[:2]            # three byte tokens; two end mid-character
    for n in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(60)]
        ids += tokenizer.encode(" end.") if n % 2 else half_char
        d = IncrementalDetokenizer(tokenizer)
        text = "".join(d.push(t) for t in ids) + d.flush()
        assert text == d.text == tokenizer.decode(ids)
