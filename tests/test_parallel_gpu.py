"""Tensor and expert parallelism on two GPUs: NCCL, the Triton kernels, CUDA-graph decode with its
collectives captured. Skipped with fewer than two CUDA devices (tests/test_parallel.py covers the
same layouts on CPU with gloo).

The serving dtype (bf16) against the same model at tp 1 on one GPU. A rank's partial sums round
to bf16 before the all-reduce, so greedy tokens must agree up to the first step whose top-2 logit
margin (tp 1's own logits) is within bf16 noise, as tests/test_gpu.py holds the GPU to the CPU;
and the first step's logits stay within 2% of tp 1's (5% for fp8, whose activations are quantized
per group: an upstream rounding difference can move a value a whole fp8 step; measured 2.1%).
"""

import pytest
import torch

from conftest import data_uri, image_bytes, make_image
from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.engine.llm_engine import LLMEngine
from qwen3vl_backend.processing.positions import decode_positions
from qwen3vl_backend.processing.processor import ProcessedPrompt, Processor
from qwen3vl_backend.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
TOKENS = 24
NOISE = 0.02

MESSAGES = [
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(300, 200, 1)))}},
                                  {"type": "text", "text": "What is in this image?"}]}],
    [{"role": "user", "content": "Tell me a story about a small robot."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why is the sky blue?"}],
]
# run alone after the batch, its start not in the prefix cache: its prefill replays a prefill graph
ALONE = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(240, 160, 9)))}},
                                      {"type": "text", "text": "Describe it."}]}]


@pytest.fixture(scope="module")
def tiny_fp8_moe():
    from test_fp8 import _tiny_fp8

    return _tiny_fp8(False, (32, 32))[0]


def _engine(path, tp=1, ep=1):
    return LLMEngine(EngineConfig(model_path=str(path), device="cuda", dtype="bfloat16", num_kv_blocks=512,
                                  cuda_graph_max_bs=4, tp_size=tp, ep_size=ep))


def _run(engine, prompts):
    """(greedy tokens per prompt: all but the last decoded as one batch through the graphs, then
    the last alone, its prefill replayed from a prefill graph; first-step logits of each)."""
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    tokens = [r["output_token_ids"] for r in engine.generate(prompts[:-1], params)]
    replays = engine.runner.prefill_graphs.replays
    tokens.append(engine.generate(prompts[-1:], params)[0]["output_token_ids"])
    assert engine.runner.prefill_graphs.replays == replays + 1
    return tokens, [engine.prompt_logits(p)[-1].float().cpu() for p in prompts]


def _agree_until_a_near_tie(engine, prompt, want, got):
    n = len(prompt.prompt_ids)
    full = ProcessedPrompt(prompt.prompt_ids + want[:-1], prompt.media,
                           torch.cat([prompt.positions, decode_positions(n, len(want) - 1, prompt.rope_delta)], 1),
                           prompt.rope_delta)
    logits = engine.prompt_logits(full)[n - 1:].float()
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]) / logits.abs().max()
    close = [i for i, m in enumerate(margin.tolist()) if m < NOISE]
    upto = close[0] if close else len(want)
    assert got[:upto] == want[:upto], f"diverged before step {upto}"


@pytest.mark.parametrize("model,layouts", [("tiny_moe", [(2, 1), (2, 2)]), ("tiny_dense", [(2, 1)]),
                                           ("tiny_fp8_moe", [(2, 2)])])
def test_tp2_on_two_gpus_answers_as_tp1(model, layouts, request):
    path = request.getfixturevalue(model)
    tolerance = 5e-2 if "fp8" in model else 2e-2
    one = _engine(path)
    try:
        assert one.runner.graphs is not None
        prompts = [Processor(str(path), one.tokenizer).process_messages(m) for m in MESSAGES + [ALONE]]
        want, want_logits = _run(one, prompts)
        results = {}
        for tp, ep in layouts:
            engine = _engine(path, tp, ep)
            try:
                assert engine.runner.graphs is not None and engine.runner.peer_all_reduce is not None
                results[tp, ep] = _run(engine, prompts)
            finally:
                engine.close()
        for (tp, ep), (got, logits) in results.items():
            for w, g in zip(want_logits, logits):
                assert ((g - w).norm() / w.norm()).item() < tolerance, (tp, ep)
            for prompt, w, g in zip(prompts, want, got):
                assert len(g) == TOKENS
                _agree_until_a_near_tie(one, prompt, w, g)
    finally:
        one.close()


