"""Block-scaled FP8: the format's reference numerics at awkward shapes, the layers that hold it,
and the tiny FP8 checkpoint (releases' layout) against transformers on the same weights
dequantized to float32.

The end-to-end bound, stated: the prompt ids are identical; the first greedy token is identical;
at the first step the log-probability of that token is within 0.1 of the reference's, and so is
the mean over the reference's 20 most likely tokens; and at most 30% of the cases diverge, within
16 greedy tokens, at a step where the reference's top-2 margin is at least 0.25 nats (our W8A8
path also rounds activations to fp8, which the dequantized reference does not, so a near-tie may
go either way; measured here the per-token error is 0.002-0.08).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CACHE, data_uri, image_bytes, make_image
from kernels.fp8 import (FP8, dequantize_weight_blocks, quantize_activations, quantize_weight_blocks, scale_grid,
                         w8a8_block_linear_reference)
from qwen3vl_backend import generate
from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.engine.llm_engine import LLMEngine
from qwen3vl_backend.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from qwen3vl_backend.layers.quantization import Fp8BlockLinearMethod
from qwen3vl_backend.processing.processor import Processor

LOGPROB_TOL, TOP, DIVERGE_MAX, TOKENS, CONFIDENT = 0.1, 20, 0.3, 16, 0.25


@pytest.mark.parametrize("n,k,block", [(1, 1, (128, 128)), (300, 200, (128, 128)), (130, 129, (128, 128)),
                                       (96, 80, (32, 32)), (33, 70, (16, 32))])
def test_weight_blocks_round_trip_within_e4m3_precision(n, k, block):
    w = torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None]          # rows of very different scale
    q, s = quantize_weight_blocks(w, block)
    assert q.dtype == FP8 and tuple(s.shape) == scale_grid(n, k, block) == (-(-n // block[0]), -(-k // block[1]))
    back = dequantize_weight_blocks(q, s, block)
    # e4m3 keeps 3 mantissa bits: within 1/16 of each element's block maximum
    blockmax = s.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k] * 448
    assert ((back - w).abs() <= blockmax / 16 + 1e-12).all()
    with pytest.raises(ValueError, match="scale grid"):
        dequantize_weight_blocks(q, torch.ones(s.shape[0] + 1, s.shape[1]), block)


@pytest.mark.parametrize("m", [1, 5, 33, 300])
@pytest.mark.parametrize("n,k,block", [(96, 200, (128, 128)), (130, 70, (32, 32))])
def test_w8a8_reference_matches_the_float_product(m, n, k, block):
    torch.manual_seed(m)
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    q, s = quantize_weight_blocks(w, block)
    y = w8a8_block_linear_reference(x, q, s, block)
    ref = x @ dequantize_weight_blocks(q, s, block).T
    assert (y - ref).norm() / ref.norm() < 0.05            # only the activations' rounding differs
    xq, xs = quantize_activations(x, block[1])
    assert xs.shape == (m, -(-k // block[1])) and xq.dtype == FP8


def _fp8_layer(layer_cls, *args, block=(32, 32), **kw):
    return layer_cls(*args, quant_method=Fp8BlockLinearMethod(block), dtype=torch.float32, **kw)


def test_merged_fp8_layers_place_weights_and_scales_per_shard():
    block, h = (32, 32), 70
    qkv = _fp8_layer(QKVParallelLinear, h, 32, 4, 2, False, block=block)
    shards = {"q": torch.randn(128, h), "k": torch.randn(64, h), "v": torch.randn(64, h)}
    for sid, w in shards.items():
        q, s = quantize_weight_blocks(w, block)
        qkv.weight.weight_loader(qkv.weight, q, sid)
        qkv.weight_scale_inv.weight_loader(qkv.weight_scale_inv, s, sid)
    x = torch.randn(5, h)
    ref = torch.cat([w8a8_block_linear_reference(x, *quantize_weight_blocks(w, block), block) for w in shards.values()], -1)
    torch.testing.assert_close(qkv(x), ref)
    with pytest.raises(ValueError, match="do not start on block boundaries"):
        _fp8_layer(MergedColumnParallelLinear, h, [48, 48], False, block=block)
    row = _fp8_layer(RowParallelLinear, 100, 40, False, block=block)     # partial blocks both ways
    w = torch.randn(40, 100)
    q, s = quantize_weight_blocks(w, block)
    row.weight.weight_loader(row.weight, q)
    row.weight_scale_inv.weight_loader(row.weight_scale_inv, s)
    torch.testing.assert_close(row(torch.ones(2, 100)), w8a8_block_linear_reference(torch.ones(2, 100), q, s, block))


# -- the tiny FP8 checkpoint against transformers ------------------------------------------------

def _tiny_fp8(dense: bool, block: tuple[int, int]):
    from qwen3vl_backend.tools.make_tiny_checkpoint import make_tiny_checkpoint, write_dequantized

    name = f"tiny-{'dense' if dense else 'moe'}-fp8-{block[0]}x{block[1]}"
    path, ref = CACHE / name, CACHE / (name + "-dequantized")
    if not (path / "config.json").exists():
        make_tiny_checkpoint(path, dense=dense, fp8_block=block)
    if not (ref / "config.json").exists():
        write_dequantized(path, ref)
    return path, ref


@pytest.fixture(scope="module", params=[(128, 128), (32, 32)], ids=["block-128", "block-32"])
def fp8_stack(request):
    oracle = pytest.importorskip("oracle")
    path, ref = _tiny_fp8(False, request.param)
    processor, model = oracle.load_reference(str(ref))
    engine = LLMEngine(EngineConfig(model_path=str(path), device="cpu", dtype="float32"))
    return path, processor, model, engine


def _cases():
    img = {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(160, 120, 8)))}}
    return [[{"role": "user", "content": "Tell me a story about a small robot."}],
            [{"role": "user", "content": [img, {"type": "text", "text": "What is this?"}]}],
            [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why is the sky blue?"}],
            [{"role": "user", "content": "请用中文介绍一下长城。"}]]


def _reference(processor, model, messages):
    """-> (prompt ids, first-step log-probs, greedy tokens, the top-2 margin at each step)."""
    images = [make_image(160, 120, 8)] if isinstance(messages[-1]["content"], list) else []
    ref_msgs = [{"role": m["role"], "content": [{"type": "image"} if p.get("type") == "image_url" else p
                                                for p in m["content"]] if isinstance(m["content"], list)
                 else m["content"]} for m in messages]
    text = processor.apply_chat_template(ref_msgs, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    steps = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
    margins = [float(lp.topk(2).values[0] - lp.topk(2).values[1]) for lp in steps]
    return inputs["input_ids"][0].tolist(), steps[0], out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), margins


def test_tiny_fp8_checkpoint_against_transformers_dequantized(fp8_stack):
    path, processor, model, engine = fp8_stack
    diverged = 0
    for messages in _cases():
        ids, ref_logprobs, ref_tokens, margins = _reference(processor, model, messages)
        ours = Processor(path, engine.tokenizer).process_messages(messages)
        assert ours.prompt_ids == ids
        logprobs = torch.log_softmax(engine.prompt_logits(ours)[-1].float(), -1)
        top = ref_logprobs.topk(TOP).indices
        err = (logprobs[top] - ref_logprobs[top]).abs()
        assert err[0] <= LOGPROB_TOL and err.mean() <= LOGPROB_TOL, err
        result = generate.run(str(path), {"messages": messages, "temperature": 0, "max_tokens": TOKENS}, engine=engine)
        tokens = result["output_token_ids"]
        assert tokens[0] == ref_tokens[0]
        first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        diverged += first is not None and margins[first] >= CONFIDENT
    assert diverged <= DIVERGE_MAX * len(_cases())


@pytest.mark.parametrize("dense,block", [(True, (32, 32)), (False, (128, 128)), (False, (32, 32))])
def test_fp8_weights_land_where_the_reference_has_them(dense, block):
    """Every quantized parameter, dequantized, is the reference checkpoint's tensor: q/k/v and
    gate/up shards, per-expert tensors and their scale grids all placed right."""
    from safetensors.torch import load_file

    from qwen3vl_backend.loader import load_model

    path, ref = _tiny_fp8(dense, block)
    model = load_model(path)
    want = {}
    for f in sorted(ref.glob("*.safetensors")):
        want.update(load_file(str(f)))
    checked = 0
    for name, module in model.named_modules():
        if getattr(module, "weight_scale_inv", None) is not None:
            w = dequantize_weight_blocks(module.weight, module.weight_scale_inv, block)
            if name.endswith("qkv_proj"):
                q = module.num_heads * module.head_dim
                kv = module.num_kv_heads * module.head_dim
                parts = dict(zip("qkv", w.split([q, kv, kv])))
                for s in "qkv":
                    assert torch.equal(parts[s], want[name.replace("qkv_proj", f"{s}_proj") + ".weight"]), name
            elif name.endswith("gate_up_proj"):
                gate, up = w.chunk(2)
                assert torch.equal(gate, want[name.replace("gate_up_proj", "gate_proj") + ".weight"])
                assert torch.equal(up, want[name.replace("gate_up_proj", "up_proj") + ".weight"])
            else:
                assert torch.equal(w, want[name + ".weight"]), name
            checked += 1
        if getattr(module, "quantized", False):
            w13 = torch.stack([dequantize_weight_blocks(module.w13[e], module.w13_weight_scale_inv[e], block)
                               for e in range(module.num_experts)])
            assert torch.equal(w13.transpose(1, 2), want[name + ".gate_up_proj"])
            checked += 1
    assert checked >= 8


def test_fp8_checkpoint_keeps_bf16_where_the_release_does(fp8_stack):
    path, _, _, engine = fp8_stack
    lm = engine.runner.model.model.language_model
    layer = lm.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == FP8 and layer.self_attn.o_proj.weight.dtype == FP8
    assert lm.embed_tokens.weight.dtype == torch.float32 and engine.runner.model.lm_head.weight.dtype == torch.float32
    assert layer.mlp.experts.w13.dtype == FP8 and layer.mlp.gate.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in engine.runner.model.model.visual.parameters())


def test_quantization_flag_quantizes_a_float_checkpoint_as_it_loads():
    """--quantization fp8 on the float twin of the FP8 checkpoint: the same weights and scales as
    the checkpoint quantized offline, so the same logits and tokens."""
    path, ref = _tiny_fp8(False, (128, 128))
    offline = LLMEngine(EngineConfig(model_path=str(path), device="cpu", dtype="float32"))
    online = LLMEngine(EngineConfig(model_path=str(ref), device="cpu", dtype="float32", quantization="fp8"))
    a, b = offline.runner.model.model.language_model.layers[1], online.runner.model.model.language_model.layers[1]
    assert b.self_attn.qkv_proj.weight.dtype == FP8 and b.mlp.experts.w2.dtype == FP8
    torch.testing.assert_close(b.mlp.experts.w13_weight_scale_inv, a.mlp.experts.w13_weight_scale_inv)
    torch.testing.assert_close(b.self_attn.qkv_proj.weight_scale_inv, a.self_attn.qkv_proj.weight_scale_inv)
    messages = _cases()[0]
    prompt = Processor(path, offline.tokenizer).process_messages(messages)
    torch.testing.assert_close(online.prompt_logits(prompt), offline.prompt_logits(prompt), rtol=0, atol=1e-4)
    with pytest.raises(Exception, match="quantization must be fp8"):
        EngineConfig(model_path=str(ref), device="cpu", quantization="int4")


@pytest.mark.parametrize("name,low,high", [("Qwen3-VL-30B-A3B-Instruct-FP8", 31e9, 34e9),
                                           ("Qwen3-VL-235B-A22B-Instruct-FP8", 235e9, 245e9)])
def test_fp8_releases_at_real_shapes_count_fp8_bytes(name, low, high):
    """Built on meta from the bundled configs (dummy weights use these shapes): half the bf16 bytes."""
    from qwen3vl_backend.loader import build_model, weight_bytes
    from qwen3vl_backend.model_config import ModelConfig

    configs = Path(__file__).resolve().parent.parent / "qwen3vl_backend" / "data" / "configs"
    model = build_model(ModelConfig.from_path(configs / f"{name}.json"), "meta", torch.bfloat16)
    assert low < weight_bytes(model) < high
    layer = model.model.language_model.layers[0]
    assert layer.mlp.experts.w13.dtype == FP8 and layer.mlp.experts.w13_weight_scale_inv.dtype == torch.float32
    assert layer.mlp.gate.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16


def test_dummy_fp8_weights_run(tmp_path):
    """--load-format dummy on an FP8 config: random fp8 weights and scales that compute."""
    import json
    import shutil

    from qwen3vl_backend.loader import load_model

    path, _ = _tiny_fp8(False, (128, 128))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    model = load_model(tmp_path, load_format="dummy")
    experts = model.model.language_model.layers[0].mlp.experts
    w = dequantize_weight_blocks(experts.w13[0], experts.w13_weight_scale_inv[0], (128, 128))
    assert experts.w13.dtype == FP8 and 0.01 < float(w.std()) < 0.04
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
