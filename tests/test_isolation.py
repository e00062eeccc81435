"""One request can only fail itself: hostile sampling values are refused or made harmless where
they enter, and a step that still raises fails only the sequence that broke it."""

import pytest
import torch

from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.engine.llm_engine import InvalidRequestError, LLMEngine
from qwen3vl_backend.layers import sampler as sampler_mod
from qwen3vl_backend.sampling_params import SamplingError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
POISON = 4242               # a prompt holding this id makes the planted fault fire


@pytest.fixture(scope="module")
def engine(tiny_moe):
    return LLMEngine(EngineConfig(model_path=str(tiny_moe), device="cpu", dtype="float32", max_model_len=256))


def _prompts(engine):
    enc = engine.tokenizer.encode
    return [enc("<|im_start|>user\nCount to ten.<|im_end|>\n<|im_start|>assistant\n"),
            enc("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"),
            enc("<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")]


@pytest.mark.parametrize("field,value,message", [
    ("seed", 2**64, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
    ("seed", -2**63 - 1, "seed must be an integer"),
    ("repetition_penalty", 1e-300, r"repetition_penalty must be in \[0.01, 10\]"),
    ("temperature", float("inf"), r"temperature must be in \[0, 100\]"),
    ("temperature", float("nan"), r"temperature must be in \[0, 100\]"),
    ("top_p", float("nan"), r"top_p must be in \(0, 1\]"),
    ("max_tokens", 2**63, "max_tokens must be a positive integer below 2\\*\\*31"),
    ("stop", ["x"] * 33, "at most 32"),
    ("stop", ["\ud800"], "valid text"),
    ("stop_token_ids", list(range(257)), "at most 256 token ids"),
])
def test_out_of_range_values_are_refused_with_their_name(field, value, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**{field: value})


def test_extreme_but_meaningful_values_are_normalised():
    assert SamplingParams(temperature=1e-300).greedy
    assert SamplingParams(temperature=9e-6).greedy and not SamplingParams(temperature=1e-4).greedy
    assert SamplingParams(top_k=2**63).top_k == 0          # past any vocabulary: no cut
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def test_string_values_convert_only_for_triton_clients():
    d = {"max_tokens": "32", "temperature": "0.5", "ignore_eos": "false", "top_k": "5", "stop": "END"}
    p = SamplingParams.from_dict(d, coerce_strings=True)
    assert (p.max_tokens, p.temperature, p.ignore_eos, p.top_k, p.stop) == (32, 0.5, False, 5, ["END"])
    with pytest.raises(SamplingError, match="max_tokens must be a positive integer"):
        SamplingParams.from_dict(d)
    with pytest.raises(SamplingError, match="ignore_eos must be a bool, got 'maybe'"):
        SamplingParams.from_dict({"ignore_eos": "maybe"}, coerce_strings=True)
    with pytest.raises(SamplingError, match=r"temperature must be in \[0, 100\]"):
        SamplingParams.from_dict({"temperature": "inf"}, coerce_strings=True)


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]] * 3))
    params = [SamplingParams(temperature=1.0, top_p=1e-300)] * 3
    assert sampler_mod.sample_batch(logits, params).tolist() == [1, 1, 1]
    probs = sampler_mod.filter_probs(torch.tensor([0.1, 0.6, 0.3]), params[0])
    assert probs.tolist() == [0.0, 1.0, 0.0]


def test_non_finite_logits_never_reach_the_draw():
    logits = torch.tensor([[float("nan")] * 4, [0.0, 1.0, float("inf"), 0.0]])
    rows = [sampler_mod.SampleRow(f"r{i}", SamplingParams(temperature=1.0, seed=i), [], [], None) for i in range(2)]
    out = sampler_mod.Sampler().sample(logits, rows)
    assert out.shape == (2,) and all(0 <= t < 4 for t in out.tolist())


def test_engine_checks_ids_and_lengths_against_the_model(engine):
    ids = _prompts(engine)[0]
    v = engine.vocab_size
    with pytest.raises(InvalidRequestError, match=rf"prompt token ids must be in \[0, {v}\)"):
        engine.add_request(ids + [v], GREEDY)
    with pytest.raises(InvalidRequestError, match="prompt token ids"):
        engine.add_request(ids + [-1], GREEDY)
    with pytest.raises(InvalidRequestError, match="stop_token_ids must be in"):
        engine.add_request(ids, SamplingParams(stop_token_ids=[v + 5]))
    with pytest.raises(InvalidRequestError, match="max_tokens 257 exceeds the context of 256 tokens"):
        engine.add_request(ids, SamplingParams(max_tokens=257))
    assert not engine.has_unfinished()


