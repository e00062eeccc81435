"""Tensor and expert parallelism on CPU: gloo, one process per rank (rank 0 is the engine's).

The bound: greedy tokens identical to the same checkpoint at --tp 1 (float32; a rank's partial
sums differ from the whole product only in the order of additions), first-step logits within
1e-4. Through the one-shot CLI, the engine, two "nodes" on loopback and the served ensemble.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import CACHE, ROOT, data_uri, image_bytes, make_image
from qwen3vl_backend.parallel import Parallel, check_moe_split

MESSAGES = [
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(96, 64, 3)))}},
                                  {"type": "text", "text": "What is in this image?"}]}],
    [{"role": "user", "content": "Tell me a story about a small robot."}],
]


CLI_TOKENS = 10


def _greedy(messages) -> dict:
    """The request body the CLI is given: greedy decoding of `messages`."""
    return {"messages": messages, "temperature": 0}


def _cli(path, messages, *flags, tokens=CLI_TOKENS, timeout=300):
    req = CACHE / f"parallel-request-{abs(hash(json.dumps(messages))) % 10**8}.json"
    req.write_text(json.dumps(_greedy(messages)))
    return subprocess.run([sys.executable, "-m", "qwen3vl_backend.generate", "--model-path", str(path), "--request",
                           str(req), "--max-tokens", str(tokens), "--dtype", "float32", *flags], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _tokens(path, messages, *flags):
    out = _cli(path, messages, *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["output_token_ids"]


@pytest.fixture(scope="module")
def tiny_fp8_moe():
    from test_fp8 import _tiny_fp8

    return _tiny_fp8(False, (32, 32))[0]


@pytest.mark.parametrize("model,layouts", [("tiny_moe", [("--tp", "2"), ("--tp", "2", "--ep", "2")]),
                                           ("tiny_dense", [("--tp", "2")]),
                                           ("tiny_fp8_moe", [("--tp", "2", "--ep", "2")])])
def test_cli_tp_and_ep_give_the_tp1_tokens(model, layouts, request):
    """The CLI's tokens at each layout against tp 1's, run by the CLI's own `run` in this process
    (one engine for both requests: a CLI process a request took ~7 s of the suite)."""
    from qwen3vl_backend.config import EngineConfig
    from qwen3vl_backend.engine.llm_engine import LLMEngine
    from qwen3vl_backend.generate import run

    path = request.getfixturevalue(model)
    engine = LLMEngine(EngineConfig(model_path=str(path), device="auto", dtype="float32"))
    try:
        wants = [run(str(path), _greedy(m), CLI_TOKENS, engine=engine)["output_token_ids"] for m in MESSAGES]
    finally:
        engine.close()
    for messages, want in zip(MESSAGES, wants):
        for flags in layouts:
            assert _tokens(path, messages, *flags) == want, flags


def test_sharded_logits_match_the_whole_model(tiny_dense):
    """Every prompt position's logits through the engine at tp 2 (KV heads split, dense MLP,
    vocab-parallel embedding and head) against tp 1: a stronger check than greedy tokens."""
    from qwen3vl_backend.config import EngineConfig
    from qwen3vl_backend.engine.llm_engine import LLMEngine
    from qwen3vl_backend.processing.processor import Processor

    logits = []
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig(model_path=str(tiny_dense), dtype="float32", tp_size=tp))
        try:
            prompt = Processor(str(tiny_dense), engine.tokenizer).process_messages(MESSAGES[0])
            logits.append(engine.prompt_logits(prompt))
        finally:
            engine.close()
    assert logits[0].shape == logits[1].shape and logits[0].std() > 0
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)


def test_two_nodes_on_loopback(tiny_moe):
    """--nnodes 2: node 1's rank started by engine.tp_worker, node 0 the engine, over one TCP rendezvous."""
    from qwen3vl_backend.supervisor import free_port

    addr = f"127.0.0.1:{free_port()}"
    common = ["--tp", "2", "--nnodes", "2", "--dist-init-addr", addr]
    node1 = subprocess.Popen([sys.executable, "-m", "qwen3vl_backend.engine.tp_worker", "--model-path", str(tiny_moe),
                              "--node-rank", "1", *common], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        got = _tokens(tiny_moe, MESSAGES[0], "--node-rank", "0", *common)
        assert node1.wait(30) == 0                 # rank 0 stopped it when done
    finally:
        node1.kill()
    assert got == _tokens(tiny_moe, MESSAGES[0])


def test_layouts_the_model_cannot_take_are_refused_before_any_worker_starts(tiny_fp8_moe, tiny_moe):
    out = _cli(tiny_fp8_moe, MESSAGES[1], "--tp", "2")
    assert out.returncode == 2 and "use --ep 2" in out.stderr and "fp8 blocks of [32, 32]" in out.stderr
    assert "rank1" not in out.stderr                 # refused on rank 0, no worker ever ran
    out = _cli(tiny_moe, MESSAGES[1], "--tp", "3")
    assert out.returncode == 2 and "does not split over tensor-parallel size 3" in out.stderr
    with pytest.raises(ValueError, match="--ep 2 must divide --tp 3"):
        Parallel(3, 0, 2)


def test_moe_split_messages_name_the_ep_that_works():
    # 30B-A3B FP8 at --tp 8: 768 / 8 = 96 is no multiple of 128; at --ep 4, 768 / 2 = 384 is
    with pytest.raises(ValueError, match="is 96, not fp8 blocks of \\[128, 128\\]; use --ep 4"):
        check_moe_split(128, 768, 8, 1, (128, 128))
    check_moe_split(128, 768, 8, 8, (128, 128))
    check_moe_split(128, 768, 2, 1, (128, 128))              # 384: three blocks per rank
    # 235B-A22B FP8: 1536 / 8 = 192 at --tp 8 alone; two expert groups of four ranks hold 384 each
    with pytest.raises(ValueError, match="is 192, not fp8 blocks of \\[128, 128\\]; use --ep 2"):
        check_moe_split(128, 1536, 8, 1, (128, 128))
    with pytest.raises(ValueError, match="12 experts do not split into 8 groups"):
        check_moe_split(12, 64, 8, 8)


def test_a_killed_worker_ends_the_engine_fast(tiny_moe):
    req = CACHE / "parallel-long.json"
    req.write_text(json.dumps({"messages": MESSAGES[1], "temperature": 0}))
    proc = subprocess.Popen([sys.executable, "-m", "qwen3vl_backend.generate", "--model-path", str(tiny_moe),
                             "--request", str(req), "--max-tokens", "4000", "--tp", "2", "--dtype", "float32"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = None
        deadline = time.monotonic() + 120
        while worker is None and time.monotonic() < deadline:
            kids = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "engine.tp_worker"], capture_output=True,
                                  text=True).stdout.split()
            worker = int(kids[0]) if kids else None
            time.sleep(0.2)
        assert worker is not None
        time.sleep(10)                               # loaded and decoding (4000 tokens take over a minute)
        assert proc.poll() is None
        os.kill(worker, 9)
        t0 = time.monotonic()
        code = proc.wait(10)
        assert time.monotonic() - t0 < 3 and code == 70
        err = proc.stderr.read()          # the watchdog or the step that met the closed connection first
        assert "tensor-parallel" in err and "the engine stops" in err
    finally:
        proc.kill()


def test_workers_outlive_a_signal_to_the_process_group_and_stop_with_the_engine(tiny_moe):
    """A launcher stopping Triton signals its whole process group. A rank that died of that
    SIGTERM took the engine down before Triton could close it (measured on the two-H200 host):
    the ranks ignore it and stop when rank 0 closes, with status 0."""
    import signal

    from qwen3vl_backend.config import EngineConfig
    from qwen3vl_backend.engine.llm_engine import LLMEngine
    from qwen3vl_backend.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model_path=str(tiny_moe), dtype="float32", tp_size=2))
    try:
        worker = engine.runner.workers[0]
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
        time.sleep(1)
        assert worker.poll() is None
        ids = engine.tokenizer.encode("Hello there")
        assert len(engine.generate([ids], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
                   ["output_token_ids"]) == 3
    finally:
        t0 = time.monotonic()
        engine.close()
    assert worker.wait(5) == 0 and time.monotonic() - t0 < 10


@pytest.mark.server
def test_served_at_tp2_ep2_answers_like_tp1_and_a_dead_worker_is_replaced(tiny_moe, tmp_path):
    """The launcher with --tp 2 --ep 2: the llm model (KIND_MODEL) runs rank 0 and starts rank 1;
    through Triton and the adapter the greedy text is the CLI's at tp 1. Then rank 1 is killed: the
    model goes unhealthy within seconds, the supervisor restarts it, and SIGTERM leaves no process."""
    import httpx

    from test_lifecycle import Launch, _alive, _status

    launch = Launch(tiny_moe, tmp_path, "--tp", "2", "--ep", "2")
    try:
        launch.wait_banner()
        for messages in MESSAGES:
            want = _cli(tiny_moe, messages, tokens=12)
            assert want.returncode == 0, want.stderr[-2000:]
            r = httpx.post(f"{launch.url}/v1/chat/completions", timeout=120,
                           json={"model": "tiny-moe", "messages": messages, "temperature": 0, "max_tokens": 12})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == json.loads(want.stdout)["text"]
        [worker] = _workers(launch.proc.pid)
        os.kill(worker, 9)
        killed = time.monotonic()
        while time.monotonic() - killed < 10 and _status(f"{launch.url}/health") == 200:
            time.sleep(0.1)
        assert time.monotonic() - killed < 10, "the adapter's /health stayed green"
        while time.monotonic() - killed < 90 and _status(f"{launch.url}/health") != 200:
            time.sleep(0.5)
        r = httpx.post(f"{launch.url}/v1/chat/completions", timeout=120,
                       json={"model": "tiny-moe", "messages": MESSAGES[1], "temperature": 0, "max_tokens": 12})
        assert r.status_code == 200, r.text
        [worker] = _workers(launch.proc.pid)            # the restarted model's own rank 1
        launch.close()
        time.sleep(0.5)
        assert not _alive(worker)
    finally:
        launch.close()


def _workers(root: int) -> list[int]:
    """tp_worker processes under the launcher (any depth)."""
    out = subprocess.run(["pgrep", "-f", "engine.tp_worker"], capture_output=True, text=True).stdout.split()
    mine = []
    for pid in map(int, out):
        p = pid
        while p > 1:
            if p == root:
                mine.append(pid)
                break
            try:
                p = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                break
    return mine


def _kernel_experts(w13, w2, fp8: bool, block, dev):
    """-> (the weights as the reference multiplies them, the kernels' own on `dev`, their scale
    keywords): with fp8, the weights quantized in `block` blocks, the reference's dequantized."""
    from qwen3vl_kernels.fp8 import dequantize_weight_blocks, quantize_weight_blocks

    if not fp8:
        return w13, w2, w13.to(dev), w2.to(dev), {}
    q13, s13 = (torch.stack(t) for t in zip(*(quantize_weight_blocks(w, block) for w in w13)))
    q2, s2 = (torch.stack(t) for t in zip(*(quantize_weight_blocks(w, block) for w in w2)))
    d13 = torch.stack([dequantize_weight_blocks(q, s, block) for q, s in zip(q13, s13)])
    d2 = torch.stack([dequantize_weight_blocks(q, s, block) for q, s in zip(q2, s2)])
    return d13, d2, q13.to(dev), q2.to(dev), {"w13_scale": s13.to(dev), "w2_scale": s2.to(dev), "block": block}


@pytest.mark.parametrize("m,persistent", [(3, False), (33, False), (33, True)])   # pair path, sorted path
@pytest.mark.parametrize("fp8", [False, True])
def test_moe_kernels_skip_pairs_routed_to_other_ranks(m, persistent, fp8, monkeypatch):
    """Expert parallelism hands the kernels id E (this rank's expert count) for another rank's
    experts: they add nothing, whatever their routing weight, in both kernel paths; a config
    asking for the persistent launch gets the per-tile one (the persistent kernel would read the
    sentinel's blocks as an expert past the weights' end: their rows are dropped by the combine,
    so only the launch shows it)."""
    import qwen3vl_kernels.fused_moe as fm
    from qwen3vl_kernels.fused_moe import fused_moe
    from launch_record import Counted
    from qwen3vl_backend.layers.moe import moe_experts_torch

    persistent_launches = []
    monkeypatch.setattr(fm, "_grouped_gemm_persistent_kernel",
                        Counted(fm._grouped_gemm_persistent_kernel, persistent_launches))

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    e, h, inter, a, block = 4, 64, 32, 3, (32, 32)
    w13, w2 = torch.randn(e, 2 * inter, h) * h ** -0.5, torch.randn(e, h, inter) * inter ** -0.5
    x = torch.randn(m, h)
    ids = torch.randint(0, e + 1, (m, a))                # e: the sentinel
    ids[0] = e                                           # a token with no pair on this rank
    weights = torch.rand(m, a)
    w13, w2, k13, k2, kw = _kernel_experts(w13, w2, fp8, block, dev)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1,
           "PERSISTENT": 1} if persistent else None
    got = fused_moe(x.to(dev), k13, k2, weights.to(dev), ids.to(dev).int(), cfg, sentinel=True, **kw).cpu()
    want = moe_experts_torch(x, w13, w2, weights, ids)
    assert not persistent_launches
    assert not got[0].any() and got.isfinite().all()
    tol = 6e-2 if fp8 and m > 16 else 2e-2           # the sorted fp8 path quantizes activations too
    assert ((got - want).norm() / want.norm()).item() < tol


