"""Engine behaviour on the tiny MoE checkpoint (CPU, float32)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import data_uri, first_steps, image_bytes, make_image
from qwen3vl_backend.config import ConfigError, EngineConfig
from qwen3vl_backend.engine.llm_engine import LLMEngine, PromptTooLongError
from qwen3vl_backend.processing.processor import Processor
from qwen3vl_backend.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def make_engine(path, **kw):
    return LLMEngine(EngineConfig(model_path=str(path), device="cpu", dtype="float32", **kw))


@pytest.fixture(scope="module")
def prompts(tiny_moe):
    proc = Processor(tiny_moe)
    img = {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(200, 150, 7)))}}
    msgs = [[{"role": "user", "content": "Count to ten."}],
            [{"role": "user", "content": [img, {"type": "text", "text": "Describe the picture."}]}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]]
    return [proc.process_messages(m) for m in msgs]


@pytest.fixture(scope="module")
def reference(tiny_moe, prompts):
    """Each prompt run alone with everything else at defaults."""
    engine = make_engine(tiny_moe)
    return [engine.generate([p], GREEDY)[0]["output_token_ids"] for p in prompts]


def test_batched_requests_match_running_alone(tiny_moe, prompts, reference):
    out = make_engine(tiny_moe).generate(prompts, GREEDY)
    assert [o["output_token_ids"] for o in out] == reference


def test_chunked_prefill_matches(tiny_moe, prompts, reference):
    out = make_engine(tiny_moe, max_num_batched_tokens=7).generate(prompts, GREEDY)
    assert [o["output_token_ids"] for o in out] == reference


def test_preemption_recomputes_to_the_same_output(tiny_moe, prompts, reference):
    engine = make_engine(tiny_moe, block_size=4, num_kv_blocks=30, enable_prefix_cache=False)
    out = engine.generate(prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [o["output_token_ids"] for o in out] == reference


def test_prefix_cache_reuses_kv_and_keeps_outputs(tiny_moe, prompts, reference):
    engine = make_engine(tiny_moe, block_size=4)
    first = engine.generate([prompts[1]], GREEDY)[0]
    again = engine.generate([prompts[1]], GREEDY)[0]
    assert first["cached_tokens"] == 0 and again["cached_tokens"] >= len(prompts[1].prompt_ids) - 4
    assert again["output_token_ids"] == first["output_token_ids"] == reference[1]


def test_warm_up_leaves_no_trace(tiny_moe, prompts, reference):
    """Serving warms the kernels up with synthetic prompts before the first request: afterwards
    no request is left, every KV block is free, no warm-up prefix is served from the cache (nor
    counted in the hit rate), and real requests answer as on a fresh engine."""
    engine = make_engine(tiny_moe, block_size=4, max_num_batched_tokens=64)
    drawn, sample = [], engine.runner.sampler.sample
    engine.runner.sampler.sample = lambda logits, rows: drawn.extend(r.params for r in rows) or sample(logits, rows)
    assert engine.warm_up((3, 16, 300)) > 0
    engine.runner.sampler.sample = sample
    # the sampler's paths drawn once: top-k candidates, the sorted vocabulary (top-p alone), seeded
    assert any(p.top_k == 20 and p.temperature > 0 and p.seed is None for p in drawn)
    assert any(p.top_k <= 0 and p.top_p < 1 and p.seed is not None for p in drawn)
    assert not engine.runner.sampler._generators
    bm = engine.block_manager
    assert not engine.has_unfinished() and not engine._requests and bm.num_free == bm.num_blocks
    assert bm.prefix_queries == bm.prefix_hits == 0
    span = min(engine.vocab_size, 4096) - 100
    warm = [100 + (i * 7919) % span for i in range(64)]              # the capped (64-token) warm-up prompt
    assert engine.generate([warm], GREEDY)[0]["cached_tokens"] == 0
    assert [o["output_token_ids"] for o in engine.generate(prompts, GREEDY)] == reference
    engine.add_request(prompts[0], GREEDY)
    with pytest.raises(RuntimeError, match="busy"):
        engine.warm_up()


def test_engine_sampling_defaults_are_the_checkpoints_unless_openai(tiny_moe, tmp_path):
    """--sampling-defaults model (the default): the checkpoint's generation_config.json (the
    release's 0.7 / 0.8 / 20); openai: none; a broken file fails the start, not each request."""
    import shutil

    from qwen3vl_backend.config import ConfigError
    from qwen3vl_backend.generate import _generate

    engine = make_engine(tiny_moe)
    assert engine.sampling_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0}
    seen = []
    real = engine.generate
    engine.generate = lambda prompts, params: seen.append(params) or real(prompts, params)
    _generate(engine, str(tiny_moe), {"messages": [{"role": "user", "content": "hi"}], "top_k": 5}, 2)
    assert (seen[0].temperature, seen[0].top_p, seen[0].top_k) == (0.7, 0.8, 5)
    assert make_engine(tiny_moe, sampling_defaults="openai").sampling_defaults == {}
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_moe, broken)
    (broken / "generation_config.json").write_text('{"temperature": -1}')
    with pytest.raises(ConfigError, match="temperature must be in"):
        make_engine(broken)
    with pytest.raises(ConfigError, match="sampling_defaults must be model or openai"):
        make_engine(tiny_moe, sampling_defaults="vllm")


