"""Owns every tensor: the model, the KV cache, step inputs, the ViT and the sampler.

`prepare` turns the scheduler's chunks into one flat batch (token ids, (3, T) mRoPE positions,
slot mapping, block tables, the visual rows that fall inside each chunk); `run` executes it
and samples the sequences whose chunk reached their last token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
from dataclasses import dataclass, field

import torch

from ..config import EngineConfig
from ..device import device_tensor
from ..layers.attention import AttentionMetadata, varlen_attention_torch
from ..layers.sampler import SampleRow, Sampler, token_logprobs
from ..loader import build_model, load_model, model_config
from ..parallel import Parallel, one_device, set_peer_all_reduce
from ..processing.positions import decode_positions
from ..supervisor import free_port
from .cuda_graphs import DEFAULT_SIZES, DecodeGraphs
from .prefill_graphs import PrefillGraphs, buckets_up_to
from .scheduler import ScheduledChunk
from .structured import apply_masks
from .tp import StepChannel, Watchdog, fatal, init_group, shutdown_group, start_local_workers, wait_all

log = logging.getLogger(__name__)


@dataclass
class MultimodalState:
    """Per-sequence vision inputs: prompt positions and the ViT outputs for its visual tokens."""

    positions: torch.Tensor                         # (3, L) long, the prompt's mRoPE positions
    rope_delta: int
    visual_embeds: torch.Tensor | None = None       # (Nv, D), visual tokens in prompt order
    deepstack: list[torch.Tensor] = field(default_factory=list)   # levels x (Nv, D)
    visual_rank: torch.Tensor | None = None         # (L,) index into visual rows, -1 for text

    @classmethod
    def build(cls, positions, rope_delta, prompt_ids, visual_token_ids, visual_embeds=None, deepstack=()):
        ids = torch.tensor(prompt_ids)
        is_visual = torch.isin(ids, torch.tensor(sorted(visual_token_ids)))
        rank = torch.where(is_visual, is_visual.long().cumsum(0) - 1, torch.full_like(ids, -1))
        n = int(is_visual.sum())
        if n and (visual_embeds is None or visual_embeds.shape[0] != n):
            got = None if visual_embeds is None else visual_embeds.shape[0]
            raise ValueError(f"prompt has {n} visual tokens but {got} visual embeddings were given")
        return cls(positions, rope_delta, visual_embeds, list(deepstack), rank if n else None)


def vision_attention(backend: str):
    """The ViT's varlen attention for --mm-attention-backend."""
    if backend == "sdpa":
        return varlen_attention_torch
    if backend == "triton":
        from qwen3vl_kernels.varlen_attention import varlen_attention
        return varlen_attention
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        raise RuntimeError(f"mm_attention_backend={backend} needs the flash-attn package") from None

    def fa(q, k, v, cu_seqlens, scale):
        cu = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=q.device)
        longest = int((cu[1:] - cu[:-1]).max())
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale)
    return fa


def select_kernels(model, cfg: EngineConfig, fuse: bool | None = None) -> None:
    """Point the layers at the Triton kernels the config asks for (GPU); torch code otherwise.

    `fuse` (default: on a GPU) adds the small fused kernels: q/k-norm + rotary + KV write after
    the qkv projection (qkv_prep_), the routing kernel, the residual RMSNorm kernel, and the
    skinny GEMM as the linear layers' kernel at decode batch sizes. On CPU they only cost
    interpreter time, but tests ask for them to check the GPU's layer path. Only kernels are
    chosen here: the layers own their parameters and how they compute (layers/linear.py)."""
    from ..layers.linear import LinearBase
    from ..layers.moe import SparseMoE
    from ..layers.norm import RMSNorm
    from ..models.text import Attention, DecoderLayer

    if model.model.visual is not None:
        model.model.visual.attn_fn = vision_attention(cfg.mm_attention_backend)
    triton_attn, triton_moe = cfg.attention_backend == "triton", cfg.moe_backend == "triton"
    if triton_attn or triton_moe:
        from qwen3vl_kernels import switches
        from qwen3vl_kernels.attention import paged_decode_attention, paged_decode_attention_prep
        from qwen3vl_kernels.fused_moe import fused_moe, norm_route, route
        from qwen3vl_kernels.linear import skinny_linear, table_linear
        from qwen3vl_kernels.rmsnorm import rmsnorm
        from qwen3vl_kernels.rope import mrope_cos_sin, qkv_prep_
    on_gpu = cfg.device.startswith("cuda") if fuse is None else fuse
    lm = model.model.language_model
    if triton_attn and on_gpu and switches.ROPE_KERNEL:
        model.rope_fn = mrope_cos_sin
    if triton_attn and on_gpu:
        model.lm_head.skinny = table_linear
    for m in lm.modules():
        if isinstance(m, DecoderLayer):
            m.fuse_input_norm = triton_attn and on_gpu and switches.FUSED_INPUT_NORM
        if isinstance(m, Attention) and triton_attn:
            m.decode_fn = paged_decode_attention
            if on_gpu:
                m.prep_fn = qkv_prep_
                # (its newest K/V stay in registers: an fp8 cache's readers see them rounded)
                m.decode_prep_fn = paged_decode_attention_prep if (
                    switches.FUSED_DECODE_PREP and cfg.kv_torch_dtype == cfg.torch_dtype) else None
        elif isinstance(m, SparseMoE) and triton_moe:
            m.experts_fn = fused_moe
            if on_gpu:
                m.route_fn, m.norm_route_fn = route, norm_route
        elif isinstance(m, RMSNorm) and triton_attn and on_gpu:
            m.kernel = rmsnorm
        elif isinstance(m, LinearBase) and triton_attn and on_gpu:
            m.quant_method.skinny = skinny_linear