@pytest.mark.parametrize("m", [5, 40, pytest.param(300, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="slow in the interpreter"))])
@pytest.mark.parametrize("w8a8", [False, True])
@pytest.mark.parametrize("inter,a", [(64, 3), (96, 2)])          # the second: the tiny MoE's
def test_expert_halves_sum_to_the_whole_layer(m, w8a8, inter, a, monkeypatch):
    """Expert parallelism's arithmetic on one device: the experts cut in two halves (each rank's
    share, other ranks' experts as the sentinel, as layers.moe.route maps them) sum to the whole
    layer's output, fp8 weights in 32 x 32 blocks, W8A16 and W8A8 sorted paths. On two H200s the
    tp 2 + ep 2 tiny fp8 model's first logits were 25% off tp 1's with W8A8 and right with W8A16
    (NOTES, sixteenth session): this is the same sum on one GPU, where the bits should agree up
    to the order of the two halves' additions."""
    from qwen3vl_kernels.fused_moe import fused_moe
    from qwen3vl_backend.layers.moe import route

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    e, h, block = 8, 64, (32, 32)
    monkeypatch.setenv("QWEN3VL_W8A8_MIN_M", str(1 if w8a8 else 1 << 30))
    w13, w2 = torch.randn(e, 2 * inter, h) * h ** -0.5, torch.randn(e, h, inter) * inter ** -0.5
    _, _, k13, k2, kw = _kernel_experts(w13, w2, True, block, dev)
    x = torch.randn(m, h).to(dev)
    logits = torch.randn(m, e).to(dev)
    whole = fused_moe(x, k13, k2, *route(logits, a, True), **kw).float()
    half = e // 2
    parts = []
    for rank in range(2):
        weights, ids = route(logits, a, True, first_expert=rank * half, num_local=half)
        sl = slice(rank * half, (rank + 1) * half)
        parts.append(fused_moe(x, k13[sl].contiguous(), k2[sl].contiguous(), weights, ids.int(), sentinel=True,
                               w13_scale=kw["w13_scale"][sl].contiguous(), w2_scale=kw["w2_scale"][sl].contiguous(),
                               block=block).float())
    got = parts[0] + parts[1]
    err = ((got - whole).norm() / whole.norm()).item()
    print(f"halves against the whole layer: {err:.2e}")
    assert err < 1e-2


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("w8a8", [False, True])
def test_one_token_sorted_path_takes_a_block_per_pair(fp8, w8a8, monkeypatch):
    """At one token the sorted path makes a block of each (token, expert) pair straight from the
    top-k ids (no sorting launch): the same sums as the sorted blocks, other ranks' pairs skipped,
    and nothing at all for a token with no pair here. Seeded: against the reference's unquantized
    activations W8A8's error is a draw (80 draws: mean 4.2%, largest 8.2%), and an unseeded draw
    depended on the tests before it (a new test's draws made one fail at 7.0%)."""
    import qwen3vl_kernels.fused_moe
    from qwen3vl_kernels.fused_moe import align_by_expert as align, fused_moe
    from qwen3vl_backend.layers.moe import moe_experts_torch

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    e, h, inter, a, block = 6, 64, 32, 4, (32, 32)
    monkeypatch.setenv("QWEN3VL_W8A8_MIN_M", str(1 if w8a8 else 1 << 30))
    w13, w2 = torch.randn(e, 2 * inter, h) * h ** -0.5, torch.randn(e, h, inter) * inter ** -0.5
    w13, w2, k13, k2, kw = _kernel_experts(w13, w2, fp8, block, dev)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 1}
    x = torch.randn(1, h)
    for ids in ([[3, 6, 0, 5]], [[2, 1, 4, 3]], [[6, 6, 6, 6]]):       # 6: another rank's expert
        ids = torch.tensor(ids, dtype=torch.int32)
        weights = torch.rand(1, a)
        got = {}
        for pair_blocks in (True, False):      # the config chooses: no sorting launch, or one
            sorts = []
            monkeypatch.setattr(qwen3vl_kernels.fused_moe, "align_by_expert", lambda *args: sorts.append(1) or align(*args))
            got[pair_blocks] = fused_moe(x.to(dev), k13, k2, weights.to(dev), ids.to(dev),
                                         {**cfg, "PAIR_BLOCKS": pair_blocks}, sentinel=True, **kw).cpu()
            assert len(sorts) == (0 if pair_blocks else 1)
        want = moe_experts_torch(x, w13, w2, weights, ids)
        if not (ids < e).any():
            assert not got[True].any() and not want.any()
            continue
        torch.testing.assert_close(got[True], got[False], rtol=1e-5, atol=1e-6)
        tol = 6e-2 if fp8 and w8a8 else 2e-2              # W8A8 quantizes the activations too
        assert ((got[True] - want).norm() / want.norm()).item() < tol


