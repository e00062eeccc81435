"""Structured output engines on this host's CPU: grammar compile time and the per-step cost of
the token masks at batch 1 and 64, with Qwen3-VL's vocabulary (151,936 ids).

    python -m benchmarks.grammar --model-dir DIR [--engines llguidance,xgrammar] [--out DIR]

The masks are computed on the host each decode step (engine/structured.py); this is the time a
step of that batch spends on them. xgrammar is measured when installed (it is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from qwen3vl_backend.processing.tokenizer import Tokenizer

from .common import print_table, write_result

VOCAB = 151936
SCHEMAS = {
    "weather (2 fields)": ({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city", "days"], "additionalProperties": False},
                           '{"city":"Oslo and its surroundings","days":3}'),
    "order (nested, 9 fields)": ({"type": "object", "properties": {
        "id": {"type": "string"}, "customer": {"type": "object", "properties": {
            "name": {"type": "string"}, "email": {"type": "string"}}, "required": ["name", "email"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
            "required": ["sku", "qty", "price"]}},
        "total": {"type": "number"}, "paid": {"type": "boolean"}}, "required": ["id", "customer", "items", "total", "paid"]},
        '{"id":"A-17","customer":{"name":"Ada","email":"ada@example.com"},"items":[{"sku":"x1","qty":2,"price":3.5},'
        '{"sku":"y2","qty":1,"price":10}],"total":17,"paid":true}'),
}


def _llguidance(model_dir: Path, eos: list[int]):
    import llguidance
    from llguidance.numpy import fill_next_token_bitmask_par

    tok = llguidance.LLTokenizer((model_dir / "tokenizer.json").read_text(encoding="utf-8"), n_vocab=VOCAB, eos_token=eos)
    executor = llguidance.LLExecutor()

    def compile_(schema):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        return lambda: llguidance.LLMatcher(tok, grammar, log_level=0)

    def masks(matchers, bitmask):
        fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def consume(m, t):
        assert m.consume_token(t), m.get_error()
    return compile_, masks, consume, lambda n: np.full((n, (VOCAB + 31) // 32), -1, dtype=np.int32)


def _xgrammar(model_dir: Path, eos: list[int]):
    import transformers
    import xgrammar as xgr

    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile_(schema):
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        return lambda: xgr.GrammarMatcher(compiled)

    def masks(matchers, bitmask):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def consume(m, t):
        assert m.accept_token(t)
    return compile_, masks, consume, lambda n: xgr.allocate_token_bitmask(n, VOCAB)


def measure(name: str, engine, tokenizer: Tokenizer) -> list[dict]:
    compile_, masks, consume, alloc = engine
    rows = []
    for label, (schema, answer) in SCHEMAS.items():
        t = time.perf_counter()
        make = compile_(schema)
        make()                       # llguidance builds its parser with the first matcher
        compile_ms = (time.perf_counter() - t) * 1e3
        ids = tokenizer.encode(answer)
        for batch in (1, 64):
            matchers = [make() for _ in range(batch)]
            bitmask = alloc(batch)
            times = []
            for tid in ids:
                t = time.perf_counter()
                masks(matchers, bitmask)
                for m in matchers:
                    consume(m, tid)
                times.append(time.perf_counter() - t)
            rows.append({"engine": name, "schema": label, "compile_ms": compile_ms, "batch": batch, "steps": len(ids),
                         "mask_ms_per_step_mean": float(np.mean(times)) * 1e3,
                         "mask_ms_per_step_p99": float(np.percentile(times, 99)) * 1e3})
    return rows


def _size_mb(package: str) -> float | None:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="a checkpoint dir with the Qwen tokenizer.json")
    ap.add_argument("--engines", default="llguidance,xgrammar")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model_dir = Path(args.model_dir)
    tokenizer = Tokenizer(model_dir)
    rows = []
    for name in args.engines.split(","):
        try:
            engine = {"llguidance": _llguidance, "xgrammar": _xgrammar}[name](model_dir, list(tokenizer.eos_token_ids))
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        rows += measure(name, engine, tokenizer)
    print_table(rows, list(rows[0]))
    sizes = {p: _size_mb(p) for p in ("llguidance", "xgrammar", "tvm_ffi", "transformers", "triton")}
    print("installed size MB:", json.dumps(sizes))
    print(write_result("grammar", {"vocab": VOCAB, "cpu_count": os.cpu_count(), "installed_mb": sizes,
                                   "device": "host CPU"}, rows, args.out))


if __name__ == "__main__":
    main()
