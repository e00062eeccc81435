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
from qwen3vl_kernels.fp8 import (FP8, dequantize_weight_blocks, quantize_activations, quantize_weight_blocks, scale_grid,
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


# -- GPU kernels (Triton's interpreter on CPU, compiled on a GPU) -----------------------------------

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
KTOL = 2e-2 if CUDA else 1e-5          # against the same dequantized weights; tf32/bf16 dots on a GPU


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _fp8_experts(e, h, i, block, device):
    w13 = torch.randn(e, 2 * i, h) * h ** -0.5
    w2 = torch.randn(e, h, i) * i ** -0.5
    q13, s13 = zip(*(quantize_weight_blocks(w, block) for w in w13))
    q2, s2 = zip(*(quantize_weight_blocks(w, block) for w in w2))
    q13, s13, q2, s2 = (torch.stack(t).to(device) for t in (q13, s13, q2, s2))
    d13 = torch.stack([dequantize_weight_blocks(q, s, block) for q, s in zip(q13.cpu(), s13.cpu())]).to(device)
    d2 = torch.stack([dequantize_weight_blocks(q, s, block) for q, s in zip(q2.cpu(), s2.cpu())]).to(device)
    return q13, s13, q2, s2, d13, d2


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n,k,block", [(40, 70, (32, 32)), (130, 96, (128, 128)), (64, 200, (16, 64))])
def test_fp8_gemv_dequantizes_in_registers(m, n, k, block):
    from qwen3vl_kernels.fp8 import fp8_gemv

    x = torch.randn(m, k, device=DEV)
    q, s = quantize_weight_blocks(torch.randn(n, k) * k ** -0.5, block)
    q, s, bias = q.to(DEV), s.to(DEV), torch.randn(n, device=DEV)
    want = x @ dequantize_weight_blocks(q, s, block).T + bias
    assert _rel(fp8_gemv(x, q, s, block, bias, {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4}), want) < KTOL
    with pytest.raises(ValueError, match="fp8_gemv"):
        fp8_gemv(torch.randn(17, k, device=DEV), q, s, block)


@pytest.mark.parametrize("m,e,h,i,a,block", [(1, 8, 64, 64, 2, (32, 32)), (3, 6, 96, 32, 3, (16, 32)),
                                             (5, 4, 80, 32, 2, (32, 16))])
def test_fp8_moe_pair_path(m, e, h, i, a, block):
    from qwen3vl_kernels.fused_moe import fused_moe_pairs, fused_moe_reference
    from qwen3vl_backend.layers.moe import route

    q13, s13, q2, s2, d13, d2 = _fp8_experts(e, h, i, block, DEV)
    x = torch.randn(m, h, device=DEV)
    w, ids = route(torch.randn(m, e, device=DEV), a, True)
    out = fused_moe_pairs(x, q13, q2, w, ids, {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4}, s13, s2, block)
    assert _rel(out, fused_moe_reference(x, d13, d2, w, ids)) < KTOL


# (7, 8, 64, 32): tiles inside the scale blocks (one scale per tile and K step); (5, 4, 80, 40):
# the intermediate size 40 is no multiple of 16, so gate_up's tiles take a scale per column
@pytest.mark.parametrize("m,e,h,i,a,block", [(7, 8, 64, 32, 2, (32, 32)), (33, 4, 96, 64, 2, (32, 64)),
                                             (5, 4, 80, 40, 2, (32, 32))])
@pytest.mark.parametrize("fuse_silu", [True, False])
@pytest.mark.parametrize("persistent", [0, 1])
def test_fp8_moe_sorted_path(m, e, h, i, a, block, fuse_silu, persistent, monkeypatch):
    from qwen3vl_kernels.fused_moe import fused_moe, fused_moe_reference
    from qwen3vl_backend.layers.moe import route

    monkeypatch.setenv("QWEN3VL_W8A8_MIN_M", str(1 << 30))        # W8A16 here; W8A8 below
    q13, s13, q2, s2, d13, d2 = _fp8_experts(e, h, i, block, DEV)
    x = torch.randn(m, h, device=DEV)
    w, ids = route(torch.randn(m, e, device=DEV), a, True)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1,
           "FUSE_SILU": fuse_silu, "PERSISTENT": persistent}
    out = fused_moe(x, q13, q2, w, ids, cfg, w13_scale=s13, w2_scale=s2, block=block)
    assert _rel(out, fused_moe_reference(x, d13, d2, w, ids)) < KTOL


def _w8a8_moe_reference(x, d13, d2, w, ids, group):
    """fused_moe_reference with x and the SiLU*up intermediate quantized per token and group."""
    def fake_quant(t):
        q, s = quantize_activations(t, group)
        return q.float() * s.repeat_interleave(group, 1)[:, : t.shape[1]]

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xq = fake_quant(x.float())
    for ex in ids.unique().tolist():
        tok, slot = torch.where(ids == ex)
        gate, up = (xq[tok] @ d13[ex].T).chunk(2, dim=-1)
        y = fake_quant(torch.nn.functional.silu(gate) * up) @ d2[ex].T
        out.index_add_(0, tok, y * w[tok, slot, None].float())
    return out


@pytest.mark.parametrize("m,e,h,i,a,block", [(7, 8, 64, 32, 2, (32, 32)), (33, 4, 96, 64, 2, (32, 64))])
@pytest.mark.parametrize("persistent", [{}, {"PERSISTENT": 1}])
@pytest.mark.parametrize("scales_ahead", [True, False])
def test_fp8_moe_sorted_path_w8a8(m, e, h, i, a, block, persistent, scales_ahead, monkeypatch):
    """From W8A8_MIN_M tokens the activations are fp8 too: against the same quantization in torch.
    Each K step's scales loaded a step ahead or in the step (switches.SCALES_AHEAD): the same."""
    from qwen3vl_kernels import switches
    from qwen3vl_kernels.fused_moe import fused_moe, fused_moe_reference
    from qwen3vl_backend.layers.moe import route

    monkeypatch.setattr(switches, "SCALES_AHEAD", scales_ahead)
    monkeypatch.setenv("QWEN3VL_W8A8_MIN_M", "1")
    q13, s13, q2, s2, d13, d2 = _fp8_experts(e, h, i, block, DEV)
    x = torch.randn(m, h, device=DEV) * torch.logspace(-1, 1, h, device=DEV)     # groups of unlike ranges
    w, ids = route(torch.randn(m, e, device=DEV), a, True)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1, **persistent}
    out = fused_moe(x, q13, q2, w, ids, cfg, w13_scale=s13, w2_scale=s2, block=block)
    want = _w8a8_moe_reference(x, d13, d2, w, ids, block[1])
    assert _rel(out, want) < KTOL
    # and within e4m3's activation error of the unquantized product
    assert _rel(out, fused_moe_reference(x, d13, d2, w, ids)) < 6e-2


