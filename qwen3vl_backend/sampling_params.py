"""Per-request sampling parameters, validated once where the request enters."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


# request-body fields that are sampling parameters (OpenAI names included)
SAMPLING_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                   "stop", "stop_token_ids", "ignore_eos", "min_tokens", "repetition_penalty",
                   "presence_penalty", "frequency_penalty")


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

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(_is_int(self.max_tokens) and self.max_tokens > 0, f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        _check(_is_num(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= -1, f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        _check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
               "stop must be a non-empty string or a list of them")
        _check(isinstance(self.stop_token_ids, list) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be a list of token ids")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        _check(self.min_tokens <= self.max_tokens, "min_tokens must not exceed max_tokens")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_num(v) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {v!r}")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos must be a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        d = dict(d or {})
        if "max_completion_tokens" in d and d.get("max_completion_tokens") is not None:
            d["max_tokens"] = d.pop("max_completion_tokens")
        d.pop("max_completion_tokens", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SamplingError(f"unknown sampling parameters: {unknown}")
        return cls(**{k: v for k, v in d.items() if v is not None})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SamplingError(message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
