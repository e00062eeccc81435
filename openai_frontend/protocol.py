"""OpenAI chat-completions request checking and response shapes (plain dicts, OpenAI's field names)."""

from __future__ import annotations

import json
import logging
import time
import uuid

from qwen3vl_backend.processing.chat import RequestError, normalize_messages
from qwen3vl_backend.sampling_params import SAMPLING_FIELDS, SamplingError, SamplingParams

log = logging.getLogger("openai_frontend")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# OpenAI chat fields this server does not implement yet, with the values that mean "not used":
# a request that uses one is refused naming it, never served as if it had not asked.
UNSUPPORTED = {
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "n": lambda v: v in (None, 1),
    "best_of": lambda v: v in (None, 1),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "chat_template_kwargs": lambda v: v in (None, {}),
}


def from_triton(message: str, client_error: bool, request_id: str = "", unavailable: bool = False) -> APIError:
    """A Triton-side failure as an OpenAI error: 400 with its message for what the client sent;
    503 while the model server is down or restarting; otherwise 500 without the server's detail
    (it is logged with the request id, which the client gets to quote)."""
    if client_error:
        return APIError(400, message)
    log.error("request %s failed in Triton: %s", request_id, message)
    if unavailable:
        return APIError(503, f"the model server is unavailable or restarting; retry shortly (request id "
                             f"{request_id})", "service_unavailable")
    return APIError(500, f"internal server error (request id {request_id})", "internal_error")


def check_chat_request(body, served_model: str, mm_limits: dict[str, int]) -> tuple[dict, bool, bool]:
    """-> (sampling dict, stream, include_usage); raises APIError."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise APIError(404, f"The model '{model}' does not exist. This server serves '{served_model}'.",
                       param="model", code="model_not_found")
    if "messages" not in body:
        raise APIError(400, "'messages' is required", param="messages")
    for name, unused in UNSUPPORTED.items():
        if name in body and not _safe_check(unused, body[name]):
            raise APIError(400, f"'{name}' is not supported by this server yet (value {_short(body[name])})",
                           param=name, code="unsupported_parameter")
    try:
        _, refs = normalize_messages(body["messages"])
    except RequestError as e:
        raise APIError(400, str(e), param="messages") from e
    for kind, limit in mm_limits.items():
        n = sum(r.kind == kind for r in refs)
        if n > limit:
            raise APIError(400, f"{n} {kind}s in one request; this server takes at most {limit} "
                                "(--limit-mm-per-prompt)", param="messages")
    sampling = {k: body[k] for k in SAMPLING_FIELDS if k in body and body[k] is not None}
    try:
        SamplingParams.from_dict(sampling)
    except SamplingError as e:
        raise APIError(400, str(e)) from e
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    if opts.get("continuous_usage_stats"):
        raise APIError(400, "'stream_options.continuous_usage_stats' is not supported by this server yet",
                       param="stream_options", code="unsupported_parameter")
    return sampling, stream, bool(opts.get("include_usage"))


def _safe_check(fn, value) -> bool:
    try:
        return bool(fn(value))
    except TypeError:              # an unhashable or odd value: not the "unused" one
        return False


def _short(v) -> str:
    text = json.dumps(v, ensure_ascii=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt: int, completion: int, cached: int | None, report_cache: bool) -> dict:
    u = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if report_cache:
        u["prompt_tokens_details"] = {"cached_tokens": cached or 0}
    return u


def chat_completion(cid: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, usage_: dict | None = None,
          choices: bool = True) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}] if choices else []}
    if usage_ is not None:
        out["usage"] = usage_
    return out