def test_the_tuner_routes_as_one_rank_of_expert_parallelism():
    """benchmarks.tune_fused_moe --ep: about 1/ep of the pairs land on this rank's experts, the
    rest on the sentinel, and its reference sums this rank's experts only."""
    from benchmarks.tune_fused_moe import _reference, rank_routing
    from qwen3vl_backend.layers.moe import moe_experts_torch

    e, h, inter = 8, 32, 16
    weights, ids = rank_routing(2048, e, 4, 2, "cpu")
    assert ids.min() >= 0 and ids.max() == e and abs((ids < e).float().mean().item() - 0.5) < 0.05
    w13, w2 = torch.randn(e, 2 * inter, h), torch.randn(e, h, inter)
    x = torch.randn(5, h)
    weights, ids = weights[:5], ids[:5]
    torch.testing.assert_close(_reference(x, w13, w2, weights, ids, e), moe_experts_torch(x, w13, w2, weights, ids))


def test_uniform_benchmark_routing_is_the_same_on_every_rank(tiny_moe):
    """moe_routing=uniform (the benchmarks' stand-in for a real checkpoint's routing) draws one
    seeded table per layer on each rank: tp 2 + ep 2 scores a prompt as tp 1 does, and not as
    the model's own router would."""
    from qwen3vl_backend.config import EngineConfig
    from qwen3vl_backend.engine.llm_engine import LLMEngine
    from qwen3vl_backend.processing.processor import Processor

    logits = {}
    for routing, tp, ep in (("uniform", 1, 1), ("uniform", 2, 2), ("model", 1, 1)):
        engine = LLMEngine(EngineConfig(model_path=str(tiny_moe), dtype="float32", tp_size=tp, ep_size=ep,
                                        moe_routing=routing))
        try:
            prompt = Processor(str(tiny_moe), engine.tokenizer).process_messages(MESSAGES[1])
            logits[routing, tp] = engine.prompt_logits(prompt)
        finally:
            engine.close()
    torch.testing.assert_close(logits["uniform", 2], logits["uniform", 1], rtol=0, atol=1e-4)
    assert (logits["uniform", 1] - logits["model", 1]).abs().max() > 1e-2


