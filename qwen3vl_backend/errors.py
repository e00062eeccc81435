"""The errors a client can cause (each becomes an HTTP 400 / Triton INVALID_ARG), a setting's
error, and the one rule for prompt length shared by preprocess (before the ViT runs) and the engine."""

from __future__ import annotations


class RequestError(ValueError):
    """A problem with the request the client sent (maps to HTTP 400)."""


class ConfigError(ValueError):
    """A server setting (flag, config.pbtxt parameter) that cannot work."""


class PromptTooLongError(RequestError):
    pass


def check_prompt_length(n: int, max_model_len: int) -> None:
    if n >= max_model_len:
        raise PromptTooLongError(f"prompt of {n} tokens does not fit the context of "
                                 f"{max_model_len} tokens (at least one token must be generated)")
