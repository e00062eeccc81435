"""OpenAI chat-completions request checking and response shapes (plain dicts, OpenAI's field names)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from qwen3vl_backend.processing.chat import RequestError, check_prompt_end, check_template_extras, normalize_messages
from qwen3vl_backend.sampling_params import MAX_LOGPROBS, SAMPLING_FIELDS, SamplingError, SamplingParams

log = logging.getLogger("openai_frontend")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# vLLM's and SGLang's request fields that change the answer and are not served here: refused when
# set to anything but their default, rather than ignored (the answer would differ from what was asked)
ENGINE_EXTRAS_UNSUPPORTED = {
    "use_beam_search": lambda v: v in (None, False),
    "length_penalty": lambda v: v in (None, 1),
    "allowed_token_ids": lambda v: v in (None, []),
    "bad_words": lambda v: v in (None, []),
    "truncate_prompt_tokens": lambda v: v is None,
    "logits_processors": lambda v: v in (None, []),
    "return_tokens_as_token_ids": lambda v: v in (None, False),
    "spaces_between_special_tokens": lambda v: v in (None, True),
    "prompt_logprobs": lambda v: v is None,          # completions: `echo` with `logprobs` scores the prompt
    "lora_path": lambda v: v is None,
    "custom_logit_processor": lambda v: v is None,
    "return_hidden_states": lambda v: v in (None, False),
}
# OpenAI chat fields this server does not implement yet, with the values that mean "not used":
# a request that uses one is refused naming it, never served as if it had not asked.
UNSUPPORTED = {
    **ENGINE_EXTRAS_UNSUPPORTED,
    "chat_template": lambda v: v is None,             # a client's own Jinja: the checkpoint's template only
    "documents": lambda v: v in (None, []),
    "mm_processor_kwargs": lambda v: v in (None, {}),
    "echo": lambda v: v in (None, False),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none", "auto"),
    "best_of": lambda v: v in (None, 1),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
}
MAX_N = 16


@dataclass
class ChatRequest:
    sampling: dict
    stream: bool
    include_usage: bool
    continuous_usage: bool
    n: int = 1
    tools: list | None = None          # rendered for the model and its <tool_call> blocks parsed (tool_choice auto)
    parallel_tool_calls: bool = True
    template_kwargs: dict = field(default_factory=dict)
    add_generation_prompt: bool = True         # vLLM's: how the prompt ends (chat.check_prompt_end)
    continue_final_message: bool = False


def check_tools(body: dict) -> tuple[list | None, bool, dict | None]:
    """-> (tools to render and parse, parallel_tool_calls, the structured output that forces a
    call: tool_choice "required" or a named function); raises APIError."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise APIError(400, "'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    try:
        tools, _ = check_template_extras(tools, None)
    except RequestError as e:
        raise APIError(400, str(e), param="tools") from e
    if choice in (None, "none", "auto"):
        return (None if choice == "none" else tools), parallel, None
    if not tools:
        raise APIError(400, "tool_choice needs 'tools'", param="tool_choice")
    if choice == "required":
        return tools, parallel, {"grammar": tool_call_grammar(tools, parallel)}
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                            "{'name': ...}}", param="tool_choice")
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return tools, parallel, {"grammar": tool_call_grammar(named, False)}


