"""The engine loop: schedule -> run -> postprocess, one step at a time.

Requests enter with token ids (and, for media, either pixels to encode here or ViT outputs made
elsewhere); each `step` returns what every affected request gained: new token ids, the text they
complete, and the finish reason once done.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass

import torch

from ..config import ConfigError, EngineConfig
from ..errors import PromptTooLongError, RequestError, check_prompt_length
from ..processing.processor import MediaItem, ProcessedPrompt
from ..processing.tokenizer import Tokenizer
from ..layers.sampler import needs_history
from ..sampling_params import SamplingParams, generation_defaults
from .vision_cache import VisionCache, encode_with_cache
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner, MultimodalState
from .scheduler import ScheduledChunk, Scheduler
from .sequence import Sequence, Status

log = logging.getLogger(__name__)

class InvalidRequestError(RequestError):
    """The request cannot run as sent (HTTP 400): refused before it touches the batch."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    cached_tokens: int
    error: str | None = None          # finish_reason "error": this request alone failed inside a step
    client_error: bool = False        # ... because of what it asked (a RequestError: its grammar gave out), a 400
    # per new token, when the request asked (SamplingParams.logprobs): (token id, logprob,
    # [(id, logprob), ...] its top alternatives); the model's raw log-softmax
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    # with the first output, when asked (SamplingParams.prompt_logprobs): the same for prompt tokens 1..L-1
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


