"""SGLang's native `/generate`, for the scripts and frameworks written against it.

The request (SGLang's GenerateReqInput, the fields this server can honour): `text` (a prompt with
the chat template already applied, or a list of them) or `input_ids` (a list of ids, or of lists),
`image_data` (a source, or a list, per prompt: URLs or base64, as the OpenAI path takes them),
`sampling_params` (one object, or one per prompt) in SGLang's names, `stream`, `return_logprob`
with `top_logprobs_num`, `rid`. Fields that would change the answer and are not served here
(`input_embeds`, prompt logprobs from `logprob_start_len`, LoRA, custom logit processors, ...) are
a 400 when set, never ignored.

The answer: `{"text", "meta_info": {"id", "finish_reason": {"type": ...}, "prompt_tokens",
"completion_tokens", "cached_tokens", "e2e_latency"}}` per prompt and sample (a list for a batch
or `n` > 1); streamed as SSE events whose `text` is the text so far, as SGLang streams it, with
`index` for a batch, then `data: [DONE]`.

Text-only prompts are tokenized here and go to `llm`; prompts with images go through the ensemble
as a plain `text_input` with the `image` input (preprocess adds one image's pads per image where
the text has none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qwen3vl_backend.sampling_params import SamplingError, SamplingParams

from .protocol import MAX_N, APIError, _check_body, _is_id, _short

# SGLang's sampling_params names -> the engine's SamplingParams names
SAMPLING_NAMES = {
    "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed",
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "stop": "stop",
    "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos", "skip_special_tokens": "skip_special_tokens",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "no_stop_trim": "include_stop_str_in_output", "logit_bias": "logit_bias",
}
SAMPLING_CONSTRAINTS = {"json_schema": "json_schema", "regex": "regex", "ebnf": "grammar"}
# accepted at their defaults only (anything else would change the answer)
SAMPLING_DEFAULTS = {"spaces_between_special_tokens": True, "custom_params": None, "structural_tag": None}
SAMPLING_IGNORED = {"stream_interval"}        # how often a stream sends: this server sends every token
DEFAULT_MAX_NEW_TOKENS = 128                  # SGLang's
# request fields that would change the answer: served only at SGLang's defaults
FIELD_DEFAULTS = {"input_embeds": None, "logprob_start_len": (None, -1), "token_ids_logprob": None,
                  "lora_path": None, "custom_logit_processor": None, "return_hidden_states": (None, False),
                  "session_params": None, "video_data": None, "audio_data": None}
MAX_JOBS = 4 * MAX_N


@dataclass
class GenerateJob:
    prompt: str | list[int]        # text (the template already applied) or token ids
    images: list[str]
    sampling: dict                 # the engine's names
    index: int                     # the answer's place: prompt-major, then sample


@dataclass
class GenerateRequest:
    jobs: list[GenerateJob]
    single: bool                   # one prompt and one sample: the answer is an object, not a list
    stream: bool
    logprobs: bool
    rid: str | None                # the client's, shown as meta_info.id (never Triton's request id)
    text_in_logprobs: bool = False


def check_generate_request(body, served_model: str) -> GenerateRequest:
    """SGLang's /generate body -> the jobs to run; APIError (400) for anything malformed or not served."""
    _check_body(body, served_model)
    for name, default in FIELD_DEFAULTS.items():
        allowed = default if isinstance(default, tuple) else (default,)
        if body.get(name) not in allowed:
            raise APIError(400, f"'{name}' is not supported by this server yet (value {_short(body[name])})",
                           param=name, code="unsupported_parameter")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise APIError(400, "/generate takes either 'text' or 'input_ids'", param="text")
    if text is not None:
        batch = isinstance(text, list)
        prompts = text if batch else [text]
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise APIError(400, "'text' must be a non-empty string or a non-empty list of them", param="text")
    else:
        batch = isinstance(ids, list) and bool(ids) and all(isinstance(p, list) for p in ids)
        prompts = ids if batch else [ids]
        if not all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompts):
            raise APIError(400, "'input_ids' must be a non-empty list of token ids, or a list of them",
                           param="input_ids")
    images = _per_prompt(body.get("image_data"), len(prompts), batch)
    if ids is not None and any(images):
        raise APIError(400, "image_data goes with 'text' (with the model's image pads, or none: one is added "
                            "per image); with 'input_ids' the pixels have no place", param="image_data")
    for p, imgs in zip(prompts, images):
        if imgs and isinstance(p, str) and p.lstrip().startswith("{"):
            raise APIError(400, "a prompt with images may not start with '{' (the ensemble reads such a "
                                "text_input as a JSON chat)", param="text")
    params = body.get("sampling_params")
    if params is None:
        params = {}
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    if len(per_prompt) != len(prompts) or not all(isinstance(p, dict) for p in per_prompt):
        raise APIError(400, "'sampling_params' must be an object, or a list of one per prompt", param="sampling_params")
    logprobs = body.get("return_logprob", False)
    top = body.get("top_logprobs_num", 0)
    if not isinstance(logprobs, bool):
        raise APIError(400, "'return_logprob' must be a boolean", param="return_logprob")
    if top is None:
        top = 0
    if not _is_id(top) or not 0 <= top <= 20:
        raise APIError(400, "'top_logprobs_num' must be an integer from 0 to 20", param="top_logprobs_num")
    stream, text_in = body.get("stream", False), body.get("return_text_in_logprobs", False)
    for name, value in (("stream", stream), ("return_text_in_logprobs", text_in)):
        if not isinstance(value, bool):
            raise APIError(400, f"'{name}' must be a boolean", param=name)
    rid = body.get("rid")
    if rid is not None and not (isinstance(rid, str) and 0 < len(rid) <= 128 and rid.isprintable()):
        raise APIError(400, "'rid' must be a string of at most 128 printable characters", param="rid")
    jobs = []
    for p, imgs, sp in zip(prompts, images, per_prompt):
        sampling, n = engine_sampling(sp)
        if logprobs:
            sampling["logprobs"] = top
        for k in range(n):
            seeded = {**sampling, "seed": (sampling["seed"] + k) % 2**64} if n > 1 and "seed" in sampling else sampling
            jobs.append(GenerateJob(p, imgs, seeded, len(jobs)))
    if len(jobs) > MAX_JOBS:
        raise APIError(400, f"at most {MAX_JOBS} prompts x samples a request, got {len(jobs)}", param="text")
    return GenerateRequest(jobs, single=not batch and len(jobs) == 1, stream=stream, logprobs=logprobs, rid=rid,
                           text_in_logprobs=text_in)