def tool_call_grammar(tools: list, parallel: bool) -> str:
    """A Lark grammar (llguidance's) for the template's tool-call format: <tool_call> blocks whose
    JSON names one of `tools` and gives arguments valid under its parameters' schema; one block,
    or one or more when `parallel`."""
    schema = {"x-guidance": {"whitespace_flexible": False}, "anyOf": [
        {"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                          "arguments": t["function"].get("parameters") or {"type": "object"}},
         "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
    repeat = ' ("\\n" call)*' if parallel else ""
    return f'start: call{repeat}\ncall: <tool_call> "\\n" %json {json.dumps(schema)} "\\n" </tool_call>\n'


def check_response_format(value) -> dict | None:
    """OpenAI's response_format -> the engine's structured_output (None: free text)."""
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format")
        return {"json_schema": schema}
    raise APIError(400, "response_format type must be text, json_object or json_schema", param="response_format")


# vLLM's and SGLang's own request fields that constrain the output (what their users send through
# an OpenAI client's extra_body), each read as one of the engine's structured_output kinds; a
# server that ignored them would answer unconstrained text as if it had obeyed
EXTRA_CONSTRAINTS = {
    "guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",   # vLLM before 0.11
    "guided_grammar": "grammar",
    "json_schema": "json_schema", "regex": "regex", "ebnf": "grammar",                   # SGLang
}
# vLLM's structured_outputs object: its keys that constrain, and those that only tune how (ignored:
# the engine's JSON is already without free whitespace, and it has one backend)
STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                      "json_object": "json_object"}
STRUCTURED_OUTPUTS_TUNING = {"disable_fallback", "disable_any_whitespace", "backend"}


def check_structured(body: dict) -> dict | None:
    """The one structured_output that response_format, vLLM's structured_outputs or guided_*
    fields, or SGLang's regex / json_schema / ebnf ask for (None: free text); 400 when more than
    one constrains the same request, or for what is not served (vLLM's structural_tag,
    whitespace_pattern, disable_additional_properties). The grammar itself is compiled by the
    engine, whose refusal is a 400 too."""
    found = []
    rf = check_response_format(body.get("response_format"))
    if rf is not None:
        found.append(("response_format", rf))
    for name, kind in EXTRA_CONSTRAINTS.items():
        if body.get(name) is not None:
            found.append((name, {kind: body[name]}))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise APIError(400, "'structured_outputs' must be an object", param="structured_outputs")
        for key, value in so.items():
            if value is None or value is False or key in STRUCTURED_OUTPUTS_TUNING:
                continue
            if key not in STRUCTURED_OUTPUTS:
                raise APIError(400, f"structured_outputs.{key} is not supported by this server (it takes "
                                    f"{', '.join(STRUCTURED_OUTPUTS)})", param="structured_outputs",
                               code="unsupported_parameter")
            found.append((f"structured_outputs.{key}", {STRUCTURED_OUTPUTS[key]: value}))
    if len(found) > 1:
        raise APIError(400, f"only one constraint on the output per request; got {found[0][0]} and "
                            f"{found[1][0]}", param=found[1][0].split(".")[0])
    return found[0][1] if found else None


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


def _check_body(body, served_model: str) -> None:
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise APIError(404, f"The model '{model}' does not exist. This server serves '{served_model}'.",
                       param="model", code="model_not_found")


def choice_sampling(sampling: dict, n: int, index: int) -> dict:
    """Choice `index` of n: with a seed, its own stream (seed + index), reproducible and distinct."""
    if n > 1 and isinstance(sampling.get("seed"), int):
        return {**sampling, "seed": (sampling["seed"] + index) % 2**64}
    return sampling


def check_chat_request(body, served_model: str, mm_limits: dict[str, int]) -> ChatRequest:
    """Raises APIError for anything malformed or not served."""
    _check_body(body, served_model)
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
    sampling = check_sampling(body)
    stream, include_usage, continuous = check_stream_options(body)
    n = check_n(body)
    tools, parallel, forced = check_tools(body)
    structured = check_structured(body)
    if forced is not None and structured is not None:
        raise APIError(400, "response_format and a forced tool_choice cannot both constrain the answer",
                       param="response_format")
    if forced or structured:
        sampling["structured_output"] = forced or structured
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs not in (None, True, False):
        raise APIError(400, "'logprobs' must be a boolean", param="logprobs")
    if top is not None:
        if not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS:
            raise APIError(400, f"'top_logprobs' must be an integer from 0 to {MAX_LOGPROBS}", param="top_logprobs")
    if logprobs:
        sampling["logprobs"] = top or 0
    try:
        _, kwargs = check_template_extras(None, body.get("chat_template_kwargs"))
    except RequestError as e:
        raise APIError(400, str(e), param="chat_template_kwargs") from e
    ends = body.get("add_generation_prompt", True), body.get("continue_final_message", False)
    try:
        check_prompt_end(*ends)
    except RequestError as e:
        raise APIError(400, str(e), param="continue_final_message") from e
    return ChatRequest(sampling, stream, include_usage, continuous, n, tools, parallel, kwargs, *ends)


def check_sampling(body: dict, defaults: dict | None = None) -> dict:
    """The body's sampling fields (None: unset), `defaults` for a max_tokens it leaves out; 400 if invalid."""
    sampling = {k: body[k] for k in SAMPLING_FIELDS if k in body and body[k] is not None}
    if body.get("no_stop_trim") is not None and "include_stop_str_in_output" not in sampling:
        sampling["include_stop_str_in_output"] = body["no_stop_trim"]      # SGLang's name for it
    if "max_tokens" not in sampling and "max_completion_tokens" not in sampling:
        sampling.update(defaults or {})
    try:
        SamplingParams.from_dict(sampling)
    except SamplingError as e:
        raise APIError(400, str(e)) from e
    return sampling


def check_n(body: dict, prompts: int | None = None) -> int:
    """`n` (1 to MAX_N choices; for completions' `prompts`, at most 4 x MAX_N in all)."""
    n = body.get("n", 1) if body.get("n") is not None else 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N or n * (prompts or 1) > 4 * MAX_N:
        more = f" (and n x prompts at most {4 * MAX_N})" if prompts is not None else ""
        raise APIError(400, f"'n' must be an integer from 1 to {MAX_N}{more}", param="n")
    return n


def check_stream_options(body: dict) -> tuple[bool, bool, bool]:
    """-> (stream, include_usage, continuous_usage_stats)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return stream, bool(opts.get("include_usage")), bool(opts.get("continuous_usage_stats"))


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


def chat_completion(cid: str, model: str, choices: list[tuple[dict, str]], usage_: dict) -> dict:
    """`choices`: (message fields, finish reason) per choice, in index order."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", **message}, "finish_reason": reason,
                         "logprobs": None} for i, (message, reason) in enumerate(choices)],
            "usage": usage_}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, usage_: dict | None = None,
          choices: bool = True, index: int = 0) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
           if choices else []}
    if usage_ is not None:
        out["usage"] = usage_
    return out


