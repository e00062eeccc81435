"""Chat with the `qwen3vl` ensemble over tritonclient gRPC streaming; prints tokens as they arrive.

    python -m client.chat "What is in the picture?" --image cat.jpg [--video clip.mp4]
        [--url localhost:8001] [--max-tokens 256] [--temperature 0] [--system "..."]
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import queue
import sys
import uuid

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype


def _data_uri(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def build_messages(prompt: str, images=(), videos=(), system: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": _data_uri(p)}} for p in images]
    parts += [{"type": "video_url", "video_url": {"url": _data_uri(p)}} for p in videos]
    parts.append({"type": "text", "text": prompt})
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": parts}]


def _input(name, arr):
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


def stream_chat(url: str, messages: list[dict], sampling: dict, model: str = "qwen3vl", out=sys.stdout) -> dict:
    """Send one chat; writes text to `out` as it streams; returns text, finish reason and token counts."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, [
            _input("text_input", np.array([json.dumps({"messages": messages}).encode()], dtype=np.object_)),
            _input("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=np.object_)),
            _input("stream", np.array([True])),
            _input("return_num_input_tokens", np.array([True])),
            _input("return_num_output_tokens", np.array([True])),
        ], request_id=uuid.uuid4().hex)
        text = ""
        while True:
            result, error = results.get(timeout=600)
            if error is not None:
                raise RuntimeError(str(error))
            delta = result.as_numpy("text_output")[0].decode()
            text += delta
            out.write(delta)
            out.flush()
            finish = result.as_numpy("finish_reason")[0].decode()
            if finish:
                return {"text": text, "finish_reason": finish,
                        "prompt_tokens": int(result.as_numpy("num_input_tokens")[0]),
                        "completion_tokens": int(result.as_numpy("num_output_tokens")[0])}
    finally:
        client.stop_stream()
        client.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("--image", action="append", default=[])
    ap.add_argument("--video", action="append", default=[])
    ap.add_argument("--system")
    ap.add_argument("--url", default="localhost:8001")
    ap.add_argument("--model", default="qwen3vl")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.8)
    args = ap.parse_args(argv)
    messages = build_messages(args.prompt, args.image, args.video, args.system)
    try:
        info = stream_chat(args.url, messages, {"max_tokens": args.max_tokens, "temperature": args.temperature,
                                                "top_p": args.top_p}, args.model)
    except RuntimeError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print(f"\n[{info['finish_reason']}; {info['prompt_tokens']} prompt + {info['completion_tokens']} completion tokens]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
