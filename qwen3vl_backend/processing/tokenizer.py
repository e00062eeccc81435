"""The checkpoint's `tokenizer.json` through HF `tokenizers` (no transformers at run time)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        file = model_dir / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        self._tok = _HFTokenizer.from_file(str(file))
        self.eos_token_ids = _eos_ids(model_dir, self)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True):
        """-> step(token_id) returning the text that token completes, or None while its bytes
        do not yet end a character (tokenizers' DecodeStream, in Rust)."""
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        return lambda token_id: stream.step(self._tok, token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


def _eos_ids(model_dir: Path, tok: Tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if not ids:
        cfg = model_dir / "tokenizer_config.json"
        name = json.loads(cfg.read_text()).get("eos_token") if cfg.exists() else "<|im_end|>"
        name = name["content"] if isinstance(name, dict) else name
        ids = [tok.token_to_id(name)]
    return tuple(int(i) for i in ids if i is not None)