@pytest.mark.parametrize("m", [1, 7])
def test_fp8_moe_down_gemm_takes_its_own_launch_shape(m, monkeypatch):
    """A config's "DOWN" entry launches the down GEMM with its own tile, warps and stages (not its
    rows' BLOCK_M), and the result is still the W8A8 product (one token: pair blocks)."""
    import qwen3vl_kernels.fused_moe as fm
    from qwen3vl_backend.layers.moe import route

    monkeypatch.setenv("QWEN3VL_W8A8_MIN_M", "1")
    block = (32, 32)
    q13, s13, q2, s2, d13, d2 = _fp8_experts(8, 64, 32, block, DEV)
    x = torch.randn(m, 64, device=DEV)
    w, ids = route(torch.randn(m, 8, device=DEV), 2, True)
    launched, plain = [], fm._grouped_gemm
    monkeypatch.setattr(fm, "_grouped_gemm", lambda *a, **k: launched.append(a[10]) or plain(*a, **k))
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1,
           "DOWN": {"BLOCK_N": 16, "num_warps": 2, "num_stages": 2, "BLOCK_M": 64}}
    out = fm.fused_moe(x, q13, q2, w, ids, cfg, w13_scale=s13, w2_scale=s2, block=block)
    assert [(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]) for c in launched] == [
        (16, 16, 4, 1), (16, 16, 2, 2)]          # gate_up's fused halves of 32; down's own
    assert _rel(out, _w8a8_moe_reference(x, d13, d2, w, ids, block[1])) < KTOL


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the kernel runs on a GPU (off it, the torch reference runs)")
@pytest.mark.parametrize("t,k,group", [(1, 128, 128), (5, 300, 128), (33, 200, 32), (4, 70, 64), (954, 2048, 128)])
@pytest.mark.parametrize("column_major", [False, True])
def test_activation_quantization_kernel(t, k, group, column_major):
    from qwen3vl_kernels.fp8 import quantize_activations_fp8

    x = (torch.randn(t, k) * torch.logspace(-3, 2, k)).to(DEV).bfloat16()
    x[0, :group] = 0.0                                      # an all-zero group keeps a finite scale
    q, s = quantize_activations_fp8(x, group, scales_column_major=column_major)
    rq, rs = quantize_activations(x, group)
    assert s.shape == rs.shape and s.stride(1) == (t if column_major else 1)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    back, ref = (v.float() * sc.repeat_interleave(group, 1)[:, :k] for v, sc in ((q, s), (rq, rs)))
    # x / scale may round differently in its last bit, and e4m3 then by one step (32 near 448)
    step = rs.repeat_interleave(group, 1)[:, :k] * 32
    assert ((back - ref).abs() <= step).all() and (back != ref).float().mean() < 1e-3


@pytest.mark.parametrize("t,k,group,pad", [(3, 384, 128, 0), (5, 256, 64, 8), (40, 96, 32, 0), (2, 512, 128, 128)])
@pytest.mark.parametrize("column_major", [False, True])
def test_flat_quantize_kernel_gives_the_per_token_kernels_bits(t, k, group, pad, column_major, monkeypatch):
    """The fixed (token, group)-pair tiles against the program-per-token kernel, bit for bit
    (each launch on this device: the interpreter off a GPU). Four pairs a program, with 3, 4 and
    6 groups a row: tiles cross rows, and the last one has pairs past the end; rows `pad`
    elements apart."""
    from qwen3vl_kernels import fp8

    monkeypatch.setattr(fp8, "FLAT_QUANTIZE_ELEMENTS", 4 * group)
    base = (torch.randn(t, k + pad) * torch.logspace(-3, 2, k + pad)).to(DEV).bfloat16()
    x = base[:, :k]
    x[0, :group] = 0.0
    (q1, s1), (q2, s2) = (fp8.quantize_launch(x, group, column_major, flat) for flat in (False, True))
    assert torch.equal(s1, s2) and s1.stride() == s2.stride()
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8))


def test_flat_quantize_where_it_was_measured_faster(monkeypatch):
    """By shape (QWEN3VL_FLAT_QUANTIZE unset): the flat kernel for a prefill's MoE intermediates
    (30B: 954 tokens x 8 experts, K 768), where an H200 measured it 2x faster; a program per
    token for the 954-token inputs of K 2048 / 4096 and for decode batches, where it lost. The
    variable forces either."""
    import importlib

    from qwen3vl_kernels import fp8, switches

    assert fp8.flat_quantize_pays(7632, 768, 128) and fp8.flat_quantize_pays(4096, 1024, 128)
    for t, k in ((954, 2048), (954, 4096), (512, 768), (16, 2048), (7632, 2048), (4095, 768)):
        assert not fp8.flat_quantize_pays(t, k, 128), (t, k)
    for value, want in (("1", True), ("0", False), ("", None)):
        monkeypatch.setenv("QWEN3VL_FLAT_QUANTIZE", value)
        assert importlib.reload(switches).FLAT_QUANTIZE is want
    importlib.reload(switches)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 4, 16, 64, 128, 300, 2048])
def test_fp8_gpu_paths_at_30b_shapes(m):
    """Real 30B-A3B shapes in bf16 on the GPU: the linear path (GEMV, then cuBLAS's block fp8) at
    qkv's and o_proj's shapes (the H200 table's INT_CVT and HALF2 at one row) and both MoE paths,
    against the dequantized weights."""
    from qwen3vl_kernels.fp8 import fp8_linear
    from qwen3vl_kernels.fused_moe import fused_moe, fused_moe_reference, pair_path_max_m
    from qwen3vl_backend.layers.moe import route

    block = (128, 128)
    for n, k in ((5120, 2048), (2048, 4096)):
        xk = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q, s = (t.cuda() for t in quantize_weight_blocks(torch.randn(n, k) * k ** -0.5, block))
        ref = xk.float() @ dequantize_weight_blocks(q, s, block).T
        # prefill quantizes x too, and so may the GEMV at 2-16 rows (its table's A8 shapes)
        assert _rel(fp8_linear(xk, q, s, block), ref) < (2e-2 if m == 1 else 6e-2)
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    q13, s13, q2, s2, d13, d2 = _fp8_experts(128, 2048, 768, block, "cuda")
    xb = x[: min(m, 300)]
    w, ids = route(torch.randn(xb.shape[0], 128, device="cuda"), 8, True)
    out = fused_moe(xb, q13, q2, w, ids, w13_scale=s13, w2_scale=s2, block=block)
    # the sorted path (past the table's pair_path_max_m: from 2 rows on the H200) quantizes the activations too
    pairs = xb.shape[0] <= pair_path_max_m(128, 768, 2048, xb.device, block)
    assert _rel(out, fused_moe_reference(xb.float(), d13, d2, w, ids)) < (2e-2 if pairs else 6e-2)