def test_huge_top_k_and_tiny_values_run_beside_honest_requests(engine):
    prompts = _prompts(engine)
    alone = engine.generate([prompts[0]], GREEDY)[0]["output_token_ids"]
    hostile = [SamplingParams(temperature=1e-300, max_tokens=4), SamplingParams(top_p=1e-300, max_tokens=4),
               SamplingParams(top_k=2**63 - 1, max_tokens=4), SamplingParams(temperature=1.0, top_k=10**12, seed=3,
                                                                            max_tokens=4)]
    out = engine.generate([prompts[0]] + [prompts[1]] * 4, [GREEDY] + hostile)
    assert out[0]["output_token_ids"] == alone
    assert all(o["finish_reason"] in ("stop", "length") for o in out)


def _plant(monkeypatch, engine, where: str, after: int):
    """A fault that fires for any batch holding a poisoned sequence with `after` tokens out: in the
    forward pass, or in the sampler after the rows before it have drawn."""
    if where == "forward":
        run = engine.runner.run

        def faulty(batch, *a):
            if any(POISON in c.seq.prompt_ids and len(c.seq.output_ids) >= after for c in batch):
                raise RuntimeError("planted fault")
            return run(batch, *a)
        monkeypatch.setattr(engine.runner, "run", faulty)
    else:
        penalties = sampler_mod.apply_penalties

        def faulty(logits, params, prompt_ids, output_ids):
            if POISON in prompt_ids and len(output_ids) >= after:
                raise RuntimeError("planted fault")
            return penalties(logits, params, prompt_ids, output_ids)
        monkeypatch.setattr(sampler_mod, "apply_penalties", faulty)


@pytest.mark.parametrize("where", ["forward", "sampler"])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("after", [0, 3], ids=["prefill", "decode"])
def test_a_failing_sequence_fails_alone(tiny_moe, monkeypatch, where, overlap, after):
    engine = LLMEngine(EngineConfig(model_path=str(tiny_moe), device="cpu", dtype="float32", max_model_len=256,
                                    overlap_schedule=overlap))
    prompts = _prompts(engine)
    params = [SEEDED, GREEDY, GREEDY]
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    _plant(monkeypatch, engine, where, after)
    # the poisoned request samples with a penalty so the sampler fault fires on its row, after the
    # seeded row has drawn: that draw must not count
    poisoned = prompts[1][:-3] + [POISON] + prompts[1][-3:]
    out = engine.generate([prompts[0], poisoned, prompts[1], prompts[2]],
                          [SEEDED, SamplingParams(max_tokens=8, repetition_penalty=1.2), GREEDY, GREEDY])
    assert out[1]["finish_reason"] == "error"
    assert [o["output_token_ids"] for o in (out[0], out[2], out[3])] == [a["output_token_ids"] for a in alone]
    assert not engine.has_unfinished() and engine.block_manager.usage == 0
    assert engine.generate([prompts[2]], GREEDY)[0]["output_token_ids"] == alone[2]["output_token_ids"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sampler_survives_broken_rows_and_restores_seeded_streams(device, monkeypatch):
    """On the GPU a NaN reaching multinomial is a device-side assert that kills the process; and
    a step that fails after a seeded row drew must leave that row's stream where it was."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    logits = torch.randn(3, 50, device=device)
    logits[1] = float("nan")
    rows = [sampler_mod.SampleRow("seeded", SamplingParams(temperature=1.0, seed=5), [1], [], None),
            sampler_mod.SampleRow("broken", SamplingParams(temperature=1.0, seed=6), [POISON], [], None),
            sampler_mod.SampleRow("plain", SamplingParams(temperature=0.8), [2], [], None)]
    s = sampler_mod.Sampler()
    out = s.sample(logits, rows)
    assert out.device.type == device and all(0 <= t < 50 for t in out.tolist())

    fresh = sampler_mod.Sampler()
    fresh.sample(logits, rows)
    expected = fresh.sample(logits, rows)[0].item()     # the seeded row's second draw

    real = sampler_mod.apply_penalties
    monkeypatch.setattr(sampler_mod, "apply_penalties", lambda lg, p, pr, o: (_ for _ in ()).throw(
        RuntimeError("planted")) if POISON in pr else real(lg, p, pr, o))
    with pytest.raises(RuntimeError, match="planted"):
        s.sample(logits, rows)                          # the seeded row drew, then the step failed
    monkeypatch.setattr(sampler_mod, "apply_penalties", real)
    assert s.sample(logits, rows)[0].item() == expected