class _Request:
    """Engine-side state beyond the scheduler's: detokeniser and the text already sent."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, constraint=None):
        self.seq = seq
        self.detok = IncrementalDetokenizer(tokenizer, seq.params.skip_special_tokens)
        self.sent = 0
        self.hold = max((len(s) for s in seq.params.stop), default=1) - 1
        self.constraint = constraint          # structured output (engine/structured.py)
        # prompt logprobs by position (SamplingParams.prompt_logprobs): filled as prefill chunks run
        self.prompt_logprobs = [None] * (seq.num_prompt - 1) if seq.params.prompt_logprobs is not None else None


PENDING = -1     # output ids at or below this are placeholders: -1 - i is row i of the step in flight


@dataclass
class _Step:
    """A step queued on the device: its sampled ids (device, and their host copy once `done`),
    and for each, the sequence and the output position it fills."""
    tokens: torch.Tensor
    host: torch.Tensor
    done: torch.cuda.Event | None
    sampled: list[tuple[Sequence, int]]
    logprobs: list | None = None       # per sampled row: ((chosen, top values, top ids) on the host, row) or None
    prompt_logprobs: list | None = None   # (request id, first position, (chosen, values, ids) on the host)
    outputs: list | None = None           # once read back (_finish_step)


# prompts this long or longer (that fit a prefill graph) get a step of their own (Scheduler's solo_prefill);
# shorter ones pack into steps as before, where one eager step serves many
SOLO_PREFILL_MIN_TOKENS = 256


class LLMEngine:
    def __init__(self, cfg: EngineConfig, tokenizer: Tokenizer | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer or Tokenizer(cfg.model_path)
        try:       # what a request's unset sampling fields take (SamplingParams.from_dict's defaults)
            self.sampling_defaults = generation_defaults(cfg.model_path) if cfg.sampling_defaults == "model" else {}
        except ValueError as e:
            raise ConfigError(f"sampling_defaults model: {e}") from None
        self.runner = ModelRunner(cfg)
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_cache)
        graphs = self.runner.prefill_graphs
        solo = (SOLO_PREFILL_MIN_TOKENS, graphs.buckets[-1]) if cfg.solo_prefill and graphs is not None else None
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, solo,
                                   solo_pack=graphs.max_seqs if solo else 1,
                                   solo_pack_tokens=cfg.prefill_pack_max_tokens)
        self.eos_ids = set(self.tokenizer.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self.vision_cache = VisionCache(cfg.vlm_cache_size_mb)
        self._ids = itertools.count()
        self._inflight: _Step | None = None      # the step queued on the device, not yet read back
        self._failed: list[RequestOutput] = []   # requests a step failed, reported by the next step()
        self._prompt_lp: list = []               # the step being launched's prompt logprobs (host copies)
        self.vocab_size = self.runner.model_cfg.text.vocab_size

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (the engine is unusable after)."""
        self.runner.close()

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: ProcessedPrompt | list[int], params: SamplingParams,
                    request_id: str | None = None, vision_outputs=None) -> str:
        """Queue a request. Media in `prompt` is encoded here unless `vision_outputs`
        (embeds, deepstack) for all of it is given."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, list):
            prompt = ProcessedPrompt(prompt, [], torch.arange(len(prompt)).expand(3, -1), 0)
        n = len(prompt.prompt_ids)
        if n == 0:
            raise PromptTooLongError("the prompt is empty")
        check_prompt_length(n, self.cfg.max_model_len)
        params = self._checked_params(prompt, params)
        constraint = None
        if params.structured_output is not None:        # compiles the grammar: a bad one is the client's 400
            from .structured import Constraint

            constraint = Constraint(params.structured_output, self.cfg.model_path, self.vocab_size,
                                    sorted(self.eos_ids))
        if vision_outputs is None and any(m.pixel_values.numel() for m in prompt.media):
            vision_outputs = self.encode_media(prompt.media)
        elif vision_outputs is not None:
            self._check_vision(*vision_outputs)
        embeds, deepstack = vision_outputs if vision_outputs is not None else (None, ())
        mm = MultimodalState.build(prompt.positions, prompt.rope_delta, prompt.prompt_ids,
                                   self.runner.visual_token_ids, embeds, deepstack)
        seq = Sequence(request_id, list(prompt.prompt_ids), params, mm=mm, arrival=time.monotonic(),
                       cache_keys=cache_keys(prompt, self.runner.visual_token_ids))
        self.scheduler.add(seq)
        self._requests[request_id] = _Request(seq, self.tokenizer, constraint)
        return request_id

    def _checked_params(self, prompt: ProcessedPrompt, params: SamplingParams) -> SamplingParams:
        """What only the engine can check: ids against the vocabulary, lengths against the context;
        top_k past the vocabulary is no cut at all."""
        v = self.vocab_size
        if any(not 0 <= t < v for t in prompt.prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {v})")
        if any(t >= v for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {v})")
        if params.logit_bias and max(params.logit_bias) >= v:
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {v})")
        if params.max_tokens > self.cfg.max_model_len:
            raise InvalidRequestError(f"max_tokens {params.max_tokens} exceeds the context of "
                                      f"{self.cfg.max_model_len} tokens")
        if tuple(prompt.positions.shape) != (3, len(prompt.prompt_ids)):
            raise InvalidRequestError(f"positions must have shape (3, {len(prompt.prompt_ids)})")
        limit = self.cfg.max_model_len
        if prompt.positions.numel() and not (0 <= int(prompt.positions.min()) and int(prompt.positions.max()) < limit):
            raise InvalidRequestError(f"positions must be in [0, {limit})")
        if not -limit <= prompt.rope_delta <= limit:
            raise InvalidRequestError(f"rope_delta must be in [-{limit}, {limit}]")
        if params.top_k > v:
            params = dataclasses.replace(params, top_k=0)
        return params

    def _check_vision(self, embeds: torch.Tensor, deepstack) -> None:
        """ViT outputs handed in from outside (the Triton vit model, or a client calling llm)."""
        d = self.runner.model_cfg.text.hidden_size
        levels = len(self.runner.model_cfg.vision.deepstack_visual_indexes)
        if embeds.dim() != 2 or embeds.shape[1] != d or not embeds.is_floating_point():
            raise InvalidRequestError(f"visual_embeds must be float (N, {d}), got {tuple(embeds.shape)}")
        if len(deepstack) != levels or any(tuple(x.shape) != tuple(embeds.shape) for x in deepstack):
            raise InvalidRequestError(f"deepstack must be ({levels}, {embeds.shape[0]}, {d})")

    def encode_media(self, media: list[MediaItem]):
        """ViT outputs for the media, reusing cached ones (vlm_cache_size_mb)."""
        pixels = torch.cat([m.pixel_values for m in media])
        merge_unit = self.runner.model_cfg.vision.spatial_merge_size ** 2
        return encode_with_cache(self.runner.run_vision, self.vision_cache, pixels, [m.grid_thw for m in media],
                                 [m.content_hash for m in media], merge_unit)

    def warm_up(self, lengths: tuple[int, ...] = (16, 256, 2048), traffic: bool = True) -> float:
        """Prefill a synthetic prompt of each length (capped by the chunk and context sizes) and
        decode two tokens from it, so that the kernels the first real requests need (launch
        shapes by batch size, prefill attention, the MoE's sorted path) compile now and not
        inside their time to first token. Leaves nothing behind: no request, no cached prefix,
        the prefix counters at zero. -> seconds taken. (Serving calls it; the decode graphs
        were captured at start already.)

        `traffic`: also the steps concurrent requests make, which run eagerly (a lone prompt
        replays a prefill graph, whose buckets are multiples of 128): two prompts in one step, at
        every power-of-two token count up to the chunk size and one past it (the launch tables
        are keyed by powers of two; Triton compiles a kernel again for an integer argument that
        is or is not a multiple of 16, or 1), and prompts joining sequences that are decoding.
        What these compile would otherwise be compiled inside the time to first token of the
        first concurrent requests after a start."""
        if self.has_unfinished():
            raise RuntimeError("warm_up on a busy engine")
        t0 = time.perf_counter()
        cap = min(self.cfg.max_num_batched_tokens, self.cfg.max_model_len - 2)
        span = max(min(self.vocab_size, 4096) - 100, 1)             # ordinary ids, no special tokens
        salts = itertools.count()

        def prompt(n: int, fresh: bool = False) -> list[int]:
            """n ids; `fresh`: sharing no prefix with any other (the prefix cache would cut its chunk)."""
            s = next(salts) * 104729 if fresh else 0
            return [100 + (i * 7919 + s) % span for i in range(max(1, min(n, cap)))]

        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        for n in sorted({max(1, min(n, cap)) for n in lengths}):
            self.generate([prompt(n)], params)
        # the sampler's draws (their first call loads kernels for ~150 ms on a GPU): the release's
        # generation defaults (top-k candidates), then top-p over the sorted vocabulary, seeded
        for sampled in (SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_tokens=2, ignore_eos=True),
                        SamplingParams(temperature=1.0, top_p=0.9, seed=0, max_tokens=2, ignore_eos=True)):
            self.generate([prompt(16, True)], sampled)
        if self.runner.device.type == "cuda":           # and the sampling kernel's other widths (top_k up to 64)
            from qwen3vl_kernels import switches
            from qwen3vl_kernels.sample import warm

            if switches.SAMPLE_KERNEL:
                warm(self.vocab_size, self.runner.dtype, self.runner.device)
        # the pairs share their steps even where solo_prefill would give each prompt its own (it
        # still packs prompts after a streak, and short ones)
        solo, self.scheduler.solo_prefill = self.scheduler.solo_prefill, None
        try:
            if traffic:
                sizes = [2 ** i for i in range(1, cap.bit_length())]
                for total in sorted({t for m in sizes for t in (m, m + 1) if t <= cap}):
                    self.generate([prompt(total // 2, True), prompt(total - total // 2, True)], params)
                # a prompt's prefill beside a decoding sequence: 1 + 254 rows (odd), then 1 + 15
                for n in (254, 15):
                    self.add_request(prompt(16, True), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
                    self.step()                                     # the first one's prefill
                    self.add_request(prompt(n, True), params)
                    while self.has_unfinished():
                        self.step()
        finally:
            self.scheduler.solo_prefill = solo
        self.block_manager.forget_prefixes()
        return time.perf_counter() - t0

    def abort(self, request_id: str) -> bool:
        """Cancel a request: its KV blocks are freed at once."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        self.runner.sampler.forget(request_id)
        if self._inflight is not None and not any(self._live(seq) for seq, _ in self._inflight.sampled):
            self._inflight = None                 # nothing left to read back from it
        return True

    def _live(self, seq: Sequence) -> bool:
        req = self._requests.get(seq.request_id)
        return req is not None and req.seq is seq and seq.status is not Status.FINISHED

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Queue the next batch on the device, then finish the previous one: with overlap on, the
        host's work for one step (outputs, detokenising, stop checks, scheduling and inputs of the
        next) runs while the device computes, and the outputs returned are those of the step
        before. A step's sampled ids feed the next one on the device, as placeholders on the host
        (`PENDING`) until they are read back.

        A step that raises is run again in halves until the sequences that make it fail are
        alone: those end with finish_reason "error", the others go on as if they had been alone."""
        outputs: list[RequestOutput] = []
        prev, self._inflight = self._inflight, None
        batch = self.scheduler.schedule()
        launched = self._launch(batch, prev) if batch else None
        if prev is not None:
            outputs += prev.outputs if prev.outputs is not None else self._finish_step(prev)
        if launched is not None:
            if self.cfg.overlap_schedule:
                self._inflight = launched
            else:
                outputs += self._finish_step(launched)
        failed, self._failed = self._failed, []
        return outputs + failed

    def _launch(self, batch: list[ScheduledChunk], prev: _Step | None) -> _Step | None:
        banned = {c.seq.request_id: b for c in batch if c.samples and (b := self._banned(c.seq))}
        constrained = [(c.seq.request_id, r.constraint) for c in batch if c.samples and
                       (r := self._requests.get(c.seq.request_id)) is not None and r.constraint is not None]
        masks = {}
        # a grammar's mask and the penalties read the previous token, but only at sampling: `prev`
        # is read back there, while the device runs this step's forward
        if prev is not None and (constrained or any(needs_history(c.seq.params) for c in batch if c.samples)):
            masks = _MasksAfter(self, prev, constrained)
        elif constrained:
            from .structured import next_masks

            masks = dict(zip((rid for rid, _ in constrained), next_masks([c for _, c in constrained])))
        self._prompt_lp = []
        runs = self._run_isolating(batch, banned, None if prev is None else prev.tokens, masks)
        prompt_lp = self._prompt_lp
        batch = [c for part, _ in runs for c in part]
        parts = [r[0] for _, r in runs if r is not None]
        tokens = None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts)
        row_logprobs = []                   # one entry per sampled row, in order
        for part, r in runs:
            n = sum(c.samples for c in part)
            if r is None or r[1] is None:
                row_logprobs += [None] * n
                continue
            copies = tuple(t.to("cpu", non_blocking=True) for t in r[1])     # read after the step's event
            row_logprobs += [(copies, i) for i in range(n)]
        # a sequence can have ended meanwhile, on the previous step's token (read back by _MasksAfter)
        self.scheduler.computed([c for c in batch if c.seq.status is not Status.FINISHED])
        sampled = []
        for i, chunk in enumerate(c for c in batch if c.samples):
            seq = chunk.seq
            sampled.append((seq, len(seq.output_ids)))
            if seq.status is Status.FINISHED:
                self.runner.sampler.forget(seq.request_id)      # its draw here recreated the generator
                continue
            seq.output_ids.append(PENDING - i)
            if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.cfg.max_model_len:
                seq.finishing = True              # it ends on this token: schedule it no further
        if tokens is None:
            if prompt_lp:             # a prefill chunk that samples nothing yet: its prompt logprobs now
                if self.runner.device.type == "cuda":
                    torch.cuda.current_stream().synchronize()
                self._store_prompt_logprobs(prompt_lp)
            return None
        host = tokens.to("cpu", non_blocking=True) if tokens.is_cuda else tokens
        done = None
        if tokens.is_cuda:
            done = torch.cuda.Event()
            done.record()
        return _Step(tokens, host, done, sampled, row_logprobs if any(row_logprobs) else None, prompt_lp or None)

    def _store_prompt_logprobs(self, entries) -> None:
        for rid, first, lp in entries:
            req = self._requests.get(rid)
            if req is None or req.prompt_logprobs is None:
                continue
            chosen = lp[0].tolist()
            vals, ids = (lp[1].tolist(), lp[2].tolist()) if len(lp) == 3 else ([[]] * len(chosen), [[]] * len(chosen))
            for i, c in enumerate(chosen):
                pos = first + i
                req.prompt_logprobs[pos] = (req.seq.prompt_ids[pos + 1], c, list(zip(ids[i], vals[i])))

    def _run_isolating(self, batch, banned, pending, masks=None) -> list[tuple[list[ScheduledChunk], tuple | None]]:
        """runner.run on the batch; if it raises, on each half in turn, down to the single chunks
        that fail (each then fails its request). -> (chunks run, their sampled ids) in batch order."""
        try:
            result = self.runner.run(batch, banned, pending, masks)
            self._prompt_lp += [(rid, first, tuple(t.to("cpu", non_blocking=True) for t in lp))
                                for rid, first, lp in self.runner.last_prompt_logprobs]
            return [(batch, result)]
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch[0].seq, e)
                return []
            log.warning("a step of %d sequences failed (%s: %s); retrying it in halves", len(batch),
                        type(e).__name__, e)
            mid = len(batch) // 2
            return (self._run_isolating(batch[:mid], banned, pending, masks)
                    + self._run_isolating(batch[mid:], banned, pending, masks))

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """End one request because of an error in its own step (the others are unaffected). A
        RequestError is the request's own doing and its message goes to the client; any other
        error's stays in the log."""
        client = isinstance(error, RequestError)
        (log.warning if client else log.error)("request %s failed in the engine: %s: %s", seq.request_id,
                                               type(error).__name__, error)
        self._requests.pop(seq.request_id, None)
        self.scheduler.finish(seq, "error")
        self.runner.sampler.forget(seq.request_id)
        self._failed.append(RequestOutput(seq.request_id, [], "", True, "error", seq.num_prompt,
                                          sum(t >= 0 for t in seq.output_ids), seq.num_cached_prompt,
                                          error=str(error) if client else f"{type(error).__name__} while computing "
                                                                          "this request", client_error=client))

    def _finish_step(self, step: _Step) -> list[RequestOutput]:
        """Read the step's tokens back and turn them into outputs (kept in `step.outputs` too)."""
        if step.done is not None:
            step.done.synchronize()
        if step.prompt_logprobs:
            self._store_prompt_logprobs(step.prompt_logprobs)
        outputs = []
        for row, ((seq, pos), token) in enumerate(zip(step.sampled, step.host.tolist())):
            if not self._live(seq):
                continue                          # aborted, or ended before this token was needed
            seq.output_ids[pos] = token
            try:
                prompt_lp = self._requests[seq.request_id].prompt_logprobs if pos == 0 else None
                out = self._postprocess(seq, pos, token)
                out.prompt_logprobs = prompt_lp
                if step.logprobs is not None and step.logprobs[row] is not None and seq.params.logprobs is not None:
                    (chosen, vals, ids), i = step.logprobs[row]
                    k = seq.params.logprobs
                    out.logprobs = [(token, float(chosen[i]), list(zip(ids[i, :k].tolist(), vals[i, :k].tolist())))]
                outputs.append(out)
            except Exception as e:                # e.g. a token the detokeniser cannot read
                self._fail(seq, e)
        step.outputs = outputs
        return outputs

    def _banned(self, seq: Sequence) -> set[int]:
        p = seq.params
        if len(seq.output_ids) >= p.min_tokens:
            return set()
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)

    def _postprocess(self, seq: Sequence, pos: int, token: int) -> RequestOutput:
        req = self._requests[seq.request_id]
        p = seq.params
        req.detok.push(token)
        reason = None
        if req.constraint is not None:
            req.constraint.consume(token)
            if req.constraint.failed:         # llguidance's limits on the client's grammar (its Earley items)
                reason = req.constraint.failed.strip().splitlines()[0]
                raise RequestError(f"structured_output stopped after {pos} tokens: {reason}")
        n_out = pos + 1
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif n_out >= p.max_tokens or seq.num_prompt + n_out >= self.cfg.max_model_len:
            reason = "length"
        stop_hit = None
        if p.stop and reason != "stop":
            stop_hit = _find_stop(req.detok.text, p.stop, max(0, req.sent - req.hold))
            if stop_hit is not None:
                reason = "stop"
        if reason is not None and stop_hit is None:
            req.detok.flush()
        text = req.detok.text
        if stop_hit is not None:
            text = text[:stop_hit[1] if p.include_stop_str_in_output else stop_hit[0]]
        emit_upto = len(text) if reason is not None else max(req.sent, len(text) - req.hold)
        delta = text[req.sent:emit_upto]
        req.sent = emit_upto
        if reason is not None:
            del seq.output_ids[n_out:]            # a token queued after the last one is dropped
            self.scheduler.finish(seq, reason)
            self.runner.sampler.forget(seq.request_id)
            del self._requests[seq.request_id]
        return RequestOutput(seq.request_id, [token], delta, reason is not None, reason, seq.num_prompt,
                             n_out, seq.num_cached_prompt)

    def prompt_logits(self, prompt: ProcessedPrompt) -> torch.Tensor:
        """Logits (L, V) at every prompt position, computed in one prefill outside the queue."""
        embeds, deepstack = self.encode_media(prompt.media) if prompt.media else (None, ())
        mm = MultimodalState.build(prompt.positions, prompt.rope_delta, prompt.prompt_ids,
                                   self.runner.visual_token_ids, embeds, deepstack)
        seq = Sequence("prompt-logits", list(prompt.prompt_ids), SamplingParams(max_tokens=1), mm=mm)
        if not self.block_manager.ensure(seq, seq.num_prompt):
            raise PromptTooLongError("not enough free KV blocks to score this prompt")
        try:
            return self.runner.logits([ScheduledChunk(seq, 0, seq.num_prompt)])
        finally:
            self.block_manager.free(seq)

    # -- convenience -------------------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams]) -> list[dict]:
        """Run prompts to completion (offline use, tests, the one-shot CLI)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        results = {i: {"output_token_ids": [], "text": "", "finish_reason": None, "cached_tokens": 0} for i in ids}
        while self.has_unfinished():
            for out in self.step():
                r = results[out.request_id]
                r["output_token_ids"].extend(out.new_token_ids)
                r["text"] += out.delta_text
                r["cached_tokens"] = out.cached_tokens
                if out.finished:
                    r["finish_reason"] = out.finish_reason
        return [results[i] for i in ids]


class _MasksAfter:
    """Sampling that needs the previous step's tokens (grammar masks, penalties over the history),
    for a step queued while that one is in flight: called by the runner between the forward and
    sampling, it reads the previous step back (its tokens advance the grammars and fill the
    histories) and computes the masks on the host while the device runs the forward. Called
    once; a retried step (`_run_isolating`) gets the same masks."""

    def __init__(self, engine: LLMEngine, prev: _Step, constrained: list):
        self.engine, self.prev, self.constrained, self.masks = engine, prev, constrained, None

    def __call__(self) -> dict:
        if self.masks is None:
            from .structured import next_masks

            if self.prev.outputs is None:
                self.engine._finish_step(self.prev)
            # a request that ended on the previous token samples one more, which is dropped: no mask
            live = [(rid, c) for rid, c in self.constrained if rid in self.engine._requests]
            self.masks = dict(zip((rid for rid, _ in live), next_masks([c for _, c in live])))
        return self.masks


def _find_stop(text: str, stops: list[str], search_from: int) -> tuple[int, int] | None:
    """The first stop string in `text` from `search_from`: (where it starts, where it ends), the
    earliest, and of those starting there the first listed; None where none is."""
    hits = [(i, k) for k, s in enumerate(stops) if (i := text.find(s, search_from)) >= 0]
    if not hits:
        return None
    i, k = min(hits)
    return i, i + len(stops[k])


def cache_keys(prompt: ProcessedPrompt, pad_ids: tuple[int, ...]) -> list:
    """Prefix-cache identity of each prompt token: its id, or (media hash, index) for media pads.

    Pads whose media identity is unknown get keys unique to this request: never shared.
    """
    keys: list = list(prompt.prompt_ids)
    media = iter(prompt.media)
    current, left, k = None, 0, 0
    unknown = object()
    for i, tok in enumerate(prompt.prompt_ids):
        if tok in pad_ids:
            if left == 0:
                current = next(media, None)
                left, k = (current.num_tokens, 0) if current is not None else (1, 0)
            keys[i] = (current.content_hash, k) if current is not None else (unknown, i)
            k += 1
            left -= 1
    return keys