def _exact_fp8_groups(m: int, k: int, group: int) -> torch.Tensor:
    """(m, k) float32 whose every group of `group` features is e4m3 values times a power of two,
    with one element at +-448 times it: the group's scale is that power of two and x / scale is
    exact in e4m3, so the interpreter's rounding to e4m3 (which can drop the carry into the
    exponent: 126.8 -> 64) never enters."""
    q = (torch.randn(m, k) * 100).clamp(-448, 448).to(FP8).float()
    q[:, ::group] = 448.0 * (torch.randint(0, 2, (m, len(range(0, k, group)))) * 2 - 1).float()
    pow2 = 2.0 ** torch.randint(-9, -3, (m, -(-k // group))).float()
    return q * pow2.repeat_interleave(group, 1)[:, :k]


@pytest.mark.parametrize("m", [2, 5])
@pytest.mark.parametrize("n,k,block", [(130, 300, (128, 128)), (96, 200, (32, 64))])
def test_fp8_gemv_w8a8_exact_groups(m, n, k, block):
    """The GEMV's A8 mode (rows quantized per group in registers, fp8 dots) in the interpreter too,
    on rows exact in e4m3, against the same quantization in torch."""
    from qwen3vl_kernels.fp8 import fp8_gemv

    x = _exact_fp8_groups(m, k, block[1]).to(DEV)
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(n, k) * k ** -0.5, block))
    got = fp8_gemv(x, q, s, block, config={"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1,
                                           "A8": True})
    assert _rel(got, w8a8_block_linear_reference(x, q, s, block)) < KTOL


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the interpreter rounds to e4m3 unlike the hardware)")
@pytest.mark.parametrize("m", [2, 5, 16])
@pytest.mark.parametrize("n,k,block", [(5120, 2048, (128, 128)), (130, 300, (128, 128)), (96, 200, (32, 64))])
def test_fp8_gemv_w8a8(m, n, k, block):
    """A8: the GEMV quantizes its rows per group in registers and dots in fp8; against the same
    quantization in torch, and within e4m3's activation error of the float product."""
    from qwen3vl_kernels.fp8 import fp8_gemv

    x = (torch.randn(m, k) * torch.logspace(-1, 1, k)).cuda().bfloat16()
    q, s = (t.cuda() for t in quantize_weight_blocks(torch.randn(n, k) * k ** -0.5, block))
    got = fp8_gemv(x, q, s, block, config={"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "A8": True})
    assert _rel(got, w8a8_block_linear_reference(x.float(), q, s, block)) < 1e-2
    assert _rel(got, x.float() @ dequantize_weight_blocks(q, s, block).T) < 6e-2


@pytest.mark.parametrize("mode,x_value", [("INT_CVT", 1.0), ("HALF2", 2.0 ** -8)])
def test_fp8_row_kernel_reads_every_e4m3_value_exactly(mode, x_value):
    """The one-row kernel's two conversions (INT_CVT: float32 by integer ops; HALF2: f16x2 and
    float16 products, on the CPU the emulation of its PTX) read each of the 254 finite e4m3 values,
    subnormals and both zeros, back exactly: one weight a row, unit scales, x all ones (HALF2:
    2^-8, whose 2^8 on x makes the product the weight)."""
    from qwen3vl_kernels.fp8 import fp8_gemv

    values = torch.arange(256, dtype=torch.int32)
    values = values[(values & 0x7F) != 0x7F].to(torch.uint8)
    n, k = values.numel(), 128
    q = torch.zeros(n, k, dtype=torch.uint8)
    q[torch.arange(n), torch.arange(n) % k] = values
    q = q.view(FP8).to(DEV)
    got = fp8_gemv(torch.full((1, k), x_value, device=DEV), q, torch.ones(-(-n // 16), 1, device=DEV), (16, 128),
                   config={"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, mode: True})
    torch.testing.assert_close(got[0].cpu(), values.view(FP8).float() * x_value, rtol=0, atol=0)


# HALF2 multiplies in float16: each product and each K step's sum rounded to float16's 11 bits
# (2^-12 relative, against 2^-9 for the bf16 a decode row is stored in). The bound: a few times that.
HALF2_TOL = 2e-3


@pytest.mark.parametrize("n,k,block,block_k", [(130, 300, (128, 128), 64), (96, 200, (32, 64), 256),
                                               (70, 296, (16, 64), 128), (40, 4096, (32, 32), 1024)])
@pytest.mark.parametrize("group_scale", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["INT_CVT", "HALF2"])
def test_fp8_row_kernel_against_the_dequantized_weights(n, k, block, block_k, group_scale, bias, mode):
    """The one-row kernel at awkward shapes: partial row and scale blocks, K steps inside a block
    or of several, a partial last step, scales per column or a block at a time, a bias. HALF2
    (float16 pairs; on the CPU the emulation of its PTX) within float16's rounding of the float32
    product, and of INT_CVT's answer."""
    from qwen3vl_kernels.fp8 import fp8_gemv

    x = (torch.randn(1, k) * torch.logspace(-1, 1, k)).to(DEV)
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(n, k) * torch.logspace(-2, 0, k), block))
    b = torch.randn(n, device=DEV) if bias else None
    cfg = {"BLOCK_N": 8, "BLOCK_K": block_k, "num_warps": 4, "GROUP_SCALE": group_scale}
    want = x @ dequantize_weight_blocks(q, s, block).T + (b if bias else 0)
    got = fp8_gemv(x, q, s, block, b, config={**cfg, mode: True})
    assert _rel(got, want) < (KTOL if mode == "INT_CVT" else HALF2_TOL)
    if mode == "HALF2":
        assert _rel(got, fp8_gemv(x, q, s, block, b, config={**cfg, "INT_CVT": True})) < HALF2_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_row_kernel_half2_overflow_computes_again_exactly(dtype):
    """A row whose products pass float16's range (x of 3e4: ~1e4 * 256 each) leaves HALF2's sums
    infinite; those programs compute again by INT_CVT, so the answer is INT_CVT's and finite. A
    program whose rows stayed in range keeps its float16 answer: the row x is large only in
    columns that rows 16.. weigh (block rows of 16, programs of 8 rows). That answer differs
    from INT_CVT's where x carries more bits than float16 holds (float32); a bfloat16 x's
    products and sums can come out exact (they did on the H200), so there only its bound holds."""
    from qwen3vl_kernels.fp8 import fp8_gemv

    n, k, block = 48, 256, (16, 64)
    w = torch.randn(n, k)
    w[:16, 128:] = 0
    q, s = (t.to(DEV) for t in quantize_weight_blocks(w, block))
    x = torch.randn(1, k)
    x[0, 128:] *= 3e4
    x = x.to(DEV, dtype)
    cfg = {"BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 4}
    got = fp8_gemv(x, q, s, block, config={**cfg, "HALF2": True})
    exact = fp8_gemv(x, q, s, block, config={**cfg, "INT_CVT": True})
    assert got.isfinite().all()
    torch.testing.assert_close(got[:, 16:], exact[:, 16:], rtol=0, atol=0)
    assert _rel(got[:, :16], exact[:, :16]) < HALF2_TOL
    if dtype == torch.float32:
        assert not torch.equal(got[:, :16], exact[:, :16])


@pytest.mark.parametrize("k,stride_pad,int_cvt", [(296, 0, True), (298, 0, False), (296, 2, False)])
def test_fp8_row_kernel_only_where_the_bytes_are_whole_ints(k, stride_pad, int_cvt, monkeypatch):
    """INT_CVT reads the weights four bytes at a time: K or a row stride not a multiple of four
    runs the converting kernel instead (same answer)."""
    import qwen3vl_kernels.fp8

    launched = []
    for name in ("_fp8_row_kernel", "_skinny_kernel"):
        kernel = getattr(qwen3vl_kernels.fp8, name)

        class Recorder:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                return lambda *a, **kw: launched.append(self.name) or self.kernel[grid](*a, **kw)
        monkeypatch.setattr(qwen3vl_kernels.fp8, name, Recorder(kernel, name))
    block = (16, 64)
    q, s = quantize_weight_blocks(torch.randn(40, k), block)
    # padded rows made on the device (a copy there would be contiguous)
    q = torch.cat([q.view(torch.uint8), torch.zeros(40, stride_pad, dtype=torch.uint8)], 1).to(DEV).view(FP8)[:, :k]
    s, x = s.to(DEV), torch.randn(1, k, device=DEV)
    assert q.stride(0) == k + stride_pad
    got = qwen3vl_kernels.fp8.fp8_gemv(x, q, s, block, config={"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 4,
                                                      "INT_CVT": True})
    assert launched == ["_fp8_row_kernel" if int_cvt else "_skinny_kernel"]
    assert _rel(got, x @ dequantize_weight_blocks(q, s, block).T) < KTOL


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("block_k,block", [(32, (32, 128)), (128, (32, 32)), (256, (16, 64)), (64, (16, 64))])
def test_fp8_gemv_scales_a_block_at_a_time(m, block_k, block):
    """GROUP_SCALE: a K step inside one scale block takes one scale, a step of whole blocks one
    per block (the last block partial: K = 300), the same answer as a scale per column."""
    from qwen3vl_kernels.fp8 import fp8_gemv

    x = torch.randn(m, 300, device=DEV)
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(70, 300) * torch.logspace(-2, 0, 300), block))
    cfg = {"BLOCK_N": 16, "BLOCK_K": block_k, "num_warps": 4}
    per_column = fp8_gemv(x, q, s, block, config=cfg)
    per_block = fp8_gemv(x, q, s, block, config={**cfg, "GROUP_SCALE": True})
    torch.testing.assert_close(per_block, per_column, rtol=1e-5, atol=1e-5)
    assert _rel(per_block, x @ dequantize_weight_blocks(q, s, block).T) < KTOL


@pytest.mark.parametrize("block_k,block", [(32, (32, 64)), (64, (32, 32)), (128, (16, 32))])
def test_fp8_moe_pairs_scale_a_block_at_a_time(block_k, block):
    """The pair kernels' GROUP_SCALE (gate_up's and down's, each its own key): the same answer as
    a scale per column, with K steps inside one block or over whole blocks."""
    from qwen3vl_kernels.fused_moe import fused_moe_pairs, fused_moe_reference
    from qwen3vl_backend.layers.moe import route

    m, e, h, i, a = 2, 6, 96, 64, 3
    q13, s13, q2, s2, d13, d2 = _fp8_experts(e, h, i, block, DEV)
    x = torch.randn(m, h, device=DEV)
    w, ids = route(torch.randn(m, e, device=DEV), a, True)
    cfg = {"BLOCK_N": 16, "BLOCK_K": block_k, "num_warps": 4, "DOWN_BLOCK_N": 16, "DOWN_BLOCK_K": block_k,
           "down_warps": 4}
    per_column = fused_moe_pairs(x, q13, q2, w, ids, cfg, s13, s2, block)
    per_block = fused_moe_pairs(x, q13, q2, w, ids, {**cfg, "GROUP_SCALE": True, "DOWN_GROUP_SCALE": True},
                                s13, s2, block)
    torch.testing.assert_close(per_block, per_column, rtol=1e-5, atol=1e-5)
    assert _rel(per_block, fused_moe_reference(x, d13, d2, w, ids)) < KTOL


def _pairs_with_another_ranks_experts(i: int, block: tuple[int, int]):
    """Pair-path inputs where expert parallelism hands some slots id E (another rank's expert):
    3 tokens, 6 experts of hidden size 96 and intermediate size `i`, top 3; fp8 experts whose
    scale rows sit before NaNs (where expert E's would be), routing with such slots, and a token
    whose pairs are all elsewhere (row 1). -> (x, routing weights, ids, q13, s13, q2, s2, d13, d2)."""
    m, e, h = 3, 6, 96
    q13, s13, q2, s2, d13, d2 = _fp8_experts(e, h, i, block, DEV)
    s13, s2 = (torch.cat([t, torch.full_like(t[:1], float("nan"))])[:e] for t in (s13, s2))
    x = torch.randn(m, h, device=DEV)
    w = torch.rand(m, 3, device=DEV)
    ids = torch.tensor([[0, 5, e], [e, e, e], [3, 1, 2]], dtype=torch.int32, device=DEV)
    return x, w, ids, q13, s13, q2, s2, d13, d2


def _local_reference(x, w, ids, d13, d2):
    """fused_moe_reference over this rank's experts only (another rank's slots add nothing)."""
    from qwen3vl_kernels.fused_moe import fused_moe_reference

    keep = ids < d13.shape[0]
    return fused_moe_reference(x, d13, d2, w * keep, torch.where(keep, ids, 0))


@pytest.mark.parametrize("block_k,block,group_scale,prefetch", [
    (32, (32, 32), False, False), (64, (32, 32), True, True), (128, (16, 64), True, False), (32, (32, 128), False, True)])
def test_fp8_moe_pairs_never_read_another_ranks_scales(block_k, block, group_scale, prefetch):
    """Expert parallelism hands the pair kernels id E for another rank's experts, whose scale rows
    do not exist. The scales here sit before NaNs (where expert E's would be): the answer stays
    the reference's, with K steps inside one scale block and over several (GROUP_SCALE's loads,
    not masked by slot, once read them and made the token NaN), PREFETCH's first step, a K
    (intermediate 100) that ends mid-step, and a token whose pairs are all elsewhere (zeros)."""
    from qwen3vl_kernels.fused_moe import fused_moe_pairs

    x, w, ids, q13, s13, q2, s2, d13, d2 = _pairs_with_another_ranks_experts(100, block)
    cfg = {"BLOCK_N": 16, "BLOCK_K": block_k, "num_warps": 4, "DOWN_BLOCK_N": 16, "DOWN_BLOCK_K": block_k,
           "down_warps": 4, "GROUP_SCALE": group_scale, "DOWN_GROUP_SCALE": group_scale}
    got = fused_moe_pairs(x, q13, q2, w, ids, cfg, s13, s2, block, prefetch=prefetch)
    assert got.isfinite().all() and not got[1].any()
    assert _rel(got, _local_reference(x, w, ids, d13, d2)) < KTOL


class _Launches:
    """A Triton kernel whose launches are counted (kernel[grid](...) as before)."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("i,block_k,prefetch,stages", [(64, 32, False, 3), (96, 64, True, 4), (40, 128, True, 2)])
def test_moe_pairs_gate_up_through_a_tma_descriptor(fp8, i, block_k, prefetch, stages, monkeypatch):
    """TMA (gate_up's weight tiles through a TMA descriptor, pipelined): the plain kernel's
    answer to float32 rounding, with an intermediate size that ends mid-tile (40 in tiles of 16:
    the last rows read up's rows or the next expert's, not stored), K steps inside one scale
    block and over several (the TMA kernel scales a block at a time, the plain one here a column
    at a time), PREFETCH or not, another rank's experts (id E: scale rows of NaN where they
    would be) and a token whose pairs all lie elsewhere (zeros, act rows never written: NaN)."""
    from qwen3vl_kernels import fused_moe as fm

    block = (32, 32)
    x, w, ids, q13, s13, q2, s2, d13, d2 = _pairs_with_another_ranks_experts(i, block)
    cfg = {"BLOCK_N": 16, "BLOCK_K": block_k, "num_warps": 4, "DOWN_BLOCK_N": 16, "DOWN_BLOCK_K": 32,
           "down_warps": 4, "num_stages": stages}
    weights = (q13, q2, s13, s2) if fp8 else (d13, d2, None, None)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *s, **k: empty(*s, **k).fill_(float("nan")))  # unwritten = NaN
    plain = fm.fused_moe_pairs(x, weights[0], weights[1], w, ids, cfg, weights[2], weights[3], block,
                               prefetch=prefetch)
    up = _Launches(fm._pair_gate_up_tma_kernel)
    monkeypatch.setattr(fm, "_pair_gate_up_tma_kernel", up)
    tma = fm.fused_moe_pairs(x, weights[0], weights[1], w, ids, {**cfg, "TMA": True}, weights[2], weights[3], block,
                             prefetch=prefetch)
    monkeypatch.undo()
    assert up.count == 1
    assert tma.isfinite().all() and not tma[1].any()
    torch.testing.assert_close(tma, plain, rtol=1e-5, atol=1e-5)
    assert _rel(tma, _local_reference(x, w, ids, d13, d2)) < KTOL


def test_tma_rows_refuses_what_a_descriptor_cannot_read():
    """A descriptor needs contiguous rows 16 bytes apart and power-of-two box sides of at most 256
    (at least 16 bytes a box row), and fp8 scale blocks a power of two wide: anything else keeps
    the plain pair kernels."""
    from qwen3vl_kernels.fused_moe import tma_rows_ok

    w = torch.zeros(4, 64, 96, dtype=torch.float8_e4m3fn)
    assert tma_rows_ok(w, 16, 32) and tma_rows_ok(w, 8, 256) and tma_rows_ok(w.float(), 16, 4)
    assert not tma_rows_ok(torch.zeros(4, 64, 104, dtype=w.dtype)[:, :, :96], 16, 32)   # not contiguous
    assert not tma_rows_ok(torch.zeros(4, 64, 40, dtype=w.dtype), 16, 32)               # 40-byte rows
    assert not tma_rows_ok(w, 16, 512) and not tma_rows_ok(w, 24, 32) and not tma_rows_ok(w, 16, 8)
    assert tma_rows_ok(w, 16, 32, (16, 64)) and not tma_rows_ok(w, 16, 32, (16, 48))     # scales a block at a time


def test_a_triton_without_tensor_descriptors_runs_the_plain_pair_kernels(monkeypatch):
    """Where Triton has no host-side TensorDescriptor (before 3.4; users' containers), a table's
    TMA key is ignored: the plain gate_up kernel runs and answers, not an ImportError mid-decode."""
    import builtins

    from qwen3vl_kernels import fused_moe as fm

    real_import = builtins.__import__

    def no_descriptors(name, *args, **kwargs):
        if name == "triton.tools.tensor_descriptor":
            raise ImportError("no tensor descriptors in this Triton")
        return real_import(name, *args, **kwargs)

    fm._tensor_descriptor.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_descriptors)
    try:
        x, w, ids, q13, s13, q2, s2, d13, d2 = _pairs_with_another_ranks_experts(64, (32, 32))
        assert not fm.tma_rows_ok(q13, 16, 32, (32, 32))
        cfg = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "DOWN_BLOCK_N": 16, "DOWN_BLOCK_K": 32, "down_warps": 4,
               "TMA": True}
        out = fm.fused_moe_pairs(x, q13, q2, w, ids, cfg, s13, s2, (32, 32))
        assert _rel(out, _local_reference(x, w, ids, d13, d2)) < KTOL
    finally:
        monkeypatch.undo()
        fm._tensor_descriptor.cache_clear()
    assert fm.tma_rows_ok(q13, 16, 32, (32, 32))


@pytest.mark.parametrize("group_scale", [False, True])
def test_fp8_gemv_with_the_input_norm_inside(group_scale):
    """NORM on the fp8 GEMV's row: the residual add and RMSNorm in the kernel give what the norm
    then the GEMV give; a launch shape asking for INT_CVT (whose kernel has no norm) returns None."""
    from qwen3vl_kernels.fp8 import fp8_gemv
    from qwen3vl_kernels.rmsnorm import rmsnorm_reference

    k, block = 256, (32, 64)
    x, res = torch.randn(1, k, device=DEV), torch.randn(1, k, device=DEV)
    nw = 1 + 0.1 * torch.randn(k, device=DEV)
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(96, k) * k ** -0.5, block))
    cfg = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1, "GROUP_SCALE": group_scale}
    new_res = torch.empty_like(x)
    got = fp8_gemv(x, q, s, block, config=cfg, norm=(res, nw, 1e-6, new_res))
    assert torch.equal(new_res, x + res)
    torch.testing.assert_close(got, fp8_gemv(rmsnorm_reference(x, nw, 1e-6, res), q, s, block, config=cfg),
                               rtol=1e-5, atol=1e-5)
    assert fp8_gemv(x, q, s, block, config={**cfg, "INT_CVT": True, "BLOCK_K": 256},
                    norm=(res, nw, 1e-6, new_res)) is None


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("down_k,group_scale", [(32, False), (64, True), (128, False)])
def test_moe_pairs_prefetch_gives_the_same_bits(fp8, down_k, group_scale):
    """PREFETCH (down reads its routing and first K step's weights before PDL's wait, gate_up
    lets it launch only after its own wait): the same bits as the plain kernels, with one K step
    (intermediate 64 in steps of 128), two or more, bf16-style and fp8 weights."""
    from qwen3vl_kernels.fused_moe import fused_moe_pairs, fused_moe_reference
    from qwen3vl_backend.layers.moe import route

    m, e, h, i, a, block = 3, 6, 96, 64, 3, (32, 32)
    q13, s13, q2, s2, d13, d2 = _fp8_experts(e, h, i, block, DEV)
    x = torch.randn(m, h, device=DEV)
    w, ids = route(torch.randn(m, e, device=DEV), a, True)
    cfg = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "DOWN_BLOCK_N": 16, "DOWN_BLOCK_K": down_k,
           "down_warps": 4, "DOWN_GROUP_SCALE": group_scale}
    weights = (q13, q2, s13, s2) if fp8 else (d13, d2, None, None)
    plain, early = (fused_moe_pairs(x, weights[0], weights[1], w, ids, cfg, weights[2], weights[3], block,
                                    prefetch=p) for p in (False, True))
    torch.testing.assert_close(early, plain, rtol=0, atol=0)
    assert _rel(early, fused_moe_reference(x, d13, d2, w, ids)) < KTOL


@pytest.mark.parametrize("block_n,block", [(16, (32, 128)), (64, (32, 128)), (32, (16, 64))])
def test_fp8_gemv_steps_across_scale_blocks(block_n, block):
    """A K step of 256 over narrower scale blocks (each column its own block's scale), and
    programs asked for more rows than a scale block holds (they take fewer)."""
    from qwen3vl_kernels.fp8 import fp8_gemv

    x = torch.randn(3, 300, device=DEV)
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(70, 300) * torch.logspace(-2, 0, 300), block))
    want = x @ dequantize_weight_blocks(q, s, block).T
    for m in (1, 3):
        got = fp8_gemv(x[:m], q, s, block, config={"BLOCK_N": block_n, "BLOCK_K": 256, "num_warps": 4})
        assert _rel(got, want[:m]) < KTOL


# (130, 300, (128, 128)): partial blocks both ways, so the tile takes a scale per column (mode 1);
# (96, 256, (32, 64)): tiles inside the blocks, one scale per tile and K step (mode 2)
@pytest.mark.parametrize("m", [2, 5, 33, 130])
@pytest.mark.parametrize("n,k,block,block_n", [(130, 300, (128, 128), 64), (96, 256, (32, 64), 32)])
def test_dense_fp8_gemm_is_the_dequantized_product(m, n, k, block, block_n):
    """The grouped GEMM with one expert and its rows in order (a decode batch's dense layer):
    W8A16 against the dequantized weights, at row counts that leave the last block of rows part
    padding (2, 5, 33, 130 over blocks of 16 and 32)."""
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm

    x = torch.randn(m, k, device=DEV)
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(n, k) * torch.logspace(-2, 0, k), block))
    want = x @ dequantize_weight_blocks(q, s, block).T
    for block_m, split in ((16, 1), (32, 1), (16, 3)):
        cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1,
               "SPLIT_K": split}
        got = dense_fp8_gemm(x, q, s, block, cfg)
        assert got.shape == (m, n) and _rel(got, want) < KTOL


@pytest.mark.parametrize("m", [1, 5, 16, 33])
@pytest.mark.parametrize("n,k,block", [(96, 320, (32, 64)), (128, 192, (32, 64)), (256, 384, (128, 128))])
def test_dense_fp8_gemm_bits_is_the_dequantized_product(m, n, k, block):
    """BITS: the weight tiles made bfloat16 by integer ops (2^-120 of their values, made up in the
    scale), x bfloat16: within bfloat16's rounding of the dequantized product, split over K too."""
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm

    x = torch.randn(m, k, device=DEV).bfloat16()
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(n, k) * torch.logspace(-3, 0, k), block))
    want = x.float() @ dequantize_weight_blocks(q, s, block).T
    for split in (1, 3):
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1,
               "SPLIT_K": split, "BITS": True}
        got = dense_fp8_gemm(x, q, s, block, cfg)
        assert got.dtype == torch.bfloat16 and _rel(got.float(), want) < 1e-2


def test_dense_fp8_gemm_bits_reads_every_e4m3_value():
    """Every e4m3 code but NaN through BITS's conversion, one a row of x (one-hot rows pick
    weight columns): normal values exact; a subnormal (exponent field 0, |v| < 2^-6) exact or
    flushed to zero (Triton's interpreter flushes bfloat16 subnormals; on a GPU, the tensor
    cores decide)."""
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm

    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    k = 256
    w = torch.zeros(32, k, dtype=torch.uint8)
    w[:, :len(codes)] = codes
    q = w.view(torch.float8_e4m3fn).to(DEV)
    s = torch.ones(1, 2, device=DEV)
    x = torch.eye(k, device=DEV)[:len(codes)].bfloat16()
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 4, "num_warps": 4, "num_stages": 1, "BITS": True}
    got = dense_fp8_gemm(x, q, s, (32, 128), cfg).float().cpu()
    assert (got == got[:, :1]).all()                     # every weight row alike
    got, sub = got[:, 0], (codes & 0x78) == 0
    assert torch.equal(got[~sub], values[~sub])
    assert ((got[sub] == values[sub]) | (got[sub] == 0)).all()


@pytest.mark.parametrize("mode", ["w8a16", "bits", "a8"])
def test_dense_fp8_gemm_l2_prefetch_gives_the_same_bits(mode):
    """L2_PREFETCH moves PDL's wait after the program's weight lines are asked of L2 (its PTX on a
    GPU only): the same bits as without it, whole or split over K (K = 320: 3 splits of 2 or 1
    steps), at rows that leave the last block part padding."""
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm

    x = torch.randn(21, 320, device=DEV)
    x = x.bfloat16() if mode == "bits" else x
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(96, 320) * 0.05, (32, 64)))
    for split in (1, 3):
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 1,
               "SPLIT_K": split, "BITS": mode == "bits", "A8": mode == "a8"}
        base = dense_fp8_gemm(x, q, s, (32, 64), cfg)
        torch.testing.assert_close(dense_fp8_gemm(x, q, s, (32, 64), {**cfg, "L2_PREFETCH": True}), base,
                                   rtol=0, atol=0)