def _peer_rank(rank, port, queue):
    import torch.distributed as dist

    from qwen3vl_kernels.allreduce import PeerAllReduce
    from qwen3vl_backend.parallel import disable_multicast

    disable_multicast()
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ar = PeerAllReduce.create(dist.group.WORLD, rank, 2, torch.device("cuda", rank), torch.bfloat16)
        assert ar is not None, "no peer all-reduce on two GPUs"
        gen = torch.Generator(device="cuda").manual_seed(rank)
        sizes = [1, 4096, 2048 * 3 + 5, 64 * 4096, 4096, 7, 2048 * 4096 + 3]   # the last: a prefill's
        xs = [torch.randn(n, device="cuda", generator=gen, dtype=torch.bfloat16) for n in sizes * 20]
        want = [x.clone() for x in xs]
        for w in want:
            dist.all_reduce(w)
        eager = [x.clone() for x in xs]
        for e in eager:
            assert ar(e)
        graphed = [x.clone() for x in xs]
        graph = torch.cuda.CUDAGraph()
        copies = [g.clone() for g in graphed]
        with torch.cuda.graph(graph):
            for g in copies:
                ar(g)
        for _ in range(3):                    # replays advance the epochs: each sees fresh inputs
            for c, g in zip(copies, graphed):
                c.copy_(g)
            graph.replay()
        torch.cuda.synchronize()
        bad = [i for i, (w, e, c) in enumerate(zip(want, eager, copies)) if not (torch.equal(w, e) and torch.equal(w, c))]
        queue.put((rank, bad, [float(w.float().abs().sum()) for w in want[:3]]))
        ar.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_peer_all_reduce_matches_nccl_on_two_gpus():
    """140 sums of 1 to 8,388,611 bf16 elements back to back, eager and replayed three times from
    a CUDA graph: equal, bit for bit, to NCCL's, on both ranks."""
    import torch.multiprocessing as mp

    from qwen3vl_backend.supervisor import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_peer_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (bad, sums)) for r, bad, sums in (queue.get(timeout=240) for _ in procs))
    for p in procs:
        p.join(60)
    assert results[0][0] == [] and results[1][0] == [], results
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("peer", [True, False], ids=["peer-all-reduce", "nccl"])
def test_tp2_ep2_fp8_first_logits_before_and_after_generating(tiny_fp8_moe, peer, monkeypatch):
    """Where the tp 2 + ep 2 fp8 failure above lives. On one GPU (tests/test_gpu.py's
    test_tp2_on_one_gpu_answers_as_tp1: both ranks there, gloo, eager) tp 2 + ep 2 is within 2.2%
    of tp 1 with W8A8, and on two H200s it was 25% off with W8A8 and within bounds with W8A16
    (NOTES, sixteenth and seventeenth sessions). Here the first logits of a fresh tp 2 engine, then
    after it generated (graphs replayed), each against tp 1's, with the sums by the peer all-reduce
    and by NCCL: which of the two-GPU path's parts, or the engine's state after generating, moves them."""
    if not peer:
        monkeypatch.setenv("QWEN3VL_PEER_ALLREDUCE", "0")
    path = tiny_fp8_moe
    one = _engine(path)
    try:
        prompts = [Processor(str(path), one.tokenizer).process_messages(m) for m in MESSAGES + [ALONE]]
        want = [one.prompt_logits(p)[-1].float().cpu() for p in prompts]
    finally:
        one.close()
    engine = _engine(path, 2, 2)
    try:
        assert (engine.runner.peer_all_reduce is not None) == peer
        fresh = [engine.prompt_logits(p)[-1].float().cpu() for p in prompts]
        engine.generate(prompts, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True))
        after = [engine.prompt_logits(p)[-1].float().cpu() for p in prompts]
    finally:
        engine.close()
    errors = {name: [round(((g - w).norm() / w.norm()).item(), 4) for w, g in zip(want, got)]
              for name, got in (("fresh", fresh), ("after generating", after))}
    print("tp 2 + ep 2 first logits against tp 1:", errors)
    assert max(max(v) for v in errors.values()) < 5e-2, errors