def kv_block_bytes(cfg: EngineConfig, kv_heads: int, head_dim: int, layers: int) -> int:
    """One cache block's bytes over every layer (K and V): what the memory budget is divided by."""
    return 2 * cfg.block_size * kv_heads * head_dim * cfg.kv_torch_dtype.itemsize * layers


def capture_prefill_graphs(build, limit: int, tp_size: int):
    """`build()`'s PrefillGraphs, captured; None (prefill runs eagerly) when the memory left past
    the KV cache cannot hold them on one GPU. Under tensor parallelism the ranks capture together
    (their collectives run in the warm-up passes), so one rank cannot drop out: the error names the
    settings that make room instead."""
    hint = (f"prefill CUDA graphs up to {limit} tokens do not fit beside the KV cache "
            "(--prefill-cuda-graph-max-tokens lower or 0, or --mem-fraction-static lower)")
    try:
        graphs = build()
        graphs.capture()
        return graphs
    except torch.cuda.OutOfMemoryError as e:
        if tp_size > 1:
            raise RuntimeError(hint) from e
    # past the except block: its traceback no longer holds the half-captured graphs
    log.warning("%s; prefill runs eagerly", hint)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None


def _prompt_rows(batch: list[ScheduledChunk], ends: list[int]) -> list[tuple]:
    """For chunks whose request asks for prompt logprobs: (request id, first prompt position, the
    batch rows whose logits predict the next prompt tokens, those tokens, how many alternatives)."""
    out = []
    for chunk, end in zip(batch, ends):
        seq = chunk.seq
        if seq.params.prompt_logprobs is None or chunk.start >= seq.num_prompt - 1:
            continue
        a, b = chunk.start, min(chunk.start + chunk.num_tokens, seq.num_prompt - 1)
        row0 = end - chunk.num_tokens
        out.append((seq.request_id, a, range(row0, row0 + b - a), seq.prompt_ids[a + 1 : b + 1],
                    seq.params.prompt_logprobs))
    return out


def _sample_rows(chunks: list[ScheduledChunk], banned: dict[str, set[int]] | None) -> list[SampleRow]:
    """The sampler's view of each sampling sequence: id, params, history, banned token ids."""
    return [SampleRow(c.seq.request_id, c.seq.params, c.seq.prompt_ids, c.seq.output_ids,
                      (banned or {}).get(c.seq.request_id)) for c in chunks]