def test_dense_fp8_gemm_split_k_leaves_its_counts_at_zero():
    """Split-K: each tile's last program sums the partials in split order and resets the tile's
    count, so the next launch (another shape, fewer splits) starts from zero and repeats exactly.
    K = 300 in 32-wide steps is 10 steps: 4 splits of 3, the last with 1; 16 splits cap at 10."""
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm, tile_counts

    x = torch.randn(20, 300, device=DEV)
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(70, 300) * 0.05, (32, 32)))
    want = x @ dequantize_weight_blocks(q, s, (32, 32)).T
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    outs = [dense_fp8_gemm(x, q, s, (32, 32), {**cfg, "SPLIT_K": split}) for split in (4, 4, 16, 2)]
    assert not tile_counts(x.device).any()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for out in outs:
        assert _rel(out, want) < KTOL


@pytest.mark.parametrize("mode", ["bf16", "w8a16-columns", "w8a16", "bits", "a8", "moe-bf16", "moe-fp8", "moe-a8"])
def test_swap_ab_gives_the_same_product(mode, monkeypatch):
    """The grouped GEMM's SWAP_AB key (its dots as (b^T a^T)^T: the weight rows fill the tensor
    cores' 64-row side) gives the product it gives without it, for every weight and activation
    mode, dense (split over K too) and sorted MoE (gate_up with SiLU fused, down with the routing
    weights; 37 tokens, and one token's pair blocks). Square 32 x 32 tiles, so a result left
    transposed would keep its shape and be caught here."""
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm, dense_gemm, fused_moe, fused_moe_reference
    from qwen3vl_backend.layers.moe import route

    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    runs = []
    if mode.startswith("moe"):
        monkeypatch.setenv("QWEN3VL_W8A8_MIN_M", "1" if mode == "moe-a8" else str(1 << 30))
        e, h, i, a, block = 6, 64, 32, 2, (32, 32)
        x = torch.randn(37, h, device=DEV)
        w, ids = route(torch.randn(37, e, device=DEV), a, True)
        if mode == "moe-bf16":
            w13, w2 = torch.randn(e, 2 * i, h, device=DEV) * h ** -0.5, torch.randn(e, h, i, device=DEV) * i ** -0.5
            for t in (37, 1):
                want = fused_moe_reference(x[:t], w13, w2, w[:t], ids[:t])
                for silu in (True, False):
                    runs += [(lambda c, silu=silu, t=t: fused_moe(x[:t], w13, w2, w[:t], ids[:t],
                                                                  {**c, "FUSE_SILU": silu}), want)]
        else:
            q13, s13, q2, s2, d13, d2 = _fp8_experts(e, h, i, block, DEV)
            for t in (37, 1):
                want = fused_moe_reference(x[:t], d13, d2, w[:t], ids[:t])
                runs += [(lambda c, t=t: fused_moe(x[:t], q13, q2, w[:t], ids[:t], {**c, "FUSE_SILU": True},
                                                   w13_scale=s13, w2_scale=s2, block=block), want)]
    else:
        k = 300 if mode == "w8a16-columns" else 320 if mode == "a8" else 336
        n, block = (130, (128, 128)) if mode == "w8a16-columns" else (96, (32, 64))
        x = torch.randn(21, k, device=DEV)
        x = x.bfloat16() if mode == "bits" else x
        q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(n, k) * k ** -0.5, block))
        if mode == "bf16":
            wf = torch.randn(n, k, device=DEV) * k ** -0.5
            runs += [(lambda c: dense_gemm(x, wf, c), x @ wf.T)]
        else:
            want = x.float() @ dequantize_weight_blocks(q, s, block).T
            flags = {"BITS": mode == "bits", "A8": mode == "a8"}
            for split in (1, 3):
                runs += [(lambda c, split=split: dense_fp8_gemm(x, q, s, block, {**c, **flags, "SPLIT_K": split}),
                          want)]
    for run, want in runs:
        base, keyed = run(cfg), run({**cfg, "SWAP_AB": True})
        assert keyed.shape == base.shape
        # the interpreter's dots are the same sums either way; a GPU's tf32 tensor-core dots add in
        # another order once swapped (float32 inputs: 3.3e-5 apart at most on the H200, moe-bf16)
        tol = 2e-4 if CUDA else 1e-5
        torch.testing.assert_close(keyed.float(), base.float(), rtol=tol, atol=tol)
        assert _rel(keyed.float(), want.float()) < (6e-2 if "a8" in mode else 1e-2 if mode == "bits" else KTOL)


