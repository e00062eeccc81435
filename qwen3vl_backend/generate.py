"""One-shot generation from the command line: the stable interface for checking the model.

    python -m qwen3vl_backend.generate --model-path DIR --request REQUEST.json [--max-tokens N]
        [--device cpu|cuda] [--dtype float32|bfloat16]

REQUEST.json is an OpenAI chat-completions body (`messages` with text, `image_url` and
`video_url` parts as data: URIs, http(s) URLs or local paths; `temperature` 0 is greedy).
Prints one JSON object: prompt_token_ids, output_token_ids, text, finish_reason.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .processing.chat import RequestError
from .processing.processor import Processor
from .sampling_params import SAMPLING_FIELDS, SamplingParams



def run(model_path: str, request: dict, max_tokens: int | None = None, device: str = "auto",
        dtype: str = "auto", engine: LLMEngine | None = None, **engine_settings) -> dict:
    if not isinstance(request, dict) or "messages" not in request:
        raise RequestError("the request needs 'messages'")
    own = engine is None
    engine = engine or LLMEngine(EngineConfig(model_path=model_path, device=device, dtype=dtype, **engine_settings))
    try:
        return _generate(engine, model_path, request, max_tokens)
    finally:
        if own:
            engine.close()


def _generate(engine: LLMEngine, model_path: str, request: dict, max_tokens: int | None) -> dict:
    processor = Processor(model_path, engine.tokenizer)
    prompt = processor.process_messages(request["messages"])
    sp = {k: request[k] for k in SAMPLING_FIELDS if k in request}
    if max_tokens is not None:
        sp["max_tokens"] = max_tokens
    [result] = engine.generate([prompt], SamplingParams.from_dict(sp, defaults=engine.sampling_defaults))
    return {"prompt_token_ids": prompt.prompt_ids, "output_token_ids": result["output_token_ids"],
            "text": result["text"], "finish_reason": result["finish_reason"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="One-shot Qwen3-VL generation")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--request", required=True, help="OpenAI chat-completions request body (JSON file)")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--quantization", default="", choices=["", "fp8"])
    ap.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1, help="tensor-parallel ranks (processes)")
    ap.add_argument("--ep", "--ep-size", dest="ep", type=int, default=1, help="expert-parallel groups within them")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--dist-init-addr", default="")
    args = ap.parse_args(argv)
    try:
        with open(args.request) as f:
            request = json.load(f)
        out = run(args.model_path, request, args.max_tokens, args.device, args.dtype, load_format=args.load_format,
                  quantization=args.quantization, tp_size=args.tp, ep_size=args.ep, nnodes=args.nnodes,
                  node_rank=args.node_rank, dist_init_addr=args.dist_init_addr)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), file=sys.stderr)
        return 2
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
