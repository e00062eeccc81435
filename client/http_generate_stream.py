"""Stream from the ensemble with Triton's HTTP `generate_stream` endpoint (server-sent events).

    python -m client.http_generate_stream "Describe this." --image cat.png [--url http://localhost:8080]

HTTP `/infer` refuses decoupled models; `generate_stream` takes the inputs as JSON fields.
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx

from .chat import build_messages


def generate_stream(url: str, messages: list[dict], sampling: dict, model: str = "qwen3vl", out=sys.stdout) -> str:
    body = {"text_input": json.dumps({"messages": messages}), "stream": True,
            "sampling_parameters": json.dumps(sampling)}
    text = ""
    with httpx.stream("POST", f"{url}/v2/models/{model}/generate_stream", json=body, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(event["error"])
            text += event["text_output"]
            out.write(event["text_output"])
            out.flush()
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("--image", action="append", default=[])
    ap.add_argument("--url", default="http://localhost:8080")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    try:
        generate_stream(args.url, build_messages(args.prompt, args.image), {"max_tokens": args.max_tokens})
    except RuntimeError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