@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("n,k,block", [(96, 256, (32, 64)), (256, 384, (128, 128))])
def test_dense_fp8_gemm_w8a8(m, n, k, block):
    """A8: the rows quantized per token and group (one launch) and fp8 dots, against the same
    quantization in torch (rows exact in e4m3: the interpreter rounds to e4m3 unlike the GPU)."""
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm

    x = _exact_fp8_groups(m, k, block[1]).to(DEV)
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(n, k) * k ** -0.5, block))
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 1, "A8": True}
    assert _rel(dense_fp8_gemm(x, q, s, block, cfg), w8a8_block_linear_reference(x, q, s, block)) < KTOL


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the interpreter rounds to e4m3 unlike the hardware)")
@pytest.mark.parametrize("m,n,k", [(64, 5120, 2048), (16, 2048, 4096), (100, 4608, 4096)])
@pytest.mark.parametrize("a8,bits", [(False, False), (True, False), (False, True)])
def test_dense_fp8_gemm_at_real_shapes(m, n, k, a8, bits):
    """The sweep's launch shapes (128-deep K steps, deep pipelines, SWAP_AB's wgmma) at 30B's and
    235B's projections, compiled: W8A16 (by conversion or by BITS's integer ops) within bf16's
    rounding of the dequantized product, W8A8 within e4m3's."""
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm

    block = (128, 128)
    x = (torch.randn(m, k) * torch.logspace(-1, 1, k)).cuda().bfloat16()
    q, s = (t.cuda() for t in quantize_weight_blocks(torch.randn(n, k) * k ** -0.5, block))
    want = x.float() @ dequantize_weight_blocks(q, s, block).T
    for bm, bn, stages, split, swap in ((16, 32, 3, 1, False), (64, 128, 4, 1, False), (32, 64, 6, 1, False),
                                        (16, 64, 4, 8, False), (64, 64, 6, 3, False), (16, 64, 4, 4, True),
                                        (16, 128, 4, 1, True), (64, 64, 4, 2, True)):
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": stages,
               "SPLIT_K": split, "SWAP_AB": swap, **({"A8": True} if a8 else {}), **({"BITS": True} if bits else {})}
        got = dense_fp8_gemm(x, q, s, block, cfg)
        # split-K sums its partials in split order whichever program finishes last: the same bits
        torch.testing.assert_close(dense_fp8_gemm(x, q, s, block, cfg), got, rtol=0, atol=0)
        if a8:
            assert _rel(got, w8a8_block_linear_reference(x.float(), q, s, block)) < 1e-2
        assert _rel(got, want) < (6e-2 if a8 else 1e-2)


