"""Structured output: a grammar per request, enforced token by token with llguidance.

`SamplingParams.structured_output` names one constraint:

| key | the output is |
| --- | --- |
| `json_schema` | JSON valid under the schema (an object, or its JSON text) |
| `json_object` (true) | any JSON object |
| `regex` | a match of the regular expression |
| `grammar` | a sentence of a Lark grammar (llguidance's dialect, `%json{...}` too) or of a GBNF one (`root ::=`) |
| `choice` | exactly one of the listed strings |

Each step the engine asks the request's matcher for the tokens allowed next (a bitmask over the
vocabulary, computed on the host), the sampler masks the rest, and the sampled token is fed back
to the matcher. GBNF (vLLM's and SGLang's EBNF) is converted to Lark by llguidance's own
converter. Why llguidance (README, "Structured output"): no dependencies (xgrammar needs
torch, transformers, triton and tvm-ffi at run time), and the masks measured as cheap.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from ..device import device_tensor
from ..errors import RequestError

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
MAX_GRAMMAR_CHARS = 200_000
# JSON without free whitespace between tokens (a schema's own "x-guidance" options may allow it):
# a weak or unlucky model cannot spend its max_tokens on indentation
COMPACT = {"whitespace_flexible": False}


def grammar_for(spec) -> str:
    """A structured_output spec -> llguidance's grammar text; RequestError for a malformed spec."""
    import llguidance

    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise RequestError(f"structured_output must be one of {{{', '.join(KINDS)}: ...}}, got {_short(spec)}")
    kind, value = next(iter(spec.items()))
    try:
        size = len(json.dumps(value, default=str))
    except RecursionError:          # json's encoder and parser recurse per level
        raise RequestError(f"structured_output {kind} is nested too deeply") from None
    if size > MAX_GRAMMAR_CHARS:
        raise RequestError(f"structured_output {kind} is larger than {MAX_GRAMMAR_CHARS} characters")
    try:
        if kind == "json_schema":
            schema = json.loads(value) if isinstance(value, str) else value
            if not isinstance(schema, dict):
                raise RequestError("structured_output json_schema must be a JSON Schema object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=COMPACT)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(_text(value, kind))
        if kind == "grammar":       # Lark, or GBNF (`root ::= ...`: vLLM's and SGLang's EBNF) converted to it
            from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

            try:
                lark = any_to_lark(_text(value, kind))
            except GbnfToLarkError as e:
                raise ValueError(str(e)) from None
            return llguidance.LLMatcher.grammar_from_lark(lark)
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise RequestError("structured_output choice must be a non-empty list of strings")
        return llguidance.grammar_from("choice", json.dumps(value))
    except RequestError:            # the checks above: their own message
        raise
    except ValueError as e:
        raise RequestError(f"structured_output {kind} does not compile: {e}") from None
    except RecursionError:
        raise RequestError(f"structured_output {kind} is nested too deeply") from None


def _text(value, kind: str) -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(f"structured_output {kind} must be a non-empty string")
    return value


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str, vocab_size: int, eos: tuple[int, ...]):
    """llguidance's view of the checkpoint's tokenizer: read and built once per model (~1 s)."""
    import llguidance

    text = (Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8")      # not the locale's (ASCII in Triton)
    return llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos))


def warm_up(model_dir, vocab_size: int, eos_ids) -> None:
    """Build llguidance's tokenizer in the background (about a second), so that the first
    constrained request does not wait for it; nothing when llguidance is not installed."""
    import importlib.util
    import threading

    if importlib.util.find_spec("llguidance") is None or not (Path(model_dir) / "tokenizer.json").exists():
        return
    args = (str(model_dir), vocab_size, tuple(sorted(eos_ids)))
    threading.Thread(target=_tokenizer, args=args, name="llguidance-tokenizer", daemon=True).start()


class Constraint:
    """One request's matcher, and the mask of what it allows next."""

    def __init__(self, spec, model_dir: str | Path, vocab_size: int, eos_ids: list[int]):
        import llguidance

        grammar = grammar_for(spec)
        tok = _tokenizer(str(model_dir), vocab_size, tuple(sorted(eos_ids)))
        self.matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise RequestError(f"structured_output does not compile: {self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        # the first mask, computed once here too (~0.1 ms): a grammar that compiles but matches no
        # string (`{"$ref": "#"}`, a Lark start rule made only of itself, a regex of an empty
        # class) puts the matcher in error on it, which at the first step failed the admitted
        # request as the server's error (a 500)
        self.matcher.compute_bitmask()
        if self.matcher.is_error():
            raise RequestError("structured_output admits no output (the grammar matches no string)")

    def allowed(self) -> np.ndarray:
        """Bitmask (ceil(V / 32),) int32: bit t % 32 of word t // 32 set when token t may come next."""
        mask = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.int32)
        return mask[: self.words]

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


@functools.lru_cache(maxsize=1)
def _executor():
    import llguidance

    return llguidance.LLExecutor()


def next_masks(constraints: list[Constraint]) -> list[np.ndarray]:
    """Each constraint's allowed-next bitmask; several at once on llguidance's thread pool."""
    if len(constraints) < 2:
        return [c.allowed() for c in constraints]
    from llguidance.numpy import fill_next_token_bitmask_par

    words = max(c.words for c in constraints)
    out = np.full((len(constraints), words), -1, dtype=np.int32)
    fill_next_token_bitmask_par(_executor(), [(c.matcher, i) for i, c in enumerate(constraints)], out)
    return list(out)


def apply_masks(logits: torch.Tensor, rows: list[int], masks: list[np.ndarray]) -> torch.Tensor:
    """-> a float32 copy of logits (B, V), -inf wherever row rows[i]'s bitmask masks[i] has a 0 bit
    (one kernel on a GPU; the host's masks are queued from pinned memory, without a sync)."""
    out = logits.to(torch.float32, copy=True)
    if not rows:
        return out
    words = device_tensor(torch.from_numpy(np.stack(masks)), torch.int32, out.device)
    index = device_tensor(rows, torch.long, out.device)
    if out.is_cuda:
        from qwen3vl_kernels.bitmask import apply_token_bitmask_

        return apply_token_bitmask_(out, words, index)
    from qwen3vl_kernels.bitmask import apply_token_bitmask_reference_

    return apply_token_bitmask_reference_(out, words, index)
