"""OpenAI-compatible HTTP front for the Triton `qwen3vl` ensemble.

    python -m openai_frontend --triton-url localhost:8001 --served-model-name NAME [--port 8000]

`POST /v1/chat/completions` and `POST /v1/completions` (SSE streaming or not), `GET /v1/models`, `GET /health` (200 only
when Triton's models are ready), `GET /metrics`. Requests are checked here first, so the common
mistakes come back as OpenAI error objects without a round trip; the rest comes from Triton.
Remote and local media are fetched here (media.py); text-only chats go to `llm` directly
(text_prompts.py), the rest through the `qwen3vl` ensemble. A client that disconnects has its
request cancelled wherever it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qwen3vl_backend.errors import RequestError
from qwen3vl_backend.processing.media import Cancel, MediaPolicy, video_backend
from qwen3vl_backend.serving import json_body

from .media import MediaFetcher, split_media
from .text_prompts import TextPrompts

from .parsers import OutputParser, parse_whole
from .native import check_generate_request, logprob_entries
from .native import finish_reason as native_finish
from .protocol import (APIError, chat_completion, check_chat_request, check_completion_request,
                       check_detokenize_request, check_tokenize_request, choice_sampling, chunk,
                       completion_id, from_triton, text_chunk, text_completion, usage)
from .triton_client import TritonLLMClient, TritonRequestError

log = logging.getLogger("openai_frontend")


@dataclass
class FrontendSettings:
    triton_url: str = "localhost:8001"
    triton_model: str = "qwen3vl"
    served_model_name: str = "qwen3-vl"
    triton_metrics_url: str | None = None       # e.g. http://localhost:8002/metrics, appended to /metrics
    enable_cache_report: bool = False
    max_request_body_bytes: int = 96 * 2**20     # larger bodies: 413 before they are read whole
    media: MediaPolicy = MediaPolicy()            # http(s) and file:// media, fetched here
    mm_max_concurrent_calls: int = 32
    mm_per_request_timeout: float = 10.0
    mm_limits: dict = field(default_factory=lambda: {"image": 16, "video": 2})
    model_path: str | None = None                 # text-only chats then go to `llm` directly
    reasoning_parser: str | None = None           # qwen3: <think> ... </think> -> reasoning_content
    tool_call_parser: str | None = "qwen25"       # <tool_call> blocks -> tool_calls (requests with tools)
    max_model_len: int | None = None              # reported by /v1/models
    triton_shm_bytes: int = 256 * 2**20          # large inputs through shared memory where Triton is local (0: off)


class _BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than this server's {limit} byte limit "
                              "(--max-request-body-mb)", code="request_too_large")


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("openai_requests", "Chat requests by outcome", ["status"], registry=self.registry)
        self.prompt_tokens = Counter("openai_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.generation_tokens = Counter("openai_generation_tokens", "Generated tokens", registry=self.registry)
        self.ttft = Histogram("openai_time_to_first_token_seconds", "Time to first token", registry=self.registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10))
        self.e2e = Histogram("openai_e2e_request_latency_seconds", "End-to-end latency", registry=self.registry,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("openai_time_per_output_token_seconds", "Time per output token after the first",
                              registry=self.registry,
                              buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1))

    def finished(self, start: float, first: float, prompt_tokens: int, output_tokens: int) -> None:
        end = time.monotonic()
        self.requests.labels("200").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.e2e.observe(end - start)
        if output_tokens > 1:
            self.tpot.observe((end - first) / (output_tokens - 1))


def create_app(settings: FrontendSettings, client_factory=None) -> FastAPI:
    """`client_factory`: () -> the Triton client (tests hand in one with canned outputs)."""
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        if "client" in state:                  # shutdown: close the Triton connection
            await state["client"].close()

    app = FastAPI(title="Qwen3-VL on Triton", lifespan=lifespan)
    fetcher = MediaFetcher(settings.media, settings.mm_max_concurrent_calls, settings.mm_per_request_timeout)
    prompts = TextPrompts(settings.model_path) if settings.model_path else None
    decoder = video_backend()
    log.info("video decoder: %s", decoder or "none (video requests are refused)")
    metrics = _Metrics()

    def client() -> TritonLLMClient:
        if "client" not in state:
            state["client"] = (client_factory or (lambda: TritonLLMClient(
                settings.triton_url, settings.triton_model, shm_bytes=settings.triton_shm_bytes)))()
        return state["client"]

    def _shm(attr: str) -> float:
        shm = getattr(state.get("client"), "shm", None)
        return float(getattr(shm, attr)) if shm is not None else 0.0

    Gauge("openai_triton_shm_inputs", "Inputs sent to Triton through the shared-memory region since start",
          registry=metrics.registry).set_function(lambda: _shm("placed"))
    Gauge("openai_triton_shm_bytes_in_use", "Bytes of the shared-memory region held by requests in Triton",
          registry=metrics.registry).set_function(lambda: _shm("used_bytes"))

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        metrics.requests.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception):
        rid = request.headers.get("x-request-id", "")
        log.exception("unhandled error in %s %s (request id %s)", request.method, request.url.path, rid)
        metrics.requests.labels("500").inc()
        return JSONResponse(APIError(500, f"internal server error (request id {rid})", "internal_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        ok = await client().ready()
        return JSONResponse({"status": "ok" if ok else "unavailable", "video_decoder": decoder},
                            status_code=200 if ok else 503)

    @app.get("/health_generate")
    async def health_generate():
        """SGLang's: ready, and one token generated through `llm` within 20 s (the model itself
        answers, not only the server)."""
        if prompts is None or not await client().ready():
            return await health()
        deltas = client().stream_ids(f"health-{uuid.uuid4().hex}", prompts.tokenizer.encode("Hi"),
                                     {"max_tokens": 1, "temperature": 0})
        try:
            async with asyncio.timeout(20):
                ok = any([d.finish_reason async for d in deltas])
        except (TimeoutError, TritonRequestError):
            ok = False
        finally:
            await deltas.aclose()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/get_model_info")
    async def model_info():
        """SGLang's: what is served."""
        return {"model_path": settings.model_path, "tokenizer_path": settings.model_path,
                "served_model_name": settings.served_model_name, "is_generation": True,
                "max_model_len": settings.max_model_len}

    def model_card() -> dict:
        card = {"id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "qwen3vl-triton"}
        if settings.max_model_len:
            card["max_model_len"] = settings.max_model_len
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        """OpenAI's retrieve (`client.models.retrieve`): the served model's card, or a 404."""
        if model != settings.served_model_name:
            raise APIError(404, f"The model '{model}' does not exist. This server serves "
                                f"'{settings.served_model_name}'.", param="model", code="model_not_found")
        return model_card()

    async def _prompt_ids(p, what: str, param: str) -> list[int]:
        """A text prompt tokenized (off the event loop), or token ids checked against the vocabulary."""
        ids = await asyncio.to_thread(prompts.tokenizer.encode, p) if isinstance(p, str) else list(p)
        vocab = prompts.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"{what} must be in [0, {vocab})", param=param)
        return ids

    def _tokenizer_here():
        if prompts is None:
            raise APIError(501, "this adapter was started without --model-path: it has no tokenizer",
                           "not_implemented")
        return prompts

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's: a prompt's (`prompt`) or a text-only chat's (`messages`, with `tools`,
        `chat_template_kwargs`, `add_generation_prompt`, `continue_final_message`) token ids, their
        count and the context size; `return_token_strs` adds each token's string."""
        _, body = await _json_body(request, settings.max_request_body_bytes)
        text_prompts = _tokenizer_here()
        req = check_tokenize_request(body, settings.served_model_name)
        try:
            if req.prompt is not None:
                ids = await asyncio.to_thread(text_prompts.tokenizer.encode, req.prompt)
            else:
                ids, _ = await asyncio.to_thread(text_prompts.ids, req.messages, req.tools, req.template_kwargs,
                                                 req.add_generation_prompt, req.continue_final_message)
        except RequestError as e:
            raise APIError(400, str(e), param="messages") from e
        if ids is None:
            raise APIError(400, "/tokenize counts text-only chats: an image's or video's tokens depend on its size "
                                "after resizing (a chat's usage.prompt_tokens has them)", param="messages")
        strs = [text_prompts.tokenizer.id_to_token(t) for t in ids] if req.token_strs else None
        return {"count": len(ids), "max_model_len": settings.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """vLLM's: token ids -> their text (special tokens kept)."""
        _, body = await _json_body(request, settings.max_request_body_bytes)
        text_prompts = _tokenizer_here()
        ids = check_detokenize_request(body, settings.served_model_name, text_prompts.tokenizer.vocab_size)
        return {"prompt": await asyncio.to_thread(text_prompts.tokenizer.decode, ids, False)}

    @app.get("/metrics")
    async def prometheus():
        text = generate_latest(metrics.registry).decode()
        if settings.triton_metrics_url:
            try:
                async with httpx.AsyncClient(timeout=5) as h:
                    text += (await h.get(settings.triton_metrics_url)).text
            except httpx.HTTPError:
                text += "# triton metrics unavailable\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        rid = uuid.uuid4().hex
        timing = ServerTiming()
        raw = await _read_body(request, settings.max_request_body_bytes)
        timing.mark("read")
        body = await _parse_json(raw)
        req = check_chat_request(body, settings.served_model_name, settings.mm_limits)
        timing.mark("parse")
        cid, start = completion_id(), time.monotonic()
        cancel = Cancel()
        try:
            messages = await _unless_gone(request, fetcher.inline(body["messages"], cancel))
        except RequestError as e:
            raise APIError(400, str(e), param="messages") from e
        if messages is None:
            return Response(status_code=499)
        timing.mark("media")
        ids, thinking = None, False
        if prompts is not None:
            try:
                ids, thinking = await asyncio.to_thread(prompts.ids, messages, req.tools, req.template_kwargs,
                                                        req.add_generation_prompt, req.continue_final_message)
            except RequestError as e:
                raise APIError(400, str(e), param="messages") from e
            timing.mark("prompt")
        # preprocess reads `messages`, `tools`, `chat_template_kwargs` and how the prompt ends
        # (add_generation_prompt, continue_final_message) from a JSON object and takes
        # sampling from its own input. Media urls (data URIs by now) go as the `media` input, named
        # "media-input:N" in the JSON, so preprocess does not parse them again; without media the
        # request's bytes go on as they came unless they must change (tools dropped by tool_choice none)
        stripped, media = split_media(messages)
        same = not media and messages is body["messages"] and (req.tools or None) == (body.get("tools") or None)
        text = raw if same else json.dumps({"messages": stripped, "tools": req.tools,
                                            "chat_template_kwargs": req.template_kwargs,
                                            "add_generation_prompt": req.add_generation_prompt,
                                            "continue_final_message": req.continue_final_message}).encode()

        def open_stream(i: int):
            sampling = choice_sampling(req.sampling, req.n, i)
            sub = rid if req.n == 1 else f"{rid}-{i}"
            if ids is not None:
                return client().stream_ids(sub, ids, sampling)
            return client().stream(sub, text, sampling, media=media)

        def parser() -> OutputParser:
            return OutputParser(reasoning=settings.reasoning_parser == "qwen3", thinking_open=thinking,
                                tools=req.tools is not None and settings.tool_call_parser is not None,
                                parallel_tool_calls=req.parallel_tool_calls)

        streams = [open_stream(i) for i in range(req.n)]
        headers = {"x-request-id": rid}
        if not req.stream:
            return await _complete_unless_gone(request, streams, parser, cid, start, rid, headers,
                                               req.sampling.get("logprobs") is not None, timing)
        firsts = await _opened(streams, rid)     # errors before any output still get a proper status code
        timing.mark("first")
        headers["server-timing"] = timing.header()
        return StreamingResponse(_sse(firsts, streams, parser, req, cid, start, rid),
                                 media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        rid = uuid.uuid4().hex
        _, body = await _json_body(request, settings.max_request_body_bytes)
        req = check_completion_request(body, settings.served_model_name)
        if prompts is None:
            raise APIError(400, "/v1/completions needs the adapter started with --model-path (the launcher does)")
        cid, start = "cmpl-" + uuid.uuid4().hex, time.monotonic()
        jobs = []                            # (prompt ids, echo text) per choice, prompt-major as OpenAI orders them
        for p in req.prompts:
            ids = await _prompt_ids(p, "prompt token ids", "prompt")
            echo = (p if isinstance(p, str) else prompts.tokenizer.decode(ids)) if req.echo else ""
            jobs += [(ids, echo)] * req.n

        def open_stream(k: int, ids):
            sampling = choice_sampling(req.sampling, req.n, k % req.n)
            return client().stream_ids(f"{rid}-{k}" if len(jobs) > 1 else rid, ids, sampling)

        streams = [open_stream(k, ids) for k, (ids, _) in enumerate(jobs)]
        model, headers = settings.served_model_name, {"x-request-id": rid}
        want_logprobs = req.sampling.get("logprobs") is not None
        if not req.stream:
            async def whole():
                firsts = await _firsts(streams, rid)
                results = await asyncio.gather(*(_collect(d, rid, f) for d, f in zip(streams, firsts)))
                first = min(r[2] for r in results)
                metrics.ttft.observe(first - start)
                prompt_tokens = sum(len(ids) for ids, _ in jobs[:: req.n])
                out_tokens = sum(r[1].num_output_tokens or 0 for r in results)
                metrics.finished(start, first, prompt_tokens, out_tokens)
                body = text_completion(cid, model, [(echo + text, last.finish_reason)
                                                    for (_, echo), (text, last, _, _) in zip(jobs, results)],
                                       usage(prompt_tokens, out_tokens, None, False))
                if want_logprobs:
                    for choice, (ids, echo), f, (_, _, _, entries) in zip(body["choices"], jobs, firsts, results):
                        choice["logprobs"] = completion_logprobs(_echoed(ids, f) + entries if echo else entries, 0)[0]
                return body
            try:
                out = await _unless_gone(request, whole())
            finally:
                for d in streams:
                    await d.aclose()
            return Response(status_code=499) if out is None else JSONResponse(out, headers=headers)
        firsts = await _opened(streams, rid)

        first_at = time.monotonic()
        metrics.ttft.observe(first_at - start)

        async def sse():
            counts = [0] * len(streams)
            prompt_tokens = sum(len(ids) for ids, _ in jobs[:: req.n])

            def now():
                return usage(prompt_tokens, sum(counts), None, False) if req.continuous_usage else None
            offsets = [0] * len(streams)
            for k, (ids, echo) in enumerate(jobs):
                if echo:
                    out = text_chunk(cid, model, k, echo, usage_=now())
                    if want_logprobs:
                        out["choices"][0]["logprobs"], offsets[k] = completion_logprobs(_echoed(ids, firsts[k]), 0)
                    yield _event(out)
            try:
                async for k, d in _merged(firsts, streams):
                    counts[k] = d.num_output_tokens or counts[k]
                    if d.text or d.finish_reason or d.logprobs:
                        out = text_chunk(cid, model, k, d.text, d.finish_reason, now())
                        if want_logprobs:
                            out["choices"][0]["logprobs"], offsets[k] = completion_logprobs(d.logprobs or [], offsets[k])
                        yield _event(out)
            except TritonRequestError as e:
                yield _event(from_triton(str(e), e.client_error, rid, e.unavailable).body())
            else:
                if req.include_usage:
                    yield _event({"id": cid, "object": "text_completion", "created": int(time.time()),
                                  "model": model, "choices": [], "usage": usage(prompt_tokens, sum(counts), None, False)})
                metrics.finished(start, first_at, prompt_tokens, sum(counts))
            finally:
                for d in streams:
                    await d.aclose()
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    @app.post("/generate")
    async def generate(request: Request):
        """SGLang's native endpoint (native.py): prompts with the template applied, SGLang's
        sampling names, its answer and stream shapes."""
        _, body = await _json_body(request, settings.max_request_body_bytes)
        req = check_generate_request(body, settings.served_model_name)
        _tokenizer_here()                      # 501 without one: text prompts are tokenized here
        # Triton's request ids are ours, never the client's `rid` (answered as meta_info.id): a
        # cancel goes by request id, and a client that reused another's rid could end its request
        rid, shown = uuid.uuid4().hex, req.rid
        start = time.monotonic()
        prompt_ids = {}                        # a text-only prompt's ids, by prompt (the adapter tokenizes)
        for job in req.jobs:
            if not job.images and id(job.prompt) not in prompt_ids:
                prompt_ids[id(job.prompt)] = await _prompt_ids(job.prompt, "input_ids", "input_ids")

        def sub(job, base=rid):
            return base if len(req.jobs) == 1 else f"{base}-{job.index}"

        def open_stream(job):
            if job.images:
                return client().stream(sub(job), job.prompt.encode(), job.sampling, images=job.images)
            return client().stream_ids(sub(job), prompt_ids[id(job.prompt)], job.sampling)

        streams = [open_stream(job) for job in req.jobs]

        def answer(job, text, last, entries, count) -> dict:
            meta = {"id": sub(job, shown or rid), "finish_reason": native_finish(last.finish_reason, count),
                    "prompt_tokens": last.num_input_tokens or 0, "completion_tokens": count,
                    "cached_tokens": last.num_cached_tokens or 0, "e2e_latency": time.monotonic() - start}
            if req.logprobs:
                meta["output_token_logprobs"], meta["output_top_logprobs"] = logprob_entries(
                    entries, token_text if req.text_in_logprobs else None)
            return {"text": text, "meta_info": meta}

        if not req.stream:
            async def whole():        # all of it under _unless_gone: a client gone in the prefill cancels it
                firsts = await _firsts(streams, rid)
                results = await asyncio.gather(*(_collect(d, rid, f) for d, f in zip(streams, firsts)))
                first = min(r[2] for r in results)
                metrics.ttft.observe(first - start)
                out = [answer(job, text, last, entries, last.num_output_tokens or 0)
                       for job, (text, last, _, entries) in zip(req.jobs, results)]
                metrics.finished(start, first, sum(o["meta_info"]["prompt_tokens"] for o in out),
                                 sum(o["meta_info"]["completion_tokens"] for o in out))
                return out[0] if req.single else out
            try:
                out = await _unless_gone(request, whole())
            finally:
                for d in streams:
                    await d.aclose()
            return Response(status_code=499) if out is None else JSONResponse(out, headers={"x-request-id": rid})
        firsts = await _opened(streams, rid)
        first_at = time.monotonic()
        metrics.ttft.observe(first_at - start)

        async def sse():
            texts, counts = [""] * len(streams), [0] * len(streams)
            entries: list[list] = [[] for _ in streams]
            try:
                async for k, d in _merged(firsts, streams):
                    texts[k] += d.text
                    counts[k] = d.num_output_tokens or counts[k]
                    entries[k] += d.logprobs or []
                    if d.text or d.finish_reason:
                        out = answer(req.jobs[k], texts[k], d, entries[k], counts[k])
                        if not req.single:
                            out["index"] = k
                        yield _event(out)
            except TritonRequestError as e:
                yield _event(from_triton(str(e), e.client_error, rid, e.unavailable).body())
            else:
                metrics.finished(start, first_at, sum(f.num_input_tokens or 0 for f in firsts), sum(counts))
            finally:
                for d in streams:
                    await d.aclose()
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream", headers={"x-request-id": rid})

    async def _opened(streams, rid):
        """The streams' first deltas (_firsts) for a streamed answer; when one fails, every stream
        is closed (its request cancelled in Triton) before the error goes on."""
        try:
            return await _firsts(streams, rid)
        except BaseException:
            for d in streams:
                await d.aclose()
            raise

    async def _first(deltas, rid):
        try:
            return await deltas.__anext__()
        except TritonRequestError as e:
            raise from_triton(str(e), e.client_error, rid, e.unavailable) from e

    async def _firsts(streams, rid):
        """Each stream's first delta. The first stream goes alone: once it has a token its prompt's
        KV blocks are in the prefix cache, and the other choices (n > 1) reuse them instead of
        prefilling the same prompt again."""
        first = await _first(streams[0], rid)
        return [first, *await asyncio.gather(*(_first(d, rid) for d in streams[1:]))]

    async def _complete_unless_gone(request, streams, parser, cid, start, rid, headers, want_logprobs=False,
                                    timing=None):
        """The whole answer, or nothing once the client has gone: its request is then cancelled
        in Triton (closing the streams does that) instead of running to max_tokens for nobody."""
        try:
            body = await _unless_gone(request, _complete(streams, parser, cid, start, rid, want_logprobs))
        finally:
            for d in streams:
                await d.aclose()
        if body is None:
            metrics.requests.labels("499").inc()
            return Response(status_code=499)
        if timing is not None:
            timing.mark("generate")
            headers = {**headers, "server-timing": timing.header()}
        return JSONResponse(body, headers=headers)

    async def _collect(deltas, rid, last):
        """`last`: the stream's first Delta -> (the whole text, the last Delta, when the first
        came, the tokens' logprobs)."""
        text, first = "", time.monotonic()
        text, logprobs = text + last.text, list(last.logprobs or [])
        try:
            async for d in deltas:
                text, last = text + d.text, d
                logprobs += d.logprobs or []
        except TritonRequestError as e:
            raise from_triton(str(e), e.client_error, rid, e.unavailable) from e
        return text, last, first, logprobs

    def token_text(token_id: int) -> str:
        return prompts.tokenizer.decode([token_id], skip_special_tokens=False) if prompts else str(token_id)

    def completion_logprobs(entries, offset: int) -> tuple[dict, int]:
        """The completions API's `logprobs` object, and the text offset after its tokens. An entry's
        logprob may be None (the prompt's first token, which nothing predicts)."""
        tokens = [token_text(t) for t, _, _ in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {token_text(a): b for a, b in top} for _, _, top in entries],
                "text_offset": offsets}, offset

    def _echoed(prompt_ids, first) -> list:
        """The echoed prompt's entries: its first token without a logprob, then what the engine sent."""
        return [(prompt_ids[0], None, None), *(first.prompt_logprobs or [])]

    def chat_logprobs(entries) -> dict | None:
        """OpenAI's chat `logprobs` object for (token id, logprob, top) entries."""
        def one(tid, lp):
            t = token_text(tid)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
        return {"content": [{**one(tid, lp), "top_logprobs": [one(a, b) for a, b in top]} for tid, lp, top in entries],
                "refusal": None}

    async def _complete(streams, parser, cid, start, rid, want_logprobs=False):
        firsts = await _firsts(streams, rid)
        results = await asyncio.gather(*(_collect(d, rid, f) for d, f in zip(streams, firsts)))
        first = min(r[2] for r in results)
        metrics.ttft.observe(first - start)
        choices, out_tokens = [], 0
        logprobs = []
        for text, last, _, entries in results:
            p = parser()
            message = parse_whole(text, p.reasoning, p.thinking_open, p.tools, p.parallel_tool_calls)
            reason = "tool_calls" if message.get("tool_calls") and last.finish_reason == "stop" else last.finish_reason
            choices.append((message, reason))
            logprobs.append(chat_logprobs(entries) if want_logprobs else None)
            out_tokens += last.num_output_tokens or 0
        last = results[0][1]
        metrics.finished(start, first, last.num_input_tokens or 0, out_tokens)
        u = usage(last.num_input_tokens or 0, out_tokens, last.num_cached_tokens, settings.enable_cache_report)
        body = chat_completion(cid, settings.served_model_name, choices, u)
        for choice, lp in zip(body["choices"], logprobs):
            choice["logprobs"] = lp
        return body

    async def _sse(firsts, streams, parser, req, cid, start, rid):
        model = settings.served_model_name
        first_at = time.monotonic()
        metrics.ttft.observe(first_at - start)
        parsers = [parser() for _ in streams]
        counts = [0] * len(streams)
        prompt_tokens, cached = firsts[0].num_input_tokens or 0, firsts[0].num_cached_tokens

        def current_usage():
            return usage(prompt_tokens, sum(counts), cached, settings.enable_cache_report)

        pending = [[] for _ in streams]       # logprobs of tokens whose text has not gone out yet
        want_logprobs = req.sampling.get("logprobs") is not None

        def event(delta, index, reason=None):
            out = chunk(cid, model, delta, reason, index=index, usage_=current_usage() if req.continuous_usage else None)
            if want_logprobs and (pending[index] or reason):
                out["choices"][0]["logprobs"] = chat_logprobs(pending[index])
                pending[index] = []
            return _event(out)

        for i in range(len(streams)):
            yield event({"role": "assistant", "content": ""}, i)
        try:
            async for i, d in _merged(firsts, streams):
                counts[i] = d.num_output_tokens or counts[i]
                pending[i] += d.logprobs or []
                for delta in parsers[i].feed(d.text):
                    yield event(delta, i)
                if d.finish_reason:
                    for delta in parsers[i].finish():
                        yield event(delta, i)
                    reason = "tool_calls" if parsers[i].calls and d.finish_reason == "stop" else d.finish_reason
                    yield event({}, i, reason)
        except TritonRequestError as e:
            yield _event(from_triton(str(e), e.client_error, rid, e.unavailable).body())
            yield "data: [DONE]\n\n"
            return
        finally:
            for d in streams:
                await d.aclose()          # a no-op when done; cancels in Triton if the client left
        if req.include_usage:
            yield _event(chunk(cid, model, {}, usage_=current_usage(), choices=False))
        metrics.finished(start, first_at, prompt_tokens, sum(counts))
        yield "data: [DONE]\n\n"


    return app


async def _merged(firsts, streams):
    """(choice index, Delta) from several streams as they come, each stream's first given."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, first, deltas):
        try:
            await queue.put((i, first))
            if not first.finish_reason:
                async for d in deltas:
                    await queue.put((i, d))
                    if d.finish_reason:
                        break
        except TritonRequestError as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, f, d)) for i, (f, d) in enumerate(zip(firsts, streams))]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is done:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _unless_gone(request: Request, coro):
    """`await coro`, or None as soon as the HTTP client disconnects (the coroutine is cancelled
    first: a media fetch then shuts its sockets, a Triton stream sends its cancel)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class ServerTiming:
    """The adapter's own timestamps for one request, as a Server-Timing header (ms per phase:
    read the body, parse and check it, inline remote media, render the prompt, and from handing
    the request to Triton to its first token, or to the whole answer when not streaming). A
    client's TTFT minus their sum is HTTP and the client; `first` is the ensemble's share."""

    def __init__(self):
        self._last, self.phases = time.perf_counter(), []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases.append((name, (now - self._last) * 1e3))
        self._last = now

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.phases)


async def _json_body(request: Request, limit: int) -> tuple[bytes, object]:
    """-> (the body's bytes, its JSON); 400 when it is not JSON, 413 past `limit`."""
    raw = await _read_body(request, limit)
    return raw, await _parse_json(raw)


async def _parse_json(raw: bytes) -> object:
    try:
        if len(raw) < 2**18:
            return json.loads(raw)
        # a body with images (megabytes of data URIs) is parsed off the event loop, which meanwhile
        # keeps every other stream's tokens flowing; its long strings cut out first (json_body)
        return await asyncio.to_thread(json_body.loads, raw)
    except ValueError as e:         # JSONDecodeError, UnicodeDecodeError, and a number of 4300+ digits
        raise APIError(400, f"request body is not valid JSON: {e}") from e
    except RecursionError:          # Python's parser recurses per level: '[' * 100000 would be a 500
        raise APIError(400, "request body is not valid JSON: nested too deeply") from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (by its Content-Length, or while it
    streams in): a client cannot make the server hold more than the limit."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise _BodyTooLarge(limit)
    parts, total = [], 0
    async for part in request.stream():
        total += len(part)
        if total > limit:
            raise _BodyTooLarge(limit)
        parts.append(part)
    return b"".join(parts)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