def test_max_tokens_respected(tiny_moe, prompts):
    out = make_engine(tiny_moe).generate([prompts[0]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out["output_token_ids"]) == 3 and out["finish_reason"] == "length"


def test_stop_string_truncates_and_finishes(tiny_moe, prompts):
    engine = make_engine(tiny_moe)
    full = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop = full["text"][5:8]
    assert stop.strip()
    out = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == full["text"][: full["text"].find(stop)]
    # vLLM's include_stop_str_in_output: the text ends with the stop string; of two stops the one
    # that comes first ends it, whatever the list's order, and of two starting there the first listed
    later, first = full["text"][7:9], full["text"][5:7]
    assert full["text"].find(later) > full["text"].find(first)
    longer = first + full["text"][7]
    for stops, end in (([stop], stop), ([later, first], first), ([longer, first], longer)):
        kept = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stops,
                                                            include_stop_str_in_output=True))[0]
        assert kept["finish_reason"] == "stop" and kept["text"] == full["text"][: full["text"].find(end) + len(end)]


def test_stop_token_ids_and_min_tokens(tiny_moe, prompts, reference):
    engine = make_engine(tiny_moe)
    third = reference[0][2]
    out = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[third]))[0]
    assert out["output_token_ids"] == reference[0][:3] and out["finish_reason"] == "stop"
    out = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[reference[0][0]],
                                                       min_tokens=2))[0]
    assert out["output_token_ids"][0] != reference[0][0]


def test_seed_reproducibility(tiny_moe, prompts):
    engine = make_engine(tiny_moe)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=10, ignore_eos=True)
    a = engine.generate([prompts[0]], p)[0]["output_token_ids"]
    b = engine.generate([prompts[0], prompts[2]], [p, SamplingParams(temperature=1.0, max_tokens=5)])[0]
    assert a == b["output_token_ids"]


def test_abort_frees_kv_blocks(tiny_moe, prompts):
    engine = make_engine(tiny_moe)
    free = engine.block_manager.num_free
    rid = engine.add_request(prompts[1], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.block_manager.num_free < free
    assert engine.abort(rid)
    assert engine.block_manager.num_free == free and not engine.has_unfinished()


def test_overlap_schedule_changes_no_output(tiny_moe, prompts, reference):
    """Queueing step n+1 before step n is read back: the same results for every kind of request
    (stop strings, stop ids under min_tokens, penalties read back before their draw, seeded sampling,
    preemption), and no step is queued for a sequence already known to end."""
    stop = make_engine(tiny_moe).generate([prompts[2]], GREEDY)[0]["text"][4:7]
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
              SamplingParams(temperature=0, max_tokens=9, stop_token_ids=[reference[0][0]], min_tokens=2),
              SamplingParams(temperature=0, max_tokens=7, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=10, ignore_eos=True)]
    batch = [prompts[0], prompts[2], prompts[0], prompts[1], prompts[2]]
    results = {}
    for overlap in (False, True):
        engine = make_engine(tiny_moe, overlap_schedule=overlap, block_size=4, num_kv_blocks=26,
                             enable_prefix_cache=False)
        queued = []
        run = engine.runner.run
        engine.runner.run = lambda b, *a: queued.append(sum(c.num_tokens for c in b)) or run(b, *a)
        results[overlap] = engine.generate(batch, params), sum(queued), engine.scheduler.num_preemptions
    (plain, plain_tokens, plain_preempt), (overlapped, tokens, preempt) = results[False], results[True]
    assert overlapped == plain
    assert plain[1]["finish_reason"] == "stop"
    assert plain_preempt > 0 and preempt > 0
    # only sequences ended by a token the host had not yet seen (a stop) may cost one more token each
    assert plain_tokens <= tokens <= plain_tokens + 2 + preempt * 64


def test_decode_ids_come_from_the_step_in_flight_without_a_gather(tiny_moe, prompts, reference):
    """A decode step whose sequences are the step in flight's, in its order, takes its ids as the
    first rows of that step's sampled ids (a view: nothing copied or gathered); once a sequence
    has ended (other rows, or another order), the gather. The outputs are the reference's."""
    engine = make_engine(tiny_moe)
    runner, prepare, taken = engine.runner, engine.runner.prepare, []

    def recording(batch, pending=None):
        out = prepare(batch, pending)
        if pending is not None:
            taken.append("view" if out[0].data_ptr() == pending.data_ptr() else "gather")
        return out
    runner.prepare = recording
    lengths = [5, 12, 8]
    outs = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths])
    assert [o["output_token_ids"] for o in outs] == [r[:n] for r, n in zip(reference, lengths)]
    assert "view" in taken and "gather" in taken