def test_only_rank_0_holds_the_vision_tower(tiny_moe):
    """The ViT runs on rank 0 (the engine's, or the vit model's): other ranks neither build nor load it."""
    from qwen3vl_backend.loader import build_model, model_config

    cfg = model_config(tiny_moe)
    rank0, rank1 = (build_model(cfg, "meta", torch.float32, Parallel(2, r, 1)) for r in (0, 1))
    assert rank0.model.visual is not None and rank1.model.visual is None
    assert any(n.startswith("model.visual.") for n, _ in rank0.named_parameters())
    assert not any(n.startswith("model.visual.") for n, _ in rank1.named_parameters())


def test_prompt_logprobs_at_tp2_match_tp1(tiny_moe):
    """Prompt logprobs take extra rows of the vocab-parallel head: every rank computes them."""
    from qwen3vl_backend.config import EngineConfig
    from qwen3vl_backend.engine.llm_engine import LLMEngine
    from qwen3vl_backend.sampling_params import SamplingParams

    got = []
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig(model_path=str(tiny_moe), dtype="float32", tp_size=tp, max_num_batched_tokens=7))
        try:
            ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
            engine.add_request(ids, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1), "p")
            outs = []
            while engine.has_unfinished():
                outs += engine.step()
            got.append(next(o.prompt_logprobs for o in outs if o.prompt_logprobs is not None))
        finally:
            engine.close()
    assert len(got[0]) == len(ids) - 1 and [g[0] for g in got[0]] == ids[1:]
    assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(*got))


