"""Incremental detokenisation that never splits a UTF-8 character and never drops a space.

Byte-level BPE tokens can end mid-character. tokenizers' DecodeStream (one Rust call per token)
returns the text each token completes and holds back bytes that do not yet end a character; the
tokens held back at the end are decoded on `flush`, an incomplete character as U+FFFD.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self._step = tokenizer.stream_decoder(skip_special_tokens)
        self._held: list[int] = []        # tokens since the last text the stream gave back
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes (possibly empty)."""
        delta = self._step(token_id)
        if delta is None:
            self._held.append(token_id)
            return ""
        self._held.clear()
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        delta = self.tok.decode(self._held, self.skip) if self._held else ""
        self._held.clear()
        self.text += delta
        return delta