def test_overlap_queues_the_next_step_before_reading_back(tiny_moe, prompts):
    engine = make_engine(tiny_moe)
    engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    counts = []
    while engine.has_unfinished():
        counts.append(len(engine.step()))
    assert counts == [0, 1, 1, 1, 1]        # outputs come one step late, the last after no new step


def test_prompt_longer_than_context_is_refused(tiny_moe, prompts):
    engine = make_engine(tiny_moe, max_model_len=16)
    with pytest.raises(PromptTooLongError, match="does not fit the context of 16 tokens"):
        engine.add_request(prompts[1], GREEDY)


def test_generation_stops_at_context_length(tiny_moe, prompts):
    n = len(prompts[0].prompt_ids)
    out = make_engine(tiny_moe, max_model_len=n + 4).generate([prompts[0]], GREEDY)[0]
    assert len(out["output_token_ids"]) == 4 and out["finish_reason"] == "length"


def test_config_errors_are_clear(tiny_moe, tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        EngineConfig(model_path=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown engine setting 'max_batch'"):
        EngineConfig.from_settings({"model_path": str(tiny_moe), "max_batch": "4"})
    with pytest.raises(ConfigError, match="max_num_seqs='many' is not a valid int"):
        EngineConfig.from_settings({"model_path": str(tiny_moe), "max_num_seqs": "many"})
    with pytest.raises(ConfigError, match="enable_prefix_cache='maybe' is not a valid bool"):
        EngineConfig.from_settings({"model_path": str(tiny_moe), "enable_prefix_cache": "maybe"})
    cfg = EngineConfig.from_settings({"model_path": str(tiny_moe), "max_num_seqs": "3", "enable_prefix_cache": "false"})
    assert cfg.max_num_seqs == 3 and cfg.enable_prefix_cache is False and cfg.device == "cpu"
    for word, want in (("On", True), ("off", False), (" 1 ", True), ("NO", False)):
        assert EngineConfig.from_settings({"model_path": str(tiny_moe), "enable_prefix_cache": word}
                                          ).enable_prefix_cache is want


def test_fp8_kv_cache_holds_the_rounded_keys_and_answers_within_a_bound(tiny_moe, prompts):
    """--kv-cache-dtype fp8_e4m3 (torch path): the cache is float8, a quarter of the float32
    cache's bytes a block; after the prompts' prefill it holds exactly the float cache's values
    rounded (write_kv's saturating cast). A prompt's prefill attends to its new keys, so the first
    token and its log-probability are the float cache's exactly; the first decode step reads the
    fp8 cache: the bound is the same token and its log-probability within 0.1 (0.011-0.033 on
    these prompts)."""
    from qwen3vl_backend.engine.model_runner import kv_block_bytes
    from qwen3vl_backend.layers.attention import kv_cast

    # no prefix cache: the second pass's prompts would prefill against their own cached (fp8) prefix
    plain, fp8 = (make_engine(tiny_moe, block_size=4, enable_prefix_cache=False, kv_cache_dtype=kv)
                  for kv in ("auto", "fp8"))
    assert fp8.cfg.kv_cache_dtype == "fp8_e4m3" and fp8.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    assert kv_block_bytes(fp8.cfg, 2, 64, 3) * 4 == kv_block_bytes(plain.cfg, 2, 64, 3) == 2 * 4 * 2 * 64 * 4 * 3
    a, b = first_steps(plain, prompts, 1), first_steps(fp8, prompts, 1)
    assert a == b
    for x, y in zip(plain.runner.kv_caches, fp8.runner.kv_caches):
        assert torch.equal(kv_cast(x, torch.float8_e4m3fn).view(torch.uint8), y.view(torch.uint8))
    a, b = first_steps(plain, prompts, 2), first_steps(fp8, prompts, 2)
    assert [s[0] for s in a] == [s[0] for s in b]
    for sa, sb in zip(a, b):
        assert sa[1][0] == sb[1][0] and abs(sa[1][1] - sb[1][1]) < 0.1
    assert any(sa[1][1] != sb[1][1] for sa, sb in zip(a, b))       # the fp8 cache was read
    with pytest.raises(ConfigError, match="fp8_e5m2 is not supported"):
        EngineConfig(model_path=str(tiny_moe), kv_cache_dtype="fp8_e5m2")


def test_cli_prints_one_json_object(tiny_moe, tmp_path):
    req = tmp_path / "req.json"
    img = data_uri(image_bytes(make_image(64, 48, 3)))
    req.write_text(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "Hi"}]}], "temperature": 0}))
    out = subprocess.run([sys.executable, "-m", "qwen3vl_backend.generate", "--model-path", str(tiny_moe),
                          "--request", str(req), "--max-tokens", "5", "--device", "cpu"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert set(result) == {"prompt_token_ids", "output_token_ids", "text", "finish_reason"}
    assert 151655 in result["prompt_token_ids"] and 1 <= len(result["output_token_ids"]) <= 5


def test_cli_reports_bad_request(tiny_moe, tmp_path):
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": "x"}]}]}))
    out = subprocess.run([sys.executable, "-m", "qwen3vl_backend.generate", "--model-path", str(tiny_moe),
                          "--request", str(req)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unsupported content part type 'audio_url'" in json.loads(out.stderr)["error"]


def test_visual_tokens_without_media_identity_are_never_shared(tiny_moe, prompts):
    """Embeddings given without their media hash must not hit another image's cached KV."""
    from qwen3vl_backend.processing.processor import ProcessedPrompt

    engine = make_engine(tiny_moe, block_size=4)
    with_image = prompts[1]
    first_pad = with_image.prompt_ids.index(151655)
    engine.generate([with_image], GREEDY)
    again = engine.generate([with_image], GREEDY)[0]
    assert again["cached_tokens"] > first_pad + 4          # the same image, named by its hash: shared
    anonymous = ProcessedPrompt(with_image.prompt_ids, [], with_image.positions, with_image.rope_delta)
    rid = engine.add_request(anonymous, GREEDY, vision_outputs=engine.encode_media(with_image.media))
    engine.step()
    assert engine._requests[rid].seq.num_cached_prompt <= first_pad   # text before the image only


@pytest.mark.parametrize("prep_in_attention", [False, True])
def test_fused_decoder_path_gives_the_same_output(tiny_moe, prompts, reference, monkeypatch, prep_in_attention):
    """The GPU's decoder path, interpreted on CPU: one qkv projection + qkv_prep_, the routing
    kernel (decode: with the post-attention norm, norm_route), residual RMSNorm kernels,
    split-context decode attention and the pair-path MoE. One short text prompt: the interpreter
    pays for every program, so the launches are kept small. `prep_in_attention`: all three
    switches on (else all off; PDL_PREFETCH is on by default), QWEN3VL_FUSED_DECODE_PREP (decode
    steps' q/k prep inside the attention kernel), QWEN3VL_PDL_PREFETCH (the kernels' reads before
    PDL's wait) and QWEN3VL_FUSED_INPUT_NORM (decode's input norm inside the qkv GEMV)."""
    import qwen3vl_kernels.attention
    import qwen3vl_kernels.fused_moe
    from qwen3vl_kernels import switches
    from qwen3vl_backend.engine.model_runner import select_kernels

    for switch in ("FUSED_DECODE_PREP", "PDL_PREFETCH", "FUSED_INPUT_NORM"):
        monkeypatch.setattr(switches, switch, prep_in_attention)

    calls = []
    norm_route = qwen3vl_kernels.fused_moe.norm_route
    monkeypatch.setattr(qwen3vl_kernels.fused_moe, "norm_route", lambda *a: calls.append(a[0].shape[0]) or norm_route(*a))
    monkeypatch.setattr(qwen3vl_kernels.attention, "MAX_SPLITS", 2)
    small = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "DOWN_BLOCK_N": 16, "DOWN_BLOCK_K": 64, "down_warps": 4}
    monkeypatch.setattr(qwen3vl_kernels.fused_moe, "PAIR_CONFIGS", {1: small})
    engine = make_engine(tiny_moe, attention_backend="triton", moe_backend="triton")
    select_kernels(engine.runner.model, engine.cfg, fuse=True)
    attn = engine.runner.model.model.language_model.layers[0].self_attn
    assert attn.prep_fn is not None and attn.qkv_proj.quant_method.skinny is not None
    assert (attn.decode_prep_fn is not None) == prep_in_attention
    assert engine.runner.model.model.language_model.layers[0].fuse_input_norm == prep_in_attention
    # 7 of the reference's 12 tokens (greedy: a prefix of them; 50 s a case here with 12): still
    # past the first KV block, so a decode step reads two pages
    short = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    assert len(prompts[0].prompt_ids) + short.max_tokens - 1 > engine.cfg.block_size
    assert engine.generate([prompts[0]], short)[0]["output_token_ids"] == reference[0][:short.max_tokens]
    assert calls and set(calls) == {1}         # decode; the prefill's 12 tokens take the unfused path


def test_decode_graph_inputs_from_host_lists(tiny_moe, prompts, reference, monkeypatch):
    """DecodeGraphs.run_host, the decode steps' path into the graphs (ModelRunner.run): slots,
    positions and context lengths packed in one buffer a size, padding rows included, the block
    tables and the ids copied apart. Replay is stood in by the eager forward over the graph's
    static buffers (what a capture records), on CPU with the Triton decode attention for decode
    steps (it reads the tables and lengths from those buffers; the prefill stays torch's). Three
    prompts, the image one with mRoPE's delta on its decode positions, through the size-4 graph
    (a padding row), give the reference's greedy tokens."""
    import torch

    import qwen3vl_kernels.attention
    from qwen3vl_kernels.attention import paged_decode_attention
    from qwen3vl_backend.engine.cuda_graphs import DecodeGraphs

    monkeypatch.setattr(qwen3vl_kernels.attention, "MAX_SPLITS", 2)     # the interpreter pays for every program
    engine = make_engine(tiny_moe)
    runner = engine.runner
    for layer in runner.model.model.language_model.layers:
        layer.self_attn.decode_fn = paged_decode_attention
    graphs = DecodeGraphs(runner.model, runner.kv_caches, engine.cfg.block_size,
                          -(-engine.cfg.max_model_len // engine.cfg.block_size), runner.num_blocks, (2, 4), "cpu")
    replays = []

    class Replay:
        def __init__(self, bs, logits):
            self.bs, self.logits = bs, logits

        def replay(self):
            replays.append(self.bs)
            self.logits.copy_(graphs._forward(self.bs, graphs._meta(self.bs)))

    vocab = runner.model_cfg.text.vocab_size
    graphs.graphs = {bs: (Replay(bs, logits := torch.empty(bs, vocab)), logits) for bs in graphs.sizes}
    runner.graphs = graphs
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    got = [r["output_token_ids"] for r in engine.generate(prompts, short)]
    assert got == [r[: short.max_tokens] for r in reference]
    assert replays == [4] * (short.max_tokens - 1)          # every decode step, in the padded size-4 graph


def test_triton_vision_attention_gives_the_same_output(tiny_moe, prompts, reference):
    """--mm-attention-backend triton (our varlen kernel, interpreted on CPU) against sdpa."""
    engine = make_engine(tiny_moe, mm_attention_backend="triton")
    assert engine.generate([prompts[1]], GREEDY)[0]["output_token_ids"] == reference[1]


def test_flash_attention_backend_needs_flash_attn(tiny_moe):
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="mm_attention_backend=fa3 needs the flash-attn package"):
        make_engine(tiny_moe, mm_attention_backend="fa3")


def test_vit_graph_padding_changes_nothing(tiny_moe):
    """What the ViT CUDA graphs compute (patches padded to a bucket, the padding a segment of its
    own, a fixed segment table), run eagerly in the interpreter, against the unpadded ViT."""
    import torch

    from qwen3vl_backend.engine.vision_graphs import VisionGraphs
    from qwen3vl_backend.loader import load_vision_model

    visual = load_vision_model(str(tiny_moe))        # torch attention: the graphs bring their kernel
    media = Processor(tiny_moe).process_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(64, 96, 3)))}}]}]).media
    pixels, grids = torch.cat([m.pixel_values for m in media]), [m.grid_thw for m in media]
    graphs = VisionGraphs(visual, buckets=(128, 512), max_segments=4)
    assert 128 < pixels.shape[0] < 512 and graphs.fits(pixels.shape[0], len(grids))
    want_e, want_ds = visual(pixels, grids)
    assert graphs.last_path is None
    got_e, got_ds = graphs(pixels, grids)
    assert graphs.last_path == "bucket"          # how the call ran, for the vit's stage lines
    for got, want in zip([got_e, *got_ds], [want_e, *want_ds]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not graphs.fits(513, 1) and not graphs.fits(10, 4)
    small = VisionGraphs(visual, buckets=(128,), max_segments=4)
    got_e, _ = small(pixels, grids)              # past the buckets, and no exact graphs off a GPU
    assert small.last_path == "eager"
    torch.testing.assert_close(got_e, want_e, rtol=1e-4, atol=1e-5)


def test_prefill_graph_padding_changes_nothing(tiny_moe, prompts, reference):
    """What the prefill CUDA graphs compute (one new prompt padded to a bucket, visual rows and
    DeepStack levels dense, the padding's K/V in the scratch block), run eagerly on CPU: the
    first token's logits and every later token as the eager path's. The image
    prompt runs first, so the text prompts after it see its DeepStack rows cleared."""
    import torch

    from qwen3vl_backend.engine.prefill_graphs import PrefillGraphs

    order = [1, 0, 2]                            # the image prompt first
    eager, padded = make_engine(tiny_moe), make_engine(tiny_moe)
    r = padded.runner
    r.prefill_graphs = PrefillGraphs(r.model, r.kv_caches, r.cfg.block_size, r.num_blocks, (8, 64, 256),
                                     r.device, r.dtype)
    assert all(r.prefill_graphs.bucket(n) > n for n in (len(p.prompt_ids) for p in prompts))   # padded
    first = {}
    for name, engine in (("eager", eager), ("padded", padded)):
        sample = engine.runner._sample

        def record(logits, chunks, banned, masks=None, sample=sample, name=name):
            first.setdefault((name, chunks[0].seq.request_id), logits.clone())
            return sample(logits, chunks, banned, masks)
        engine.runner._sample = record
        for i in order:
            out = engine.generate([prompts[i]], GREEDY)[0]
            assert out["output_token_ids"] == reference[i]
    assert r.prefill_graphs.replays == len(order)
    eager_first = [v for (n, _), v in first.items() if n == "eager"]
    padded_first = [v for (n, _), v in first.items() if n == "padded"]
    for want, got in zip(eager_first, padded_first):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packed_prefill_graph_matches_the_eager_batch(tiny_moe, prompts, reference):
    """What the packed prefill graphs compute (new prompts concatenated and padded to a bucket,
    attention causal within each by the varlen kernel, each prompt's last row's logits), run
    eagerly on CPU: the three prompts, image and text, submitted together take one packed step
    whose first-token logits are the eager batch's, and every later token is the reference's.
    Then a pack of two after it (the first pack's segment table and DeepStack rows replaced)."""
    import torch

    from qwen3vl_backend.engine.prefill_graphs import PrefillGraphs

    # (no prefix cache: the prompts come again)
    eager, packed = make_engine(tiny_moe), make_engine(tiny_moe, enable_prefix_cache=False)
    r = packed.runner
    r.prefill_graphs = PrefillGraphs(r.model, r.kv_caches, r.cfg.block_size, r.num_blocks, (8, 64, 256, 512),
                                     r.device, r.dtype, max_seqs=4)
    packed.scheduler.solo_prefill, packed.scheduler.solo_pack = (1, 512), 4
    assert r.prefill_graphs.packed_buckets == [256, 512]
    first = {}
    for name, engine in (("eager", eager), ("packed", packed)):
        sample = engine.runner._sample

        def record(logits, chunks, banned, masks=None, sample=sample, name=name):
            if all(c.start == 0 for c in chunks):
                first.setdefault(name, (logits.clone(), [c.seq.request_id for c in chunks]))
            return sample(logits, chunks, banned, masks)
        engine.runner._sample = record
        outs = engine.generate(prompts, GREEDY)
        assert [o["output_token_ids"] for o in outs] == reference
    assert r.prefill_graphs.packed_replays == 1 and r.prefill_graphs.replays == 0
    (want, want_ids), (got, got_ids) = first["eager"], first["packed"]
    assert got.shape[0] == len(prompts) and got_ids == want_ids
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    outs = packed.generate([prompts[2], prompts[1]], GREEDY)        # the image prompt second this time
    assert [o["output_token_ids"] for o in outs] == [reference[2], reference[1]]
    assert r.prefill_graphs.packed_replays == 2


def test_prefill_graphs_that_do_not_fit_leave_prefill_eager(caplog):
    """Out of GPU memory while capturing: one GPU warns and prefills eagerly; a tensor-parallel rank
    (whose peers are capturing with it) fails with the settings that make room."""
    import pytest
    import torch

    from qwen3vl_backend.engine.model_runner import capture_prefill_graphs

    class Graphs:
        def capture(self):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert capture_prefill_graphs(Graphs, 2048, 1) is None
    assert "--prefill-cuda-graph-max-tokens lower or 0" in caplog.text
    with pytest.raises(RuntimeError, match="prefill CUDA graphs up to 2048 tokens do not fit"):
        capture_prefill_graphs(Graphs, 2048, 2)

    class Fits:
        captured = False

        def capture(self):
            self.captured = True

    assert capture_prefill_graphs(Fits, 2048, 2).captured



def test_vit_fused_norms_equal_the_plain_blocks(tiny_moe):
    """VisionModel's encode with each residual add and LayerNorm in one launch (the GPU's
    switches.VIT_FUSED_NORM; here the kernel in the interpreter, float32) against the plain
    blocks: the same embeddings and DeepStack levels."""
    import torch

    from qwen3vl_backend.loader import load_vision_model

    visual = load_vision_model(str(tiny_moe))
    media = Processor(tiny_moe).process_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(64, 96, 3)))}}]}]).media
    x, cos, sin, cu = visual.prepare(media[0].pixel_values, [media[0].grid_thw])
    want_e, want_ds = visual.encode(x, cos, sin, cu, visual.attn_fn)
    got_e, got_ds = visual._encode_fused_norms(x, cos, sin, cu, visual.attn_fn)
    assert len(got_ds) == len(want_ds) > 0
    for got, want in zip([got_e, *got_ds], [want_e, *want_ds]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

def test_vit_keeps_the_tables_of_recent_grids(tiny_moe):
    """VisionModel.tables: a grid's position taps, rotary tables and offsets computed once while it is
    among the last TABLES_KEPT grids; the ViT's output is the same from kept tables."""
    import torch

    from qwen3vl_backend.loader import load_vision_model
    from qwen3vl_backend.models import vision

    visual = load_vision_model(str(tiny_moe))
    media = Processor(tiny_moe).process_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(64, 96, 3)))}}]}]).media
    pixels, grids = media[0].pixel_values, [media[0].grid_thw]
    first = visual(pixels, grids)
    kept = visual.tables(grids, pixels.device)
    assert visual.tables(grids, pixels.device) is kept
    again = visual(pixels, grids)
    for a, b in zip([first[0], *first[1]], [again[0], *again[1]]):
        assert torch.equal(a, b)
    for i in range(vision.TABLES_KEPT):                       # as many other grids push it out
        visual.tables([(1, 2, 2 * (i + 1))], pixels.device)
    fresh = visual.tables(grids, pixels.device)
    assert fresh is not kept and len(visual._tables) == vision.TABLES_KEPT
    for a, b in zip(fresh[:4], kept[:4]):
        assert torch.equal(a, b)
    assert fresh[4] == kept[4]