def test_the_tuner_hands_batches_to_the_pair_path_up_to_the_first_loss():
    from benchmarks.tune_fused_moe import pair_crossover
    from qwen3vl_kernels.fused_moe import PAIR_PATH_MAX_M

    assert pair_crossover([(2, True), (4, True), (8, False), (16, True)]) == 4
    assert pair_crossover([(2, False)]) == 1                     # batch 1 not timed: stays on pairs
    assert pair_crossover([(1, False), (2, True)]) == 0          # the sorted path from batch 1
    assert pair_crossover([(1, True), (16, True)]) == PAIR_PATH_MAX_M


def test_the_tuner_gives_decode_sizes_swap_ab_twins():
    """benchmarks.tune_fused_moe's candidates: up to 128 tokens each 64- or 128-wide tile also comes
    with SWAP_AB (so a retune keeps the H200's SWAP_AB entries within reach), none narrower, none
    at prefill sizes."""
    from benchmarks.tune_fused_moe import candidates

    for m, quick in ((16, False), (16, True), (64, False), (128, True)):
        shapes = list(candidates(m, quick))
        swapped = [c for c in shapes if c.get("SWAP_AB")]
        wide = [c for c in shapes if not c.get("SWAP_AB") and c["BLOCK_N"] >= 64]
        assert wide and len(swapped) == len(wide) and all(c["BLOCK_N"] >= 64 for c in swapped)
        assert [{k: v for k, v in c.items() if k != "SWAP_AB"} for c in swapped] == wide
    for m in (256, 2048):
        assert not any(c.get("SWAP_AB") for c in candidates(m, wide=True))


