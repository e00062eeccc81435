"""OpenAI chat-completions request checking and response shapes (plain dicts, OpenAI's field names)."""

from __future__ import annotations

import base64
import mimetypes
import time
import uuid

from qwen3vl_backend.processing.chat import RequestError, normalize_messages
from qwen3vl_backend.processing.media import MediaError, MediaPolicy, fetch_bytes
from qwen3vl_backend.sampling_params import SAMPLING_FIELDS, SamplingError, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_triton(message: str, client_error: bool) -> APIError:
    """A Triton-side failure as an OpenAI error: 400 for what the client sent, 500 otherwise."""
    if client_error:
        return APIError(400, message)
    return APIError(500, message, "internal_error")


def check_chat_request(body, served_model: str, policy: MediaPolicy) -> tuple[list[dict], dict, bool, bool]:
    """-> (messages with local files inlined, sampling dict, stream, include_usage); raises APIError."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise APIError(404, f"The model '{model}' does not exist. This server serves '{served_model}'.",
                       param="model", code="model_not_found")
    if "messages" not in body:
        raise APIError(400, "'messages' is required", param="messages")
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "n > 1 is not supported: send separate requests", param="n")
    try:
        normalize_messages(body["messages"])
    except RequestError as e:
        raise APIError(400, str(e), param="messages") from e
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
    return _inline_local_media(body["messages"], policy), sampling, stream, bool(opts.get("include_usage"))


def _inline_local_media(messages: list[dict], policy: MediaPolicy) -> list[dict]:
    """Local paths become data: URIs here, after the allow-list check, so Triton never reads our disk.
    Returns `messages` itself when there was nothing to inline (the caller may then forward the
    request's own bytes instead of encoding it again)."""
    out, changed = [], False
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = [_inline_part(p, policy) for p in content]
            changed |= any(a is not b for a, b in zip(parts, content))
            content = parts
        out.append({**m, "content": content})
    return out if changed else messages


def _inline_part(part: dict, policy: MediaPolicy) -> dict:
    for key in ("image_url", "video_url"):
        if key not in part:
            continue
        value = part[key]
        url = value.get("url") if isinstance(value, dict) else value
        if isinstance(url, str) and (url.startswith(("/", "./", "file://"))):
            try:
                data = fetch_bytes(url, policy)
            except MediaError as e:
                raise APIError(400, str(e), param="messages") from e
            mime = mimetypes.guess_type(url)[0] or "application/octet-stream"
            uri = f"data:{mime};base64," + base64.b64encode(data).decode()
            value = {**value, "url": uri} if isinstance(value, dict) else uri
            return {**part, key: value}
    return part


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