JSON_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8},
                                                "n": {"type": "integer", "minimum": 0, "maximum": 99}},
               "required": ["answer", "n"], "additionalProperties": False}


def _run_mixed(engine, ids, free: int, constrained: int, special: dict | None = None):
    """Step `free` greedy and `constrained` JSON-schema requests (or requests with the `special`
    sampling settings) together; -> (text and tokens by id, the order of events in steps whose
    sampling was deferred: forward, previous step read back, masks)."""
    for i in range(free):
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=24), f"free{i}")
    for i in range(constrained):
        extra = special or {"max_tokens": 60, "structured_output": {"json_schema": JSON_SCHEMA}}
        engine.add_request(ids, SamplingParams(temperature=1.0, seed=i, **extra), f"json{i}")
    text, tokens, events = {}, {}, []
    runner, model, finish = engine.runner, engine.runner.model, engine._finish_step

    def run(batch, banned=None, pending=None, masks=None):
        if callable(masks):
            deferred = masks
            events.append(["run"])

            def masks():
                out = deferred()
                events[-1].append("masks")
                return out
        return type(runner).run(runner, batch, banned, pending, masks)

    def forward(module, args):
        if events and len(events[-1]) == 1:
            events[-1].append("forward")

    def finish_step(step):
        if events and events[-1][-1] == "forward":
            events[-1].append("read back")
        return finish(step)
    runner.run, engine._finish_step = run, finish_step
    hook = model.register_forward_pre_hook(forward)
    try:
        while engine.has_unfinished():
            for out in engine.step():
                text[out.request_id] = text.get(out.request_id, "") + out.delta_text
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    finally:
        del runner.run, engine._finish_step
        hook.remove()
    return text, tokens, events