def test_dense_fp8_gemm_only_where_the_table_names_the_shape(monkeypatch):
    """dense_config: the device's fp8_dense entry at the nearest tuned M of 2..DENSE_MAX_M rows;
    none at one row, past DENSE_MAX_M (prefill), for an unlisted shape, where the entry says
    "default", or off the GPU. fp8_linear then runs the grouped GEMM, and its answer is the layer's."""
    import qwen3vl_kernels.fp8 as fp8

    shape = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    table = {"96,256": {"16": shape, "64": "default", "1": {**shape, "BLOCK_M": 64}}}
    monkeypatch.setattr(fp8, "_dense_table", lambda name, block: table)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    gpu = torch.device("cuda")
    assert fp8.dense_config(96, 256, 20, (32, 64), gpu) == shape
    assert fp8.dense_config(96, 256, 2, (32, 64), gpu) == shape
    for n, k, m in ((96, 256, 60), (96, 256, 1), (96, 256, fp8.DENSE_MAX_M + 1), (128, 256, 16)):
        assert fp8.dense_config(n, k, m, (32, 64), gpu) is None, (n, k, m)
    assert fp8.dense_config(96, 256, 16, (32, 64), torch.device("cpu")) is None

    calls = []
    import qwen3vl_kernels.fused_moe as fused_moe
    real = fused_moe.dense_fp8_gemm
    monkeypatch.setattr(fused_moe, "dense_fp8_gemm", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(fp8, "dense_config", lambda n, k, m, block, device: shape if m > 1 else None)
    x = torch.randn(2, 5, 256, device=DEV)
    q, s = (t.to(DEV) for t in quantize_weight_blocks(torch.randn(96, 256) * 0.05, (32, 64)))
    bias = torch.randn(96, device=DEV)
    got = fp8.fp8_linear(x, q, s, (32, 64), bias)
    assert calls == [shape] and got.shape == (2, 5, 96)
    assert _rel(got, x @ dequantize_weight_blocks(q, s, (32, 64)).T + bias) < KTOL


@pytest.mark.server
def test_tiny_fp8_checkpoint_served_through_the_adapter(tmp_path):
    """The FP8 checkpoint behind Triton and the OpenAI adapter answers what the CLI answers."""
    import httpx

    from conftest import start_server
    from qwen3vl_backend.launch import write_repository

    path, _ = _tiny_fp8(False, (128, 128))
    repo = write_repository(tmp_path / "repo", {
        "preprocess": {"model_path": str(path), "max_model_len": "1024"},
        "vit": {"model_path": str(path), "device": "cpu"},
        "llm": {"model_path": str(path), "device": "cpu", "max_model_len": "1024"}})
    srv = start_server(repo, tmp_path, ["--model-path", str(path)])
    try:
        engine = LLMEngine(EngineConfig(model_path=str(path), device="cpu", dtype="float32"))
        for messages in _cases()[:2]:
            want = generate.run(str(path), {"messages": messages, "temperature": 0, "max_tokens": 12}, engine=engine)
            r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120,
                           json={"model": "tiny-moe", "messages": messages, "temperature": 0, "max_tokens": 12})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want["text"]
            assert r.json()["usage"]["prompt_tokens"] == len(want["prompt_token_ids"])
    finally:
        srv.stop()


