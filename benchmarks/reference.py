"""The same workload through transformers' `generate` on the same GPU, for a side-by-side.

    python -m benchmarks.reference [--config Qwen3-VL-30B-A3B-Instruct] [--batch 1,8]

transformers' Qwen3-VL-MoE with random weights at the real shapes (its own initialisation: the
speed of a step does not depend on the values beyond routing, which is near uniform for both),
bf16, SDPA attention. TTFT = generate(max_new_tokens=1); decode tok/s from the difference to a
longer generate. Batches repeat one request.
"""

import argparse
import tempfile
import time

import torch

from .common import bundled_model_dir, print_table, write_result
from .engine import make_request
from qwen3vl_backend.processing.processor import Processor


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None):
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="Qwen3-VL-30B-A3B-Instruct")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--out-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bundled_model_dir(args.config, tmp)
        config = transformers.AutoConfig.from_pretrained(model_dir)
        cls = getattr(transformers, config.architectures[0])
        t = time.perf_counter()
        with torch.device("cuda"):
            model = cls._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        load_s = time.perf_counter() - t
        processor = transformers.AutoProcessor.from_pretrained(model_dir)
        img, text = make_request(Processor(model_dir).tokenizer, 0)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt_text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        for b in (int(x) for x in args.batch.split(",")):
            inputs = processor(text=[prompt_text] * b, images=[img] * b, return_tensors="pt").to("cuda")
            gen = dict(do_sample=False, min_new_tokens=1)
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=2, **gen)                     # warm up
                ttft = timed(lambda: model.generate(**inputs, max_new_tokens=1, **gen))
                full = timed(lambda: model.generate(**inputs, max_new_tokens=args.out_tokens,
                                                    min_new_tokens=args.out_tokens, do_sample=False))
            step = (full - ttft) / (args.out_tokens - 1)
            rows.append({"batch": b, "prompt_tokens": int(inputs["input_ids"].shape[1]), "ttft_ms": ttft * 1e3,
                         "decode_step_ms": step * 1e3, "per_stream_tok_s": 1 / step, "total_decode_tok_s": b / step})
            print_table(rows[-1:], list(rows[-1]))
    print_table(rows, list(rows[0]))
    print(write_result("reference", {"config": args.config, "transformers": transformers.__version__,
                                     "out_tokens": args.out_tokens, "load_s": load_s}, rows, args.out))


if __name__ == "__main__":
    main()
