import argparse
import logging

import uvicorn

from qwen3vl_backend.errors import ConfigError
from qwen3vl_backend.processing.chat import parse_mm_limits
from qwen3vl_backend.processing.media import MediaPolicy

from .app import FrontendSettings, create_app


def build_settings(argv=None) -> tuple[FrontendSettings, argparse.Namespace]:
    """The command line -> the app's settings (and the parsed flags)."""
    ap = argparse.ArgumentParser(description="OpenAI-compatible front for the Triton qwen3vl ensemble")
    a = ap.add_argument
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a("--triton-url", default="localhost:8001")
    a("--triton-model", default="qwen3vl")
    a("--triton-metrics-url", default=None)
    a("--served-model-name", default="qwen3-vl")
    a("--model-path", default=None,
      help="the checkpoint directory: text-only chats are then tokenised here and sent to `llm` directly")
    a("--enable-cache-report", action="store_true")
    a("--max-request-body-mb", type=float, default=96, help="larger request bodies are refused with 413 before they are read")
    # media: the same flags and meaning as the launcher's
    a("--allowed-local-media-path", default=None, help="directory file:// media URLs may name (off by default)")
    a("--allowed-media-domains", nargs="+", default=None, help="the only hosts http(s) media is fetched from")
    a("--allow-private-media-urls", action="store_true", help="also fetch from loopback/private/link-local addresses")
    a("--media-fetch-timeout", type=float, default=10.0)
    a("--max-media-mb", type=float, default=64, help="one media item's size limit")
    a("--mm-max-concurrent-calls", type=int, default=32)
    a("--mm-per-request-timeout", type=float, default=10.0)
    a("--limit-mm-per-prompt", default="image=16,video=2")
    a("--reasoning-parser", default=None, choices=["qwen3"], help="<think> ... </think> as reasoning_content")
    a("--tool-call-parser", default="qwen25", choices=["qwen25", "hermes"], help="<tool_call> blocks as tool_calls")
    a("--max-model-len", type=int, default=None, help="reported by /v1/models")
    a("--triton-shm-mb", type=int, default=256,
      help="where --triton-url is this host: inputs of 64 KB or more (images as data URIs) reach Triton through "
           "a shared-memory region of this size instead of inside gRPC messages (0: never)")
    a("--log-level", default="info")
    args = ap.parse_args(argv)
    if min(args.max_request_body_mb, args.max_media_mb, args.media_fetch_timeout, args.mm_per_request_timeout,
           args.mm_max_concurrent_calls) <= 0 or args.triton_shm_mb < 0:
        ap.error("sizes, timeouts and --mm-max-concurrent-calls must be positive (--triton-shm-mb: 0 or more)")
    try:
        limits = parse_mm_limits(args.limit_mm_per_prompt)
    except ConfigError as e:
        ap.error(str(e))
    policy = MediaPolicy(allowed_local_dir=args.allowed_local_media_path, fetch_timeout_s=args.media_fetch_timeout,
                         max_bytes=int(args.max_media_mb * 2**20),
                         allowed_domains=tuple(d.lower() for d in args.allowed_media_domains or ()) or None,
                         allow_private=args.allow_private_media_urls)
    return FrontendSettings(args.triton_url, args.triton_model, args.served_model_name, args.triton_metrics_url,
                            args.enable_cache_report, int(args.max_request_body_mb * 2**20), policy,
                            args.mm_max_concurrent_calls, args.mm_per_request_timeout, limits, args.model_path,
                            args.reasoning_parser, args.tool_call_parser, args.max_model_len,
                            args.triton_shm_mb * 2**20), args


def main(argv=None) -> None:
    settings, args = build_settings(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # a stop must not wait on open streams for long: they end with the server (see the launcher)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
