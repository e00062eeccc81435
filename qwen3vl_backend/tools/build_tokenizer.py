"""Build the Qwen byte-level BPE `tokenizer.json` from the published tiktoken rank file.

The Qwen vocabulary ships as `qwen.tiktoken` (base64 token, rank per line) in the PyPI wheel
`dashscope`. Hugging Face's `tokenizers` wants a vocabulary plus an ordered merge list, so we
recover each merge by replaying BPE on the token's own bytes with only lower-ranked merges
allowed: what remains is exactly two parts, and joining them is the merge of that rank.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
from pathlib import Path

# Qwen2/Qwen3 pre-tokenizer pattern (from the published tokenizer facts).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (id, text, special) for every added token of the released tokenizer.
ADDED_TOKENS = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
]


def find_tiktoken_file() -> Path:
    """Locate `dashscope/resources/qwen.tiktoken` without importing dashscope (its deps are not ours)."""
    override = os.environ.get("QWEN_TIKTOKEN_FILE")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Qwen vocabulary is read from the PyPI wheel 'dashscope' "
            "(pip install --no-deps dashscope==2.0.2) or from $QWEN_TIKTOKEN_FILE"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table used by byte-level BPE.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_tokenizer_json(ranks: dict[bytes, int]) -> dict:
    to_unicode = _byte_to_unicode()

    def encode(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {encode(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = _split_by_lower_ranks(tok, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token of rank {rank} is not the merge of two lower-ranked tokens")
        merges.append([encode(parts[0]), encode(parts[1])])
    added = [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for i, text, special in ADDED_TOKENS
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config() -> dict:
    """`tokenizer_config.json` as released (Qwen2Tokenizer, eos <|im_end|>, no bos)."""
    decoder = {
        str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": special}
        for i, text, special in ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for _, t, s in ADDED_TOKENS if s][1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(out_dir: Path, cache_dir: Path | None = None) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into out_dir (conversion cached)."""
    cache_dir = cache_dir or Path(os.environ.get("QWEN3VL_CACHE", Path.home() / ".cache" / "qwen3vl"))
    cached = cache_dir / "qwen_tokenizer.json"
    if not cached.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        data = build_tokenizer_json(load_ranks(find_tiktoken_file()))
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False))
        tmp.replace(cached)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_bytes(cached.read_bytes())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