def test_the_tuner_gives_prefill_sizes_persistent_twins():
    """Past 512 tokens every candidate shape also comes as the persistent launch (2 programs an
    SM), the same shape otherwise; none at 512 tokens or fewer."""
    from benchmarks.tune_fused_moe import candidates

    for m, wide in ((1024, False), (4096, True)):
        shapes = list(candidates(m, wide=wide))
        twins = [c for c in shapes if c.get("PERSISTENT")]
        plain = [c for c in shapes if not c.get("PERSISTENT")]
        assert plain and [{k: v for k, v in c.items() if k != "PERSISTENT"} for c in twins] == plain
        assert all(c["PERSISTENT"] == 2 for c in twins)
    for m in (16, 512):
        assert not any(c.get("PERSISTENT") for c in candidates(m))


def test_rank0_takes_the_group_down_with_the_workers_before_waiting_for_them(monkeypatch):
    """NCCL destroys a group collectively, and a graph that captured its collectives holds the
    communicator: rank 0 drops its graphs, destroys the group while the workers destroy theirs,
    and only then waits for them to exit. (Waiting first deadlocked every close on GPUs.) A
    worker already gone is killed first, and the teardown still runs (gloo's is local)."""
    from qwen3vl_backend.engine import model_runner as mr

    events = []

    class Channel:
        def __init__(self, fails):
            self.fails = fails

        def stop(self):
            events.append("stop")
            if self.fails:
                raise RuntimeError("connection closed")

    class Graphs:
        def __del__(self):
            events.append("graphs dropped")

    class PeerAllReduce:                  # its buffers are mapped into the other rank: freed before the group
        def close(self):
            events.append("peer buffers freed")

    monkeypatch.setattr(mr, "shutdown_group", lambda *a: events.append("destroy") or True)
    monkeypatch.setattr(mr, "wait_all", lambda procs, timeout: events.append(f"wait {timeout:g}"))
    monkeypatch.setattr(mr, "set_peer_all_reduce", lambda fn: events.append(f"peer all-reduce {fn}"))
    for fails, want in ((False, ["stop", "peer all-reduce None", "graphs dropped", "peer buffers freed", "destroy",
                                 "wait 10"]),
                        (True, ["stop", "peer all-reduce None", "graphs dropped", "peer buffers freed", "wait 0",
                                "destroy", "wait 10"])):
        events.clear()
        runner = mr.ModelRunner.__new__(mr.ModelRunner)
        runner.rank, runner.channel, runner.watchdog, runner.workers = 0, Channel(fails), None, []
        runner.graphs, runner.device, runner.peer_all_reduce = Graphs(), torch.device("cpu"), PeerAllReduce()
        runner.close()
        assert events == want and runner.channel is None and runner.graphs is None