def test_w8a8_threshold_from_the_table_and_the_environment(monkeypatch):
    """The sorted path quantizes its activations from the table's "w8a8_min_m" (else W8A8_MIN_M),
    and QWEN3VL_W8A8_MIN_M overrides both: below it, no quantize launch, W8A16 dots."""
    import qwen3vl_kernels.fused_moe
    from qwen3vl_kernels.fused_moe import fused_moe, fused_moe_reference
    from qwen3vl_backend.layers.moe import route

    torch.manual_seed(0)
    calls = []
    real = qwen3vl_kernels.fused_moe.quantize_activations_fp8
    monkeypatch.setattr(qwen3vl_kernels.fused_moe, "quantize_activations_fp8", lambda *a: calls.append(1) or real(*a))
    e, h, i, block = 4, 64, 32, (32, 32)
    q13, s13, q2, s2, d13, d2 = _fp8_experts(e, h, i, block, DEV)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}

    def quantized(m):
        calls.clear()
        x = torch.randn(m, h, device=DEV)
        w, ids = route(torch.randn(m, e, device=DEV), 2, True)
        out = fused_moe(x, q13, q2, w, ids, cfg, w13_scale=s13, w2_scale=s2, block=block)
        # W8A16 is the weights' error alone; W8A8 (the interpreter's e4m3 rounding is coarse, see
        # test_fp8_gemv_w8a8_exact_groups) is checked here only for being the same product
        assert _rel(out, fused_moe_reference(x, d13, d2, w, ids)) < (KTOL if not calls else 0.25)
        return len(calls)

    monkeypatch.setattr(qwen3vl_kernels.fused_moe, "_moe_table", lambda *a: {"w8a8_min_m": 4})
    assert quantized(3) == 0 and quantized(4) == 2          # x, then the SiLU*up intermediate
    monkeypatch.setenv("QWEN3VL_W8A8_MIN_M", "6")
    assert quantized(5) == 0 and quantized(6) == 2
    monkeypatch.setattr(qwen3vl_kernels.fused_moe, "_moe_table", lambda *a: None)
    monkeypatch.delenv("QWEN3VL_W8A8_MIN_M")
    assert quantized(1) == 2                                 # W8A8_MIN_M