@pytest.mark.parametrize("free,constrained", [(3, 1), (1, 3)])
def test_constrained_requests_overlap_their_masks_with_the_forward(tiny_moe, free, constrained):
    """A grammar's mask needs the previous token, but only at sampling: with constrained requests
    in the batch (few or most) the next step is still queued before the previous one is read back,
    and the masks are computed after its forward is queued. Every answer validates, the others'
    tokens are as when alone, and the constrained ones as without the overlap."""
    engine = LLMEngine(EngineConfig(model_path=str(tiny_moe), device="cpu"))
    ids = engine.tokenizer.encode("Give JSON:")
    alone = engine.generate([ids], SamplingParams(temperature=0, max_tokens=24))[0]["output_token_ids"]
    text, tokens, events = _run_mixed(engine, ids, free, constrained)
    assert len(events) >= 10 and all(e == ["run", "forward", "read back", "masks"] for e in events), events
    engine.cfg.overlap_schedule = False
    serial_text, serial_tokens, serial_events = _run_mixed(engine, ids, free, constrained)
    assert serial_events == [] and serial_tokens == tokens
    assert all(tokens[f"free{i}"] == alone for i in range(free))
    for i in range(constrained):
        answer = json.loads(text[f"json{i}"])
        assert set(answer) == {"answer", "n"} and 0 <= answer["n"] <= 99 and len(answer["answer"]) <= 8


