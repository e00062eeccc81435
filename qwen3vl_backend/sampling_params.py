"""Per-request sampling parameters, validated once where the request enters.

Every number must be finite and inside a documented range, so that no request can make the
sampler divide by zero or overflow a tensor and fail the batch it shares:

| field | range |
| --- | --- |
| `max_tokens` | 1 .. 2**31 - 1 (the engine also refuses more than its context) |
| `temperature` | 0 .. 100; below 1e-5 it means greedy |
| `top_p` | (0, 1] (the most likely token is always kept) |
| `top_k` | -1 or 0 (off), or positive; clamped to the vocabulary by the engine |
| `min_p` | 0 .. 1 |
| `seed` | -2**63 .. 2**64 - 1 |
| `stop` | up to 32 non-empty strings of at most 1024 characters |
| `stop_token_ids` | up to 256 ids (the engine checks them against the vocabulary) |
| `min_tokens` | 0 .. max_tokens |
| `repetition_penalty` | 0.01 .. 10 |
| `presence_penalty`, `frequency_penalty` | -2 .. 2 |

A request's unset fields (absent, or null) take the server's sampling defaults where it has them:
with `--sampling-defaults model` (the default, as SGLang's; vLLM's `--generation-config auto`)
the checkpoint's generation_config.json recommendations for GENERATION_FIELDS (Qwen3-VL's:
temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.0); with `openai`, the table's
dataclass defaults below (temperature 1, no filter).

Requests from the OpenAI adapter must carry JSON types. Triton clients (genai-perf, perf_analyzer)
send every value of `sampling_parameters` as a string, as vllm_backend accepts; `from_dict(...,
coerce_strings=True)` converts those to each field's type first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

# request-body fields that are sampling parameters (OpenAI names included)
SAMPLING_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                   "stop", "stop_token_ids", "ignore_eos", "min_tokens", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "skip_special_tokens", "include_stop_str_in_output",
                   "logit_bias")

# generation_config.json's fields that are sampling defaults (vLLM's and SGLang's list)
GENERATION_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

GREEDY_BELOW = 1e-5
MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 32, 1024, 256
MAX_LOGIT_BIAS = 300         # token ids a request may bias (OpenAI's values: -100 to 100)
_MAX_INT32 = 2**31 - 1
MAX_LOGPROBS = 20


class SamplingError(ValueError):
    """A sampling parameter the client got wrong (HTTP 400)."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False   # a matched stop string ends the text, not cut from it (vLLM's)
    logprobs: int | None = None    # each output token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None     # each prompt token's logprob (after the first) and its top alternatives
    structured_output: dict | None = None   # {json_schema | json_object | regex | grammar | choice: ...} (engine/structured.py)
    # OpenAI's: token id -> a value added to its logit before sampling (-100 bans it, 100 forces
    # it); JSON's string keys become ints. Logprobs stay the model's own.
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(_is_int(self.max_tokens) and 0 < self.max_tokens <= _MAX_INT32,
               f"max_tokens must be a positive integer below 2**31, got {_short(self.max_tokens)}")
        _check(_is_num(self.temperature) and 0 <= self.temperature <= 100,
               f"temperature must be in [0, 100], got {_short(self.temperature)}")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0                     # 1/t would overflow: it is greedy in all but name
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {_short(self.top_p)}")
        _check(_is_int(self.top_k) and self.top_k >= -1,
               f"top_k must be -1, 0 or a positive integer, got {_short(self.top_k)}")
        if self.top_k > _MAX_INT32:
            self.top_k = 0                             # larger than any vocabulary: no cut
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {_short(self.min_p)}")
        _check(self.structured_output is None or isinstance(self.structured_output, dict),
               f"structured_output must be an object, got {_short(self.structured_output)}")
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {_short(self.prompt_logprobs)}")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs (top alternatives) must be an integer in [0, {MAX_LOGPROBS}], got {_short(self.logprobs)}")
        _check(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**64),
               f"seed must be an integer in [-2**63, 2**64), got {_short(self.seed)}")
        _check(isinstance(self.stop, list) and len(self.stop) <= MAX_STOP_STRINGS
               and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS and _utf8(s) for s in self.stop),
               f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, "
               f"each at most {MAX_STOP_CHARS} characters of valid text")
        _check(isinstance(self.stop_token_ids, list) and len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS
               and all(_is_int(t) and 0 <= t <= _MAX_INT32 for t in self.stop_token_ids),
               f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens, f"min_tokens must be >= 0, got {_short(self.min_tokens)}")
        _check(self.min_tokens <= self.max_tokens, "min_tokens must not exceed max_tokens")
        _check(_is_num(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 10,
               f"repetition_penalty must be in [0.01, 10], got {_short(self.repetition_penalty)}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_num(v) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {_short(v)}")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos must be a boolean")
        _check(isinstance(self.skip_special_tokens, bool), "skip_special_tokens must be a boolean")
        _check(isinstance(self.include_stop_str_in_output, bool), "include_stop_str_in_output must be a boolean")
        if self.logit_bias is not None:
            self.logit_bias = _checked_bias(self.logit_bias) or None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, d: dict | None, coerce_strings: bool = False, defaults: dict | None = None) -> "SamplingParams":
        """Fields by name (None means unset; `max_completion_tokens` is OpenAI's `max_tokens`).
        `coerce_strings`: string values are converted to the field's type first (Triton clients).
        `defaults`: values for the fields `d` leaves unset (the server's sampling defaults)."""
        d = dict(d or {})
        for k, v in (defaults or {}).items():
            if d.get(k) is None:
                d[k] = v
        if "max_completion_tokens" in d and d.get("max_completion_tokens") is not None:
            d["max_tokens"] = d.pop("max_completion_tokens")
        d.pop("max_completion_tokens", None)
        types = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - set(types))
        if unknown:
            raise SamplingError(f"unknown sampling parameters: {unknown}")
        if coerce_strings:
            d = {k: _coerce(k, v, types[k]) for k, v in d.items()}
        return cls(**{k: v for k, v in d.items() if v is not None})


def _coerce(name: str, value, kind: str):
    """'32' -> 32 for an int field, '0.5' -> 0.5, 'true'/'false' for booleans; other values as they are."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if kind.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise SamplingError(f"{name} must be a {kind.split(' ')[0]}, got {_short(value)}") from None
    return value


def _checked_bias(bias) -> dict[int, float]:
    """logit_bias with int keys; SamplingError unless each key is a token id (an int, or its
    decimal string as JSON writes it) and each value a number in [-100, 100]."""
    message = (f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids (as integers or decimal strings) to "
               "numbers in [-100, 100]")
    _check(isinstance(bias, dict) and len(bias) <= MAX_LOGIT_BIAS, message)
    out = {}
    for key, value in bias.items():
        ok_key = _is_int(key) or (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10)
        _check(ok_key and 0 <= int(key) <= _MAX_INT32 and _is_num(value) and -100 <= value <= 100, message)
        out[int(key)] = float(value)
    return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SamplingError(message)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:           # a lone surrogate from a JSON \ud800 escape
        return False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def generation_defaults(model_dir) -> dict:
    """The checkpoint's generation_config.json values for GENERATION_FIELDS ({} without the file):
    the sampling defaults of `--sampling-defaults model`. ValueError where the file is not JSON or
    a value is out of its range (a broken checkpoint must not fail every request)."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    out = {k: cfg[k] for k in GENERATION_FIELDS if isinstance(cfg, dict) and cfg.get(k) is not None}
    try:
        SamplingParams(**out)
    except SamplingError as e:
        raise ValueError(f"{path}: {e}") from None
    return out