def engine_sampling(params: dict) -> tuple[dict, int]:
    """SGLang's sampling_params -> (the engine's sampling dict, n); 400 for an unknown or unserved
    key, or a value the engine's SamplingParams refuse."""
    out, n, constraint = {"max_tokens": DEFAULT_MAX_NEW_TOKENS}, 1, None
    for key, value in params.items():
        if value is None or key in SAMPLING_IGNORED:
            continue
        if key in SAMPLING_NAMES:
            out[SAMPLING_NAMES[key]] = value
        elif key in SAMPLING_CONSTRAINTS:
            if constraint is not None:
                raise APIError(400, "only one of json_schema, regex and ebnf may constrain the output",
                               param="sampling_params")
            constraint = {SAMPLING_CONSTRAINTS[key]: value}
        elif key == "n":
            if not _is_id(value) or not 1 <= value <= MAX_N:
                raise APIError(400, f"sampling_params.n must be an integer from 1 to {MAX_N}", param="sampling_params")
            n = value
        elif key in SAMPLING_DEFAULTS:
            if value != SAMPLING_DEFAULTS[key] and value != {}:
                raise APIError(400, f"sampling_params.{key} is not supported by this server yet (value "
                                    f"{_short(value)})", param="sampling_params", code="unsupported_parameter")
        else:
            raise APIError(400, f"unknown sampling_params key {key!r}", param="sampling_params")
    if constraint is not None:
        out["structured_output"] = constraint
    try:
        SamplingParams.from_dict(out)
    except SamplingError as e:         # said in the caller's names
        message = str(e)
        for theirs, ours in SAMPLING_NAMES.items():
            if theirs != ours:
                message = re.sub(rf"\b{ours}\b", theirs, message)
        raise APIError(400, message, param="sampling_params") from e
    return out, n


def _per_prompt(data, prompts: int, batch: bool) -> list[list[str]]:
    """image_data -> each prompt's sources: one prompt takes a source or a list of them; a batch
    takes one entry per prompt (a source, a list, or null)."""
    def sources(entry) -> list[str]:
        items = [] if entry is None else entry if isinstance(entry, list) else [entry]
        if not all(isinstance(s, str) and s for s in items):
            raise APIError(400, "image_data entries must be URLs, data URIs or base64 strings", param="image_data")
        return items
    if data is None:
        return [[] for _ in range(prompts)]
    if not batch:
        return [sources(data)]
    if not isinstance(data, list) or len(data) != prompts:
        raise APIError(400, "for a batch, image_data must have one entry per prompt", param="image_data")
    return [sources(entry) for entry in data]


def finish_reason(reason: str | None, completion_tokens: int) -> dict | None:
    """SGLang's finish_reason object (which stop matched is not known here)."""
    if reason is None:
        return None
    if reason == "length":
        return {"type": "length", "length": completion_tokens}
    return {"type": reason}


def logprob_entries(entries, text=None) -> tuple[list, list]:
    """(token id, logprob, top) entries -> SGLang's output_token_logprobs ([logprob, id, its text])
    and output_top_logprobs ([[logprob, id, its text], ...] per token); the text is null unless
    `text` (token id -> str) is given (return_text_in_logprobs)."""
    def one(tid, lp):
        return [lp, tid, None if text is None else text(tid)]
    return [one(tid, lp) for tid, lp, _ in entries], [[one(a, b) for a, b in top] for _, _, top in entries]