def test_penalized_requests_keep_the_overlap(tiny_moe):
    """Penalties read the tokens generated so far, but only at sampling: the step is queued before
    the previous one is read back, and read back before its draw, so the history is whole. The
    same tokens as without the overlap."""
    engine = LLMEngine(EngineConfig(model_path=str(tiny_moe), device="cpu"))
    ids = engine.tokenizer.encode("Say something:")
    special = {"max_tokens": 16, "ignore_eos": True, "presence_penalty": 1.5, "repetition_penalty": 1.2}
    _, tokens, events = _run_mixed(engine, ids, 1, 2, special)
    assert len(events) >= 10 and all(e == ["run", "forward", "read back", "masks"] for e in events), events
    engine.cfg.overlap_schedule = False
    _, serial_tokens, serial_events = _run_mixed(engine, ids, 1, 2, special)
    assert serial_events == [] and serial_tokens == tokens and all(len(tokens[f"json{i}"]) == 16 for i in range(2))


def test_warm_up_runs_the_steps_of_concurrent_traffic(tiny_moe):
    """warm_up's traffic: two prompts in a step at every power-of-two token count up to the chunk
    size and one past it, prompts prefilled beside a decoding sequence (odd and multiple-of-16
    totals), and nothing left behind (no request, every block free, no cached prefix)."""
    engine = LLMEngine(EngineConfig(model_path=str(tiny_moe), device="cpu", dtype="float32",
                                    max_num_batched_tokens=300, max_model_len=1024))
    steps, schedule = [], engine.scheduler.schedule

    def spy():
        batch = schedule()
        if batch:
            steps.append(sorted((c.num_tokens, c.start) for c in batch))
        return batch

    engine.scheduler.schedule = spy
    engine.scheduler.solo_prefill = (8, 300)           # as with a GPU's prefill graphs: pairs still share steps
    engine.warm_up()
    assert engine.scheduler.solo_prefill == (8, 300)
    pairs = {sum(n for n, _ in s) for s in steps if len(s) == 2 and all(start == 0 for _, start in s)}
    assert {2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257} <= pairs and max(pairs) <= 300
    mixed = [s for s in steps if any(n == 1 and start > 0 for n, start in s) and any(n > 1 for n, _ in s)]
    assert {sum(n for n, _ in s) % 2 for s in mixed} == {0, 1}
    assert not engine.has_unfinished() and engine.block_manager.num_free == engine.block_manager.num_blocks
    assert engine.block_manager.prefix_hits == 0 and not engine.block_manager._by_hash
    before = len(steps)
    engine.warm_up(traffic=False)
    assert not any(len(s) > 1 for s in steps[before:])         # single prompts only


