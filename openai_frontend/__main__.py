import argparse

import uvicorn

from .app import FrontendSettings, create_app


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="OpenAI-compatible front for the Triton qwen3vl ensemble")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--triton-url", default="localhost:8001")
    ap.add_argument("--triton-model", default="qwen3vl")
    ap.add_argument("--triton-metrics-url", default=None)
    ap.add_argument("--served-model-name", default="qwen3-vl")
    ap.add_argument("--allowed-local-media-path", default=None,
                    help="directory whose files may be named by local path in image_url/video_url (off by default)")
    ap.add_argument("--enable-cache-report", action="store_true")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    app = create_app(FrontendSettings(args.triton_url, args.triton_model, args.served_model_name,
                                      args.allowed_local_media_path, args.triton_metrics_url,
                                      args.enable_cache_report))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