class ModelRunner:
    """One rank's model. Rank 0 (the engine's) prepares each step and, under tensor parallelism,
    sends it to the other ranks (engine/tp.py), which run `serve_steps`."""

    def __init__(self, cfg: EngineConfig, rank: int = 0):
        self.cfg, self.rank = cfg, rank
        self.device = torch.device(cfg.rank_device(rank))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = cfg.torch_dtype
        self.par = Parallel(cfg.tp_size, rank, cfg.ep_size)
        self.workers, self.channel, self.watchdog = [], None, None
        self.peer_all_reduce = None
        if cfg.tp_size > 1:
            self._join_group()
            if cfg.nnodes == 1:
                # two GPUs of this host: sums up to its capacity by the peer all-reduce. Before the
                # weights and the KV cache are sized: mapping the other GPU's buffer costs memory there.
                from qwen3vl_kernels.allreduce import PeerAllReduce

                self.peer_all_reduce = PeerAllReduce.create(torch.distributed.group.WORLD, rank, cfg.tp_size,
                                                            self.device, self.dtype, same_device=one_device())
                set_peer_all_reduce(self.peer_all_reduce)
        self.model = load_model(cfg.model_path, self.device, self.dtype, cfg.load_format, cfg.quantization, self.par)
        self.model_cfg = self.model.cfg
        t = self.model_cfg.text
        self.visual_token_ids = (self.model_cfg.image_token_id, self.model_cfg.video_token_id)
        self.num_blocks = cfg.num_kv_blocks or self._auto_num_blocks()
        if cfg.tp_size > 1:                 # every rank's cache holds the blocks rank 0 hands out
            n = torch.tensor([self.num_blocks], device=self.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
            self.num_blocks = int(n)
            self.channel = StepChannel(self._ctrl, self.device, self.dtype, t.hidden_size, cfg.block_size)
        kv_heads = self.model.model.language_model.layers[0].self_attn.kv_heads      # this rank's
        # one block more than the block manager hands out: the scratch block CUDA-graph padding writes to
        shape = (2, self.num_blocks + 1, cfg.block_size, kv_heads, t.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=cfg.kv_torch_dtype, device=self.device)
                          for _ in range(t.num_hidden_layers)]
        self.sampler = Sampler()
        select_kernels(self.model, cfg)
        if cfg.moe_routing == "uniform":
            from ..layers.moe import route_uniformly

            route_uniformly(self.model, cfg.seed)
        self.vision_graphs = None
        if self.device.type == "cuda" and cfg.enable_vit_cuda_graph and rank == 0:
            from .vision_graphs import VisionGraphs

            self.vision_graphs = VisionGraphs(self.model.visual)
            self.vision_graphs.capture()
        self.graphs = None
        graphs_ok = self.device.type == "cuda" and cfg.attention_backend == "triton" and not (
            cfg.tp_size > 1 and one_device())
        if graphs_ok and cfg.cuda_graph_max_bs:
            sizes = [s for s in DEFAULT_SIZES if s <= cfg.cuda_graph_max_bs] or [cfg.cuda_graph_max_bs]
            self.graphs = DecodeGraphs(self.model, self.kv_caches, cfg.block_size,
                                       -(-cfg.max_model_len // cfg.block_size), self.num_blocks, sizes, self.device)
            self.graphs.capture()
        self.prefill_graphs = None
        limit = min(cfg.prefill_cuda_graph_max_tokens, cfg.max_num_batched_tokens)
        if graphs_ok and limit > 0:
            self.prefill_graphs = capture_prefill_graphs(
                lambda: PrefillGraphs(self.model, self.kv_caches, cfg.block_size, self.num_blocks,
                                      buckets_up_to(limit), self.device, self.dtype,
                                      cfg.prefill_cuda_graph_max_seqs), limit, cfg.tp_size)

    def _join_group(self) -> None:
        """Start this node's other ranks (rank 0 only) and join the group."""
        cfg = self.cfg
        addr = cfg.dist_init_addr or f"127.0.0.1:{free_port()}"
        per_node = cfg.tp_size // cfg.nnodes
        if self.rank == 0:
            # a layout the model cannot take (heads, experts, fp8 blocks) fails here, before any process starts
            build_model(model_config(cfg.model_path, cfg.quantization), "meta", self.dtype, self.par)
            settings = dataclasses.asdict(cfg)
            settings["dist_init_addr"] = addr
            self.workers = start_local_workers(settings, list(range(1, per_node)))
            self.watchdog = Watchdog(self.workers)
            self.watchdog.start()
        backend = "nccl" if self.device.type == "cuda" and not one_device() else "gloo"
        self._ctrl = init_group(self.rank, cfg.tp_size, addr, backend, cfg.dist_timeout_s)

    def close(self) -> None:
        """Rank 0: stop the other ranks and take the group down together with them, then wait for
        them to exit. NCCL's teardown is collective: waiting for the workers first (they sit in
        their own teardown, waiting for this rank) deadlocked every tp engine's close on GPUs."""
        if self.rank != 0 or self.channel is None:
            return
        if self.watchdog is not None:
            self.watchdog.stopping.set()
        try:
            self.channel.stop()
            stopped = True
        except Exception as e:          # a worker already gone: kill the rest first
            log.warning("stopping the tensor-parallel workers: %s", e)
            stopped = False
        self.channel = None
        self.release_graphs()
        if not stopped:
            wait_all(self.workers, 0.0)
        shutdown_group()
        wait_all(self.workers, 10.0)

    def release_graphs(self) -> None:
        """Drop the decode graphs and the peer all-reduce's buffers (the runner cannot decode
        after): graphs that captured NCCL collectives hold their communicator, which cannot be
        destroyed while they live."""
        if self.peer_all_reduce is not None:
            set_peer_all_reduce(None)
        if self.graphs is None and self.prefill_graphs is None and self.peer_all_reduce is None:
            return
        self.graphs = self.prefill_graphs = None
        if self.peer_all_reduce is not None:
            self.peer_all_reduce.close()
            self.peer_all_reduce = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def serve_steps(self) -> None:
        """Ranks 1..: run each step rank 0 sends until it sends stop."""
        while True:
            h, ids, positions, meta, vis_embeds, vis_mask, deepstack = self.channel.receive()
            if h["op"] == "stop":
                return
            with torch.no_grad():
                if h["graph"] == "decode":
                    self.graphs.run(ids, positions, meta)
                    continue
                if h["graph"] == "prefill":
                    self.prefill_graphs.run(ids, positions, meta, vis_embeds, vis_mask, deepstack)
                    continue
                hidden = self.model(ids, positions, self.kv_caches, meta, vis_embeds, vis_mask, deepstack)
                if h["rows"] == "all":
                    self.model.compute_logits(hidden)
                elif h["rows"]:
                    self.model.compute_logits(hidden[device_tensor(h["rows"], torch.long, self.device)])

    def _publish(self, graph: str | None, rows, ids, positions, meta, vis_embeds=None, vis_mask=None, deepstack=()):
        if self.channel is not None:
            self.channel.send({"op": "step", "graph": graph, "rows": rows}, ids, positions, meta, vis_embeds,
                              vis_mask, deepstack)

    @contextlib.contextmanager
    def _group_step(self):
        """Around a step's collectives: a failure there leaves the ranks out of step (one may be
        gone, the others inside a collective), so under tensor parallelism it ends the process,
        as a worker's death does (tp.Watchdog): requests fail now, the supervisor restarts."""
        try:
            yield
        except Exception as e:
            if self.channel is None:
                raise
            log.exception("a tensor-parallel step failed")
            fatal(f"a tensor-parallel step failed ({type(e).__name__}: {e}); the engine stops")

    def _auto_num_blocks(self) -> int:
        if self.device.type != "cuda":
            return 2048
        t = self.model_cfg.text
        free, total = torch.cuda.mem_get_info(self.device)
        kv_heads = self.model.model.language_model.layers[0].self_attn.kv_heads
        per_block = kv_block_bytes(self.cfg, kv_heads, t.head_dim, t.num_hidden_layers)
        # room for activations and CUDA graphs outside the static fraction
        budget = total * self.cfg.mem_fraction_static - (total - free)
        if budget < per_block * 16:
            raise RuntimeError(f"mem_fraction_static={self.cfg.mem_fraction_static} leaves no room for the KV cache")
        return int(budget // per_block)

    # -- vision ------------------------------------------------------------------------------
    @torch.no_grad()
    def run_vision(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]):
        """Packed pixels of several items -> (embeds (N/4, D), deepstack levels)."""
        pv = pixel_values.to(self.device, self.dtype)
        return (self.vision_graphs or self.model.visual)(pv, grids)

    # -- decoder step ------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, batch: list[ScheduledChunk]) -> torch.Tensor:
        """Logits (T, V) of every token of the batch (prompt scoring, parity checks)."""
        ids, positions, meta, vis_embeds, vis_mask, deepstack = self.prepare(batch)
        with self._group_step():
            self._publish(None, "all", ids, positions, meta, vis_embeds, vis_mask, deepstack)
            hidden = self.model(ids, positions, self.kv_caches, meta, vis_embeds, vis_mask, deepstack)
            return self.model.compute_logits(hidden)

    @torch.no_grad()
    def run(self, batch: list[ScheduledChunk], banned: dict[str, set[int]] | None = None,
            pending: torch.Tensor | None = None, masks: dict | None = None) -> tuple[torch.Tensor, tuple | None] | None:
        """Queue the batch; returns the sampled ids (device, int64) of the chunks with `samples`, in
        order, with their logprobs where asked (layers/sampler.token_logprobs), or None when no
        chunk samples. Nothing here waits for the GPU.

        Token ids not yet known on the host are given as -(1 + i): the i-th id of `pending`, the
        previous step's sampled ids, still on the device."""
        self.last_prompt_logprobs = []
        if self.graphs is not None and self.channel is None and self._decoding(batch):
            # the common decode step: its inputs from host lists in three copies, no metadata tensors
            bs = self.cfg.block_size
            ids = self._ids_tensor([c.seq.tokens[c.start] for c in batch], pending)
            positions = [c.start + (c.seq.mm.rope_delta if c.seq.mm is not None else 0) for c in batch]
            slots = [c.seq.block_table[c.start // bs] * bs + c.start % bs for c in batch]
            logits = self.graphs.run_host(ids, slots, positions, [c.start + 1 for c in batch],
                                          [c.seq.block_table for c in batch])
            return self._sample(logits, batch, banned, masks)
        ids, positions, meta, vis_embeds, vis_mask, deepstack = self.prepare(batch, pending)
        if (self.graphs is not None and vis_embeds is None and meta.is_decode_only and self.graphs.fits(len(batch))
                and all(c.samples for c in batch)):
            with self._group_step():
                self._publish("decode", None, ids, positions, meta)
                logits = self.graphs.run(ids, positions, meta)
            return self._sample(logits, batch, banned, masks)
        ends = list(itertools.accumulate(c.num_tokens for c in batch))
        last = [end - 1 for end, c in zip(ends, batch) if c.samples]
        prompt = _prompt_rows(batch, ends)
        if (self.prefill_graphs is not None and all(c.start == 0 and c.samples for c in batch)
                and not prompt and self.prefill_graphs.fits(ends[-1], len(batch))):
            # new sequences' whole prompts (their first tokens: TTFT), replayed from a graph
            with self._group_step():
                self._publish("prefill", None, ids, positions, meta, vis_embeds, vis_mask, deepstack)
                logits = self.prefill_graphs.run(ids, positions, meta, vis_embeds, vis_mask, deepstack)
            return self._sample(logits, batch, banned, masks)
        rows = sorted(last + [r for _, _, span, _, _ in prompt for r in span]) if prompt else last
        with self._group_step():
            self._publish(None, rows, ids, positions, meta, vis_embeds, vis_mask, deepstack)
            hidden = self.model(ids, positions, self.kv_caches, meta, vis_embeds, vis_mask, deepstack)
            if not rows:
                return None
            logits = self.model.compute_logits(hidden[device_tensor(rows, torch.long, self.device)])
        if prompt:
            at = {r: i for i, r in enumerate(rows)}
            for rid, first, span, targets, k in prompt:
                lp = torch.log_softmax(logits[device_tensor([at[r] for r in span], torch.long, self.device)].float(), -1)
                chosen = lp.gather(1, device_tensor(targets, torch.long, self.device)[:, None])[:, 0]
                self.last_prompt_logprobs.append((rid, first, (chosen, *lp.topk(k, -1)) if k else (chosen,)))
            logits = logits[device_tensor([at[r] for r in last], torch.long, self.device)] if last else None
        if not last:
            return None
        return self._sample(logits, [c for c in batch if c.samples], banned, masks)

    def _decoding(self, batch: list[ScheduledChunk]) -> bool:
        """Whether a decode graph takes the batch through run_host: one sampled token a sequence,
        each past its prompt (no visual rows; the three mRoPE axes equal), few enough sequences."""
        return self.graphs.fits(len(batch)) and all(c.samples and c.num_tokens == 1 and c.start >= c.seq.num_prompt
                                                    for c in batch)

    def _sample(self, logits, chunks, banned, masks=None):
        """-> (sampled ids, token_logprobs' tuple or None), both on the device. `masks`: request id
        -> the bitmask of the tokens its grammar allows (structured output), or a callable returning
        that, called here, after the forward is queued; logprobs stay raw."""
        if callable(masks):
            masks = masks()
        rows = [i for i, c in enumerate(chunks) if masks and c.seq.request_id in masks]
        masked = apply_masks(logits, rows, [masks[chunks[i].seq.request_id] for i in rows]) if rows else logits
        ids = self.sampler.sample(masked, _sample_rows(chunks, banned))
        return ids, token_logprobs(logits, ids, [c.seq.params for c in chunks])

    def prepare(self, batch: list[ScheduledChunk], pending: torch.Tensor | None = None):
        """The step's device inputs. Plain Python lists per token, one tensor each at the end: a
        decode step of many sequences must not pay several small torch ops per sequence. Every
        copy is queued from pinned memory, so preparing a step never waits for the one running."""
        bs = self.cfg.block_size
        ids, slots, flat_pos, vis_rows, mask_at = [], [], [], [], []
        pos_parts: list[torch.Tensor] | None = None        # only when a chunk has mRoPE prompt positions
        deep_rows: list[list[torch.Tensor]] = []
        for chunk in batch:
            seq, a, b = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            ids.extend(seq.tokens[a:b])
            table = seq.block_table
            slots.extend(table[j // bs] * bs + j % bs for j in range(a, b))
            mm = seq.mm
            if mm is None or a >= seq.num_prompt:           # text, or decode: all three axes equal
                delta = 0 if mm is None else mm.rope_delta
                part = list(range(a + delta, b + delta))
                if pos_parts is None:
                    flat_pos.extend(part)
                else:
                    pos_parts.append(torch.tensor(part).expand(3, -1))
            else:
                if pos_parts is None:
                    pos_parts = [torch.tensor(flat_pos, dtype=torch.long).expand(3, -1)]
                pos_parts.append(self._positions(seq, a, b))
            if mm is not None and mm.visual_rank is not None and a < seq.num_prompt:
                rank = mm.visual_rank[a : min(b, seq.num_prompt)]
                sel = rank >= 0
                if sel.any():
                    picked = rank[sel].to(mm.visual_embeds.device)
                    vis_rows.append(mm.visual_embeds[picked])
                    deep_rows.append([d[picked] for d in mm.deepstack])
                    mask_at.append((len(ids) - (b - a), sel))
        dev = self.device
        max_blocks = max(len(c.seq.block_table) for c in batch)
        tables = [c.seq.block_table + [-1] * (max_blocks - len(c.seq.block_table)) for c in batch]
        context_lens = [c.start + c.num_tokens for c in batch]
        meta = AttentionMetadata(
            query_lens=[c.num_tokens for c in batch],
            context_lens=context_lens,
            slot_mapping=device_tensor(slots, torch.long, dev),
            block_tables=device_tensor(tables, torch.int32, dev),
            block_size=bs,
            context_lens_t=device_tensor(context_lens, torch.int32, dev),
        )
        if pos_parts is None:
            positions = device_tensor(flat_pos, torch.long, dev).expand(3, -1)
        else:
            positions = device_tensor(torch.cat(pos_parts, dim=1), torch.long, dev)
        vis_embeds, deepstack, mask_t = None, (), None
        if vis_rows:
            vis_embeds = torch.cat(vis_rows).to(dev)
            levels = min(len(r) for r in deep_rows)
            deepstack = [torch.cat([r[level] for r in deep_rows]).to(dev) for level in range(levels)]
            mask = torch.zeros(len(ids), dtype=torch.bool)
            for start, sel in mask_at:
                mask[start : start + sel.shape[0]] = sel
            mask_t = device_tensor(mask, torch.bool, dev)
        return self._ids_tensor(ids, pending), positions, meta, vis_embeds, mask_t, deepstack

    def _ids_tensor(self, ids: list[int], pending: torch.Tensor | None) -> torch.Tensor:
        """The step's token ids on the device; -(1 + i) stands for the i-th of `pending` (the ids
        the step in flight samples)."""
        if min(ids) < 0 and pending is None:
            raise RuntimeError("a placeholder token id without the step in flight that samples it")
        if pending is not None and len(ids) <= pending.shape[0] and ids == list(range(-1, -1 - len(ids), -1)):
            # a decode step after a decode step, the same sequences in the same order: its ids are
            # the first rows of those the step in flight samples (no copy, no gather on the device)
            return pending[: len(ids)]
        ids_t = device_tensor(ids, torch.long, self.device)
        if min(ids) < 0:                                # some ids sampled by the step still in flight
            ids_t = torch.where(ids_t < 0, pending[(-1 - ids_t).clamp_(min=0)], ids_t)
        return ids_t

    @staticmethod
    def _positions(seq, a: int, b: int) -> torch.Tensor:
        mm = seq.mm
        if mm is None:
            return torch.arange(a, b).expand(3, -1)
        parts = []
        if a < seq.num_prompt:
            parts.append(mm.positions[:, a : min(b, seq.num_prompt)])
        if b > seq.num_prompt:
            start = max(a, seq.num_prompt)
            parts.append(decode_positions(start, b - start, mm.rope_delta))
        return torch.cat(parts, dim=1)
