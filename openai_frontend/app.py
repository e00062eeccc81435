"""OpenAI-compatible HTTP front for the Triton `qwen3vl` ensemble.

    python -m openai_frontend --triton-url localhost:8001 --served-model-name NAME [--port 8000]

`POST /v1/chat/completions` (SSE streaming or not), `GET /v1/models`, `GET /health` (200 only
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
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from qwen3vl_backend.errors import RequestError
from qwen3vl_backend.processing.media import Cancel, MediaPolicy, video_backend

from .media import MediaFetcher
from .text_prompts import TextPrompts

from .protocol import APIError, check_chat_request, chat_completion, chunk, completion_id, from_triton, usage
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


def create_app(settings: FrontendSettings) -> FastAPI:
    app = FastAPI(title="Qwen3-VL on Triton")
    fetcher = MediaFetcher(settings.media, settings.mm_max_concurrent_calls, settings.mm_per_request_timeout)
    prompts = TextPrompts(settings.model_path) if settings.model_path else None
    decoder = video_backend()
    log.info("video decoder: %s", decoder or "none (video requests are refused)")
    metrics = _Metrics()
    state: dict = {}

    def client() -> TritonLLMClient:
        if "client" not in state:
            state["client"] = TritonLLMClient(settings.triton_url, settings.triton_model)
        return state["client"]

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

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "qwen3vl-triton"}]}

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
        raw = await _read_body(request, settings.max_request_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from e
        sampling, stream, include_usage = check_chat_request(body, settings.served_model_name, settings.mm_limits)
        cid, start = completion_id(), time.monotonic()
        cancel = Cancel()
        try:
            messages = await _unless_gone(request, fetcher.inline(body["messages"], cancel))
        except RequestError as e:
            raise APIError(400, str(e), param="messages") from e
        if messages is None:
            return Response(status_code=499)
        ids = None
        if prompts is not None:
            try:
                ids = await asyncio.to_thread(prompts.ids, messages)
            except RequestError as e:
                raise APIError(400, str(e), param="messages") from e
        if ids is not None:
            deltas = client().stream_ids(rid, ids, sampling)
        else:
            # preprocess reads `messages` from a JSON object and takes sampling from its own input,
            # so the request's bytes go on as they came unless media had to be inlined: a large
            # data URI is not encoded a second time
            text = raw if messages is body["messages"] else json.dumps({"messages": messages}).encode()
            deltas = client().stream(rid, text, sampling)
        headers = {"x-request-id": rid}
        if not stream:
            return await _complete_unless_gone(request, deltas, cid, start, rid, headers)
        first = await _first(deltas, rid)     # errors before any output still get a proper status code
        return StreamingResponse(_sse(first, deltas, cid, start, include_usage, rid), media_type="text/event-stream",
                                 headers=headers)

    async def _first(deltas, rid):
        try:
            return await deltas.__anext__()
        except TritonRequestError as e:
            raise from_triton(str(e), e.client_error, rid, e.unavailable) from e

    async def _complete_unless_gone(request, deltas, cid, start, rid, headers):
        """The whole answer, or nothing once the client has gone: its request is then cancelled
        in Triton (closing `deltas` does that) instead of running to max_tokens for nobody."""
        try:
            body = await _unless_gone(request, _complete(deltas, cid, start, rid))
        finally:
            await deltas.aclose()
        if body is None:
            metrics.requests.labels("499").inc()
            return Response(status_code=499)
        return JSONResponse(body, headers=headers)

    async def _complete(deltas, cid, start, rid):
        text, last = "", await _first(deltas, rid)
        first = time.monotonic()
        metrics.ttft.observe(first - start)
        text += last.text
        try:
            async for d in deltas:
                text, last = text + d.text, d
        except TritonRequestError as e:
            raise from_triton(str(e), e.client_error, rid, e.unavailable) from e
        metrics.finished(start, first, last.num_input_tokens or 0, last.num_output_tokens or 0)
        return _done(cid, text, last)

    def _done(cid, text, last):
        u = usage(last.num_input_tokens or 0, last.num_output_tokens or 0, last.num_cached_tokens,
                  settings.enable_cache_report)
        return chat_completion(cid, settings.served_model_name, text, last.finish_reason, u)

    async def _sse(first, deltas, cid, start, include_usage, rid):
        model = settings.served_model_name
        first_at = time.monotonic()
        metrics.ttft.observe(first_at - start)
        yield _event(chunk(cid, model, {"role": "assistant", "content": ""}))
        last = first
        try:
            d = first
            while True:
                if d.text:
                    yield _event(chunk(cid, model, {"content": d.text}))
                last = d
                if d.finish_reason:
                    break
                d = await deltas.__anext__()
        except TritonRequestError as e:
            yield _event(from_triton(str(e), e.client_error, rid, e.unavailable).body())
            yield "data: [DONE]\n\n"
            return
        finally:
            await deltas.aclose()            # a no-op when done; cancels in Triton if the client left
        yield _event(chunk(cid, model, {}, last.finish_reason))
        if include_usage:
            u = usage(last.num_input_tokens or 0, last.num_output_tokens or 0, last.num_cached_tokens,
                      settings.enable_cache_report)
            yield _event(chunk(cid, model, {}, usage_=u, choices=False))
        metrics.finished(start, first_at, last.num_input_tokens or 0, last.num_output_tokens or 0)
        yield "data: [DONE]\n\n"

    @app.on_event("shutdown")
    async def _close():
        if "client" in state:
            await state["client"].close()

    return app


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