COMPLETIONS_UNSUPPORTED = {
    **ENGINE_EXTRAS_UNSUPPORTED,
    "suffix": lambda v: v in (None, ""),
    "best_of": lambda v: v in (None, 1),
}


@dataclass
class CompletionRequest:
    prompts: list                       # each a str or a list of token ids
    sampling: dict
    stream: bool
    include_usage: bool
    continuous_usage: bool
    n: int = 1
    echo: bool = False


def check_completion_request(body, served_model: str) -> CompletionRequest:
    """/v1/completions: `prompt` a string, a list of strings, a list of token ids or a list of those."""
    _check_body(body, served_model)
    for name, unused in COMPLETIONS_UNSUPPORTED.items():
        if name in body and not _safe_check(unused, body[name]):
            raise APIError(400, f"'{name}' is not supported by this server yet (value {_short(body[name])})",
                           param=name, code="unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (isinstance(p, list) and p and
                                                                          all(_is_id(t) for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of those",
                       param="prompt")
    if any(p == "" for p in prompts):
        raise APIError(400, "'prompt' is empty", param="prompt")
    sampling = check_sampling(body, {"max_tokens": 16})          # OpenAI's default for completions
    stream, include_usage, continuous = check_stream_options(body)
    n = check_n(body, len(prompts))
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise APIError(400, "'echo' must be a boolean", param="echo")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS}", param="logprobs")
        sampling["logprobs"] = logprobs
        if echo:                                        # the prompt's own logprobs too (loglikelihood evals)
            sampling["prompt_logprobs"] = logprobs
    structured = check_structured(body)
    if structured is not None:
        sampling["structured_output"] = structured
    return CompletionRequest(prompts, sampling, stream, include_usage, continuous, n, echo)


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def text_completion(cid: str, model: str, choices: list[tuple[str, str]], usage_: dict) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                        for i, (text, reason) in enumerate(choices)],
            "usage": usage_}


def text_chunk(cid: str, model: str, index: int, text: str, finish_reason: str | None = None,
               usage_: dict | None = None) -> dict:
    out = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


@dataclass
class TokenizeRequest:
    prompt: str | None                 # a plain prompt, or else a chat:
    messages: list | None
    tools: list | None
    template_kwargs: dict
    add_generation_prompt: bool
    continue_final_message: bool
    token_strs: bool


def check_tokenize_request(body, served_model: str) -> TokenizeRequest:
    """vLLM's /tokenize body: `prompt` (a string) or `messages`; 400 for anything else."""
    _check_body(body, served_model)
    for name in ("add_special_tokens", "return_token_strs"):
        if not isinstance(body.get(name, False), bool):
            raise APIError(400, f"'{name}' must be a boolean", param=name)
    if body.get("chat_template") is not None:
        raise APIError(400, "'chat_template' is not supported by this server yet", param="chat_template",
                       code="unsupported_parameter")
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise APIError(400, "/tokenize takes either 'prompt' (a string) or 'messages'", param="prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string", param="prompt")
    add_generation_prompt = body.get("add_generation_prompt", messages is not None)
    continue_final_message = body.get("continue_final_message", False)
    try:
        tools, kwargs = check_template_extras(body.get("tools"), body.get("chat_template_kwargs"))
        check_prompt_end(add_generation_prompt, continue_final_message)
    except RequestError as e:
        raise APIError(400, str(e)) from e
    return TokenizeRequest(prompt, messages, tools, kwargs, add_generation_prompt, continue_final_message,
                           body.get("return_token_strs", False))


def check_detokenize_request(body, served_model: str, vocab_size: int) -> list[int]:
    """vLLM's /detokenize body: `tokens`, ids of the vocabulary; 400 for anything else."""
    _check_body(body, served_model)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(_is_id(t) and 0 <= t < vocab_size for t in ids):
        raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab_size})", param="tokens")
    return ids
