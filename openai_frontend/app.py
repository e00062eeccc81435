"""OpenAI-compatible HTTP front for the Triton `qwen3vl` ensemble.

    python -m openai_frontend --triton-url localhost:8001 --served-model-name NAME [--port 8000]

`POST /v1/chat/completions` (SSE streaming or not), `GET /v1/models`, `GET /health` (200 only
when Triton's models are ready), `GET /metrics`. Requests are checked here first, so the common
mistakes come back as OpenAI error objects without a round trip; the rest comes from Triton.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from qwen3vl_backend.processing.media import MediaPolicy

from .protocol import APIError, check_chat_request, chat_completion, chunk, completion_id, from_triton, usage
from .triton_client import TritonLLMClient, TritonRequestError


@dataclass
class FrontendSettings:
    triton_url: str = "localhost:8001"
    triton_model: str = "qwen3vl"
    served_model_name: str = "qwen3-vl"
    allowed_local_media_path: str | None = None
    triton_metrics_url: str | None = None       # e.g. http://localhost:8002/metrics, appended to /metrics
    enable_cache_report: bool = False


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
    policy = MediaPolicy(allowed_local_dir=settings.allowed_local_media_path or None)
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

    @app.get("/health")
    async def health():
        ok = await client().ready()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

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
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from e
        messages, sampling, stream, include_usage = check_chat_request(body, settings.served_model_name, policy)
        cid, start = completion_id(), time.monotonic()
        # preprocess reads `messages` from a JSON object and takes sampling from its own input, so
        # the request's bytes go on as they came unless local media had to be inlined: a large
        # data URI is not encoded a second time
        text = raw if messages is body["messages"] else json.dumps({"messages": messages}).encode()
        deltas = client().stream(uuid.uuid4().hex, text, sampling)
        if not stream:
            return await _complete(deltas, cid, start)
        first = await _first(deltas)          # errors before any output still get a proper status code
        return StreamingResponse(_sse(first, deltas, cid, start, include_usage), media_type="text/event-stream")

    async def _first(deltas):
        try:
            return await deltas.__anext__()
        except TritonRequestError as e:
            raise from_triton(str(e), e.client_error) from e

    async def _complete(deltas, cid, start):
        text, last = "", await _first(deltas)
        first = time.monotonic()
        metrics.ttft.observe(first - start)
        text += last.text
        try:
            async for d in deltas:
                text, last = text + d.text, d
        except TritonRequestError as e:
            raise from_triton(str(e), e.client_error) from e
        metrics.finished(start, first, last.num_input_tokens or 0, last.num_output_tokens or 0)
        return _done(cid, text, last)

    def _done(cid, text, last):
        u = usage(last.num_input_tokens or 0, last.num_output_tokens or 0, last.num_cached_tokens,
                  settings.enable_cache_report)
        return chat_completion(cid, settings.served_model_name, text, last.finish_reason, u)

    async def _sse(first, deltas, cid, start, include_usage):
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
            yield _event(from_triton(str(e), e.client_error).body())
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


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