def test_a_grammar_past_llguidance_limits_ends_its_request_alone_as_the_clients(tiny_moe, prompts):
    """A grammar can compile and still exhaust llguidance's parser mid-answer (`root ::= "a" root`
    forces ever more items). That request ends with the reason, marked as the client's (the
    server answers 400, not 500); the request beside it is unaffected."""
    engine = make_engine(tiny_moe)
    alone = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), "free")
    engine.add_request(prompts[1], SamplingParams(temperature=0, max_tokens=40,
                                                  structured_output={"grammar": 'root ::= "a" root'}), "grammar")
    outs: dict = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    last = outs["grammar"][-1]
    assert last.finish_reason == "error" and last.client_error
    assert last.error.startswith("structured_output stopped after ") and "Too many items" in last.error
    assert "<state>" not in last.error and "\n" not in last.error        # llguidance's dump stays in the log
    assert "".join(o.delta_text for o in outs["free"]) == alone["text"] and outs["free"][-1].finish_reason == "length"


def test_logit_bias_moves_only_its_own_request(tiny_moe, prompts, reference):
    """OpenAI's logit_bias on the sampled logits: -100 on greedy's first token makes another come
    first, +100 on a token forces it (greedy and seeded sampling alike, with a penalty taking the
    per-row path); the request batched beside them decodes as it does alone; logprobs stay the
    model's own."""
    engine = make_engine(tiny_moe)
    first, forced = reference[0][0], 1234
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logit_bias={str(first): -100}),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logit_bias={forced: 100}, logprobs=0),
              SamplingParams(temperature=1.0, seed=3, max_tokens=4, ignore_eos=True, logit_bias={forced: 100}),
              SamplingParams(temperature=1.0, seed=3, max_tokens=4, ignore_eos=True, repetition_penalty=1.1,
                             logit_bias={forced: 100})]
    for i, (p, sp) in enumerate(zip([prompts[0], prompts[1], prompts[0], prompts[0], prompts[0]], params)):
        engine.add_request(p, sp, f"r{i}")
    tokens, logprobs = {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            logprobs.setdefault(o.request_id, []).extend(o.logprobs or [])
    assert tokens["r0"][0] != first
    assert tokens["r1"] == reference[1][:4]
    assert all(tokens[f"r{i}"] == [forced] * 4 for i in (2, 3, 4))
    # the forced token's logprob is the model's (far from 0, which the biased distribution gives it)
    assert [t for t, _, _ in logprobs["r2"]] == [forced] * 4 and all(lp < -1 for _, lp, _ in logprobs["r2"])
    # greedy requests alone take the batch's one-argmax path
    alone = engine.generate([prompts[0], prompts[1]], [params[0], params[2]])
    assert alone[0]["output_token_ids"] == tokens["r0"] and alone[1]["output_token_ids"] == [forced] * 4
    assert engine.runner.sampler._bias == {}          # each request's device copy of its bias went with it


def test_logit_bias_is_checked_where_it_is_read(tiny_moe, prompts):
    from qwen3vl_backend.errors import RequestError
    from qwen3vl_backend.sampling_params import SamplingError

    for bias in ({"-1": 1}, {"1": 101}, {"1": float("nan")}, {"x": 1}, {"1": True}, [1, 2],
                 {str(i): 1 for i in range(301)}):
        with pytest.raises(SamplingError, match="logit_bias must map"):
            SamplingParams(logit_bias=bias)
    assert SamplingParams(logit_bias={"7": 2, 8: -1.5}).logit_bias == {7: 2.0, 8: -1.5}
    assert SamplingParams(logit_bias={}).logit_bias is None
    with pytest.raises(RequestError, match="logit_bias token ids must be in"):
        make_engine(tiny_moe).add_request(prompts[0], SamplingParams(logit_bias={10**9: 1}))
