"""Launch Triton with the qwen3vl ensemble and the OpenAI adapter, SGLang-style flags.

    python -m qwen3vl_backend.launch --model-path DIR [--host H --port P] [--tp 1] [--load-format dummy] ...

Writes a model repository whose `config.pbtxt` parameters carry the settings, starts
tritonserver and the adapter, waits until healthy, prints the URLs; Ctrl-C stops both.
`--dry-run` prints the resolved settings and the repository path and starts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from .supervisor import Server

ROOT = Path(__file__).resolve().parent.parent
SERVE_MODELS = ROOT / ".serve" / "models"          # --load-format dummy's model directories
TEMPLATE = ROOT / "model_repository"
MAX_WARM_SIZES = 4              # --vit-warmup-sizes: engine.vision_graphs.MAX_EXACT, the exact graphs a vit keeps
_PARAM = re.compile(r'parameters \{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}')


def write_repository(dest: Path, settings: dict[str, dict[str, str]], python_env: str | None = None,
                     instances: dict[str, int] | None = None) -> Path:
    """Copy the template repository to dest with each model's parameters overridden by settings[model]
    and, for the models named in `instances`, that many instances."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(TEMPLATE, dest, symlinks=False, ignore=shutil.ignore_patterns("python_env", "__pycache__"))
    env = python_env or sys.prefix
    for model_dir in sorted(p for p in dest.iterdir() if p.is_dir()):
        cfg = model_dir / "config.pbtxt"
        text = cfg.read_text()
        overrides = dict(settings.get(model_dir.name, {}))
        if "EXECUTION_ENV_PATH" in text:
            overrides["EXECUTION_ENV_PATH"] = env

        def sub(m):
            key = m.group(1)
            return m.group(0) if key not in overrides else \
                f'parameters {{ key: "{key}" value: {{ string_value: "{overrides.pop(key)}" }} }}'

        text = _PARAM.sub(sub, text)
        if model_dir.name in (instances or {}):
            text = re.sub(r"count: \d+", f"count: {instances[model_dir.name]}", text, count=1)
        for key, value in overrides.items():
            text += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
        cfg.write_text(text)
    return dest


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qwen3vl_backend.launch", description=__doc__.splitlines()[0])
    a = ap.add_argument
    a("--model-path", "--model", dest="model_path", required=True)
    a("--served-model-name", default=None)
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a("--grpc-port", type=int, default=8001)
    a("--triton-http-port", type=int, default=8080)
    a("--metrics-port", type=int, default=8002)
    a("--tp", "--tp-size", "--tensor-parallel-size", dest="tp", type=int, default=1)
    a("--ep", "--ep-size", "--expert-parallel-size", dest="ep", type=int, default=1)
    a("--nnodes", type=int, default=1, help="hosts the --tp ranks span (each host: --tp / --nnodes GPUs)")
    a("--node-rank", type=int, default=0, help="this host's index; the server runs on node 0")
    a("--dist-init-addr", "--dist-init-address", dest="dist_init_addr", default=None,
      help="HOST:PORT of node 0's rendezvous (several nodes; default: loopback)")
    a("--reasoning-parser", default=None, choices=["qwen3"],
      help="Thinking checkpoints: text up to </think> as message.reasoning_content")
    a("--tool-call-parser", default="qwen25", choices=["qwen25", "hermes"],
      help="<tool_call> blocks as message.tool_calls for requests with tools (both names: the same format)")
    a("--mm-enable-dp-encoder", action="store_true",
      help="one vit instance per GPU of the tp group (requests spread across them), each with a ViT "
           "replica on the group's next GPU too: a request's images are encoded on both at once")
    a("--device", default="auto")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    a("--load-format", default="auto", choices=["auto", "dummy"])
    a("--quantization", default=None, choices=["fp8"],
      help="quantize a bf16 checkpoint's decoder weights to 128x128-block fp8 as they load (an fp8 checkpoint needs "
           "no flag)")
    a("--kv-cache-dtype", default="auto",
      help="the KV cache's elements: auto (the model's dtype) or fp8_e4m3 (fp8): half the bytes a token, so twice "
           "the tokens in the same memory and half decode attention's reads; values saturate at +-448, no scale")
    a("--sampling-defaults", default="model", choices=["model", "openai"],
      help="what a request's unset sampling fields take: model, the checkpoint's generation_config.json "
           "(Qwen3-VL: temperature 0.7, top_p 0.8, top_k 20); openai, temperature 1 and no filter")
    a("--context-length", "--max-model-len", dest="max_model_len", type=int, default=8192)
    a("--max-running-requests", type=int, default=64)
    a("--chunked-prefill-size", type=int, default=2048)
    a("--mem-fraction-static", type=float, default=0.88)
    a("--attention-backend", default="auto", choices=["auto", "torch", "triton", "fa3"])
    a("--mm-attention-backend", default="sdpa", choices=["sdpa", "triton", "fa3", "fa2"])
    a("--keep-mm-feature-on-device", action=argparse.BooleanOptionalAction, default=None,
      help="the ViT's features reach llm as CUDA tensors, never through the host; on by default where the "
           "models run on a GPU (--no-keep-mm-feature-on-device sends them through the host)")
    a("--enable-vit-cuda-graph", action=argparse.BooleanOptionalAction, default=None,
      help="ViT CUDA graphs bucketed by patch count; on by default on a GPU unless --disable-cuda-graph "
           "(--no-enable-vit-cuda-graph runs the ViT eagerly)")
    a("--vit-warmup-sizes", default="1280x720",
      help="with --enable-vit-cuda-graph: image sizes (WIDTHxHEIGHT, comma-separated, at most "
           f"{MAX_WARM_SIZES}; 'none' for none) whose exact-size ViT graphs every vit instance captures at "
           "startup, so the first requests bringing them are not encoded cold")
    a("--resize-images-on-host", action="store_true",
      help="resize images in preprocess, on the host's cores; by default, on a GPU, the vit resizes "
           "requests' images on its device (the same pixels: processing/resize.py)")
    a("--decode-images-on-host", action="store_true",
      help="decode JPEGs in preprocess, on the host's cores; by default, where the vit resizes images on a GPU and "
           "nvJPEG loads, it decodes requests' baseline JPEGs there too (the same pixels: processing/jpeg_gpu.py)")
    a("--cuda-graph-max-bs", type=int, default=128, help="decode batches up to this size replay CUDA graphs (GPU)")
    a("--prefill-cuda-graph-max-tokens", type=int, default=4096,
      help="one new prompt of up to this many tokens (and --chunked-prefill-size) replays a prefill CUDA graph "
           "(GPU; 0: off)")
    a("--prefill-cuda-graph-max-seqs", type=int, default=4,
      help="up to this many new prompts that arrive together prefill in one graph step, each attending to its own "
           "tokens (GPU; 1: one prompt a step)")
    a("--prefill-pack-max-tokens", type=int, default=2048,
      help="and only while their tokens come to at most this many (0: no packing)")
    a("--disable-cuda-graph", action="store_true", help="no decode or prefill CUDA graphs")
    a("--mm-max-concurrent-calls", type=int, default=32)
    a("--preprocess-instances", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
      help="preprocess model instances (requests tokenised and their media decoded in parallel)")
    a("--mm-per-request-timeout", type=float, default=10.0)
    a("--disable-radix-cache", action="store_true", help="turn the prefix cache off")
    a("--disable-overlap-schedule", action="store_true",
      help="read each step back before queueing the next (by default the host prepares the next step meanwhile)")
    a("--enable-mixed-chunk", action="store_true",
      help="prefill new prompts in the decoding batch's steps (by default a prompt of 256+ tokens that fits a "
           "prefill graph gets a step of its own, ahead of decoding, as SGLang without this flag)")
    a("--enable-cache-report", action="store_true")
    a("--enable-metrics", action="store_true")
    a("--triton-host", default="127.0.0.1",
      help="address Triton's own gRPC, HTTP and metrics ports bind to (loopback by default: they take raw "
           "token ids; 0.0.0.0 exposes them to tritonclient users elsewhere)")
    a("--allowed-local-media-path", default=None, help="directory file:// media URLs may name (off by default)")
    a("--allowed-media-domains", nargs="+", default=None,
      help="the only hosts http(s) media is fetched from (default: any public host)")
    a("--allow-private-media-urls", action="store_true",
      help="also fetch media from loopback, private and link-local addresses (labs; never on an exposed server)")
    a("--media-fetch-timeout", type=float, default=10.0, help="seconds for one media fetch, redirects included")
    a("--max-media-mb", type=float, default=64.0, help="one media item's size limit")
    a("--limit-mm-per-prompt", default="image=16,video=2",
      help='media items per request, vLLM\'s forms: \'{"image": 4, "video": 1}\' or image=4,video=1')
    a("--max-request-body-mb", type=float, default=96.0, help="the OpenAI adapter answers 413 past this")
    a("--triton-shm-mb", type=int, default=256,
      help="the OpenAI adapter's shared-memory region for handing requests' large inputs (images as data URIs) to "
           "Triton, instead of inside gRPC messages (0: never)")
    a("--log-level", default="info")
    a("--trust-remote-code", action="store_true", help="accepted for SGLang compatibility; no remote code is run")
    a("--repository", default=None, help="where to write the model repository (default: a .serve folder)")
    a("--dry-run", action="store_true")
    return ap


def _env_flag(*names: str) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


def resolve(args) -> dict:
    """Flags + environment -> per-model settings; raises SystemExit with a clear message."""
    from .config import ConfigError, EngineConfig, PreprocessConfig, parse_bool
    from .processing.chat import RequestError
    from .processing.vision_inputs import VisionProcessingConfig, image_grid, parse_image_sizes
    from .processing.jpeg_gpu import library_available

    gpus = _gpu_count()
    on_cpu = args.device == "cpu"          # tp ranks as CPU processes (gloo): tests and development
    for name in ("tp", "ep"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    if args.tp % args.ep:
        raise SystemExit(f"--ep {args.ep} must divide --tp {args.tp} (SGLang's semantics: the experts split into "
                         f"--ep groups within the --tp ranks)")
    if args.nnodes < 1 or args.tp % args.nnodes or not 0 <= args.node_rank < args.nnodes:
        raise SystemExit(f"--nnodes {args.nnodes} must divide --tp {args.tp}, with --node-rank in [0, nnodes)")
    if args.nnodes > 1 and not args.dist_init_addr:
        raise SystemExit("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
    if args.node_rank > 0:
        raise SystemExit(f"--node-rank {args.node_rank}: the server runs on node 0; start this node's ranks with "
                         f"python -m qwen3vl_backend.engine.tp_worker {' '.join(_worker_flags(args))}")
    warnings = []
    if not on_cpu and args.tp > 1 and args.tp // args.nnodes > gpus:
        msg = f"--tp {args.tp} needs {args.tp // args.nnodes} GPUs on this node, {gpus} present"
        if not args.dry_run:
            raise SystemExit(msg)
        warnings.append(msg + ": this host could not start it")      # a dry run checks the rest
    if args.preprocess_instances < 1:
        raise SystemExit("--preprocess-instances must be >= 1")
    if args.attention_backend == "fa3" or args.mm_attention_backend in ("fa3", "fa2"):
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise SystemExit("fa3/fa2 attention needs the flash-attn package, which is not installed") from None
    model_path = _model_dir(args.model_path, args.load_format)
    llm = {"model_path": model_path, "device": args.device, "dtype": args.dtype, "load_format": args.load_format,
           "max_model_len": str(args.max_model_len), "max_num_seqs": str(args.max_running_requests),
           "max_num_batched_tokens": str(args.chunked_prefill_size),
           "mem_fraction_static": str(args.mem_fraction_static),
           "enable_prefix_cache": "false" if args.disable_radix_cache else "true",
           "overlap_schedule": "false" if args.disable_overlap_schedule else "true",
           "solo_prefill": "false" if args.enable_mixed_chunk else "true",
           "attention_backend": args.attention_backend, "quantization": args.quantization or "",
           "kv_cache_dtype": args.kv_cache_dtype,
           "tp_size": str(args.tp), "ep_size": str(args.ep), "nnodes": str(args.nnodes),
           "node_rank": str(args.node_rank), "dist_init_addr": args.dist_init_addr or "",
           "cuda_graph_max_bs": "0" if args.disable_cuda_graph else str(args.cuda_graph_max_bs),
           "prefill_cuda_graph_max_tokens": "0" if args.disable_cuda_graph else str(args.prefill_cuda_graph_max_tokens),
           "prefill_cuda_graph_max_seqs": str(args.prefill_cuda_graph_max_seqs),
           "prefill_pack_max_tokens": str(args.prefill_pack_max_tokens), "sampling_defaults": args.sampling_defaults}
    try:
        engine_cfg = EngineConfig.from_settings(llm)
    except ConfigError as e:
        raise SystemExit(f"invalid settings: {e}") from None
    sized = engine_cfg
    if warnings and args.dtype == "auto" and engine_cfg.device == "cpu":    # a GPU command dry-run on a CPU host
        sized = dataclasses.replace(engine_cfg, dtype="bfloat16")
    weights, weights_dtype = _check_weights_fit(model_path, sized), sized.dtype
    ipc = _env_flag("QWEN3VL_USE_CUDA_IPC_TRANSPORT", "SGLANG_USE_CUDA_IPC_TRANSPORT") or "0"
    try:
        ipc = "1" if parse_bool(ipc) else "0"
    except ValueError as e:
        raise SystemExit(f"invalid settings: SGLANG_USE_CUDA_IPC_TRANSPORT / QWEN3VL_USE_CUDA_IPC_TRANSPORT: {e}") from None
    cache_mb = _env_flag("QWEN3VL_VLM_CACHE_SIZE_MB", "SGLANG_VLM_CACHE_SIZE_MB") or "100"
    # --mm-enable-dp-encoder: one vit instance per GPU of the tp group, each encoding on it and the next
    vit_gpus = args.tp // args.nnodes if args.mm_enable_dp_encoder and not on_cpu else 1
    try:
        warm_sizes = parse_image_sizes(args.vit_warmup_sizes)
        for w, h in warm_sizes:             # what a request's image of that size would be refused for
            image_grid(w, h, VisionProcessingConfig())
    except (ValueError, RequestError) as e:
        raise SystemExit(f"--vit-warmup-sizes: {e}") from None
    if len(warm_sizes) > MAX_WARM_SIZES:
        raise SystemExit(f"--vit-warmup-sizes: {len(warm_sizes)} sizes, at most {MAX_WARM_SIZES} (the exact-size "
                         f"graphs a vit keeps)")
    on_gpu = engine_cfg.device.startswith("cuda")
    # the features on the GPU: a 1280x720 image's ~30 MB of float32 features through the host cost
    # ~30 ms of TTFT on an H200 (benchmarks/results/NOTES.md, twenty-eighth session)
    on_device = on_gpu if args.keep_mm_feature_on_device is None else args.keep_mm_feature_on_device
    # the ViT's graphs: 15 ms of the same image's TTFT (eager 74.4 ms, graphs 59.3), ~1.4 s more at load
    vit_graphs = on_gpu and not args.disable_cuda_graph if args.enable_vit_cuda_graph is None \
        else args.enable_vit_cuda_graph
    vit = {"model_path": model_path, "device": args.device, "dtype": args.dtype, "load_format": args.load_format,
           "mm_attention_backend": args.mm_attention_backend, "vlm_cache_size_mb": cache_mb,
           "keep_mm_feature_on_device": str(on_device).lower(),
           "enable_vit_cuda_graph": str(vit_graphs).lower(),
           "vit_gpus": str(vit_gpus), "vit_warmup_sizes": ",".join(f"{w}x{h}" for w, h in warm_sizes)}
    # --mm-max-concurrent-calls bounds media jobs server-wide: each preprocess instance gets an
    # equal share, and there are never more instances than jobs allowed
    if args.mm_max_concurrent_calls < 1:
        raise SystemExit("--mm-max-concurrent-calls must be >= 1")
    instances = min(args.preprocess_instances, args.mm_max_concurrent_calls)
    if args.max_request_body_mb <= 0:
        raise SystemExit("--max-request-body-mb must be positive")
    if args.triton_shm_mb < 0:
        raise SystemExit("--triton-shm-mb must be 0 (off) or more")
    local = str(Path(args.allowed_local_media_path).resolve()) if args.allowed_local_media_path else ""
    resize_on_vit = on_gpu and not args.resize_images_on_host
    pre = {"model_path": model_path, "max_model_len": str(args.max_model_len), "allowed_local_media_path": local,
           "allowed_media_domains": ",".join(args.allowed_media_domains or ()),
           "allow_private_media_urls": str(args.allow_private_media_urls).lower(),
           "media_fetch_timeout_s": str(args.media_fetch_timeout), "max_media_bytes": str(int(args.max_media_mb * 2**20)),
           "limit_mm_per_prompt": args.limit_mm_per_prompt,
           "mm_max_concurrent_calls": str(args.mm_max_concurrent_calls // instances),
           "mm_per_request_timeout": str(args.mm_per_request_timeout), "use_cuda_ipc_transport": ipc,
           "resize_on_vit": str(resize_on_vit).lower(),
           "decode_jpeg_on_vit": str(resize_on_vit and not args.decode_images_on_host and library_available()).lower()}
    try:
        PreprocessConfig.from_settings(pre)
    except ConfigError as e:
        raise SystemExit(f"invalid settings: {e}") from None
    out = {"preprocess": pre, "vit": vit, "llm": llm, "instances": {"preprocess": instances, "vit": vit_gpus},
           "weights_gb_per_gpu": round(weights / 1e9, 1), "weights_dtype": weights_dtype}
    return {**out, "warnings": warnings} if warnings else out


def _worker_flags(args) -> list[str]:
    flags = ["--model-path", args.model_path, "--tp", str(args.tp), "--ep", str(args.ep), "--nnodes",
             str(args.nnodes), "--node-rank", str(args.node_rank), "--dist-init-addr", args.dist_init_addr or "",
             "--load-format", args.load_format, "--device", args.device, "--dtype", args.dtype]
    return flags + (["--quantization", args.quantization] if args.quantization else []) + (
        ["--kv-cache-dtype", args.kv_cache_dtype] if args.kv_cache_dtype != "auto" else [])


def frontend_args(args, settings: dict) -> list[str]:
    """The adapter's flags: it fetches http(s) and file:// media itself, under the same rules, and
    tokenises text-only chats for `llm` with the checkpoint's tokenizer."""
    pre = settings["preprocess"]
    out = ["--model-path", settings["llm"]["model_path"], "--log-level", args.log_level,
           "--max-request-body-mb", str(args.max_request_body_mb), "--triton-shm-mb", str(args.triton_shm_mb),
           "--max-media-mb", str(args.max_media_mb), "--media-fetch-timeout", str(args.media_fetch_timeout),
           "--mm-max-concurrent-calls", str(args.mm_max_concurrent_calls),
           "--mm-per-request-timeout", str(args.mm_per_request_timeout),
           "--limit-mm-per-prompt", args.limit_mm_per_prompt, "--max-model-len", str(args.max_model_len),
           "--tool-call-parser", args.tool_call_parser]
    if args.reasoning_parser:
        out += ["--reasoning-parser", args.reasoning_parser]
    if args.enable_cache_report:
        out.append("--enable-cache-report")
    if pre["allowed_local_media_path"]:
        out += ["--allowed-local-media-path", pre["allowed_local_media_path"]]
    if args.allowed_media_domains:
        out += ["--allowed-media-domains", *args.allowed_media_domains]
    if args.allow_private_media_urls:
        out.append("--allow-private-media-urls")
    return out


def listening(args) -> list[dict]:
    """Every address and port a launch listens on."""
    out = [{"service": "OpenAI API (adapter; /metrics too)", "address": args.host, "port": args.port},
           {"service": "Triton gRPC", "address": args.triton_host, "port": args.grpc_port},
           {"service": "Triton HTTP", "address": args.triton_host, "port": args.triton_http_port}]
    if args.enable_metrics:
        out.append({"service": "Triton metrics", "address": args.triton_host, "port": args.metrics_port})
    return out


def banner(args, served: str) -> str:
    """What a launch prints once it serves (the README shows the one of `make serve`)."""
    local = "127.0.0.1" if args.host == "0.0.0.0" else args.host
    triton = "127.0.0.1" if args.triton_host == "0.0.0.0" else args.triton_host
    metrics = f"http://{triton}:{args.metrics_port}/metrics" if args.enable_metrics else "off (--enable-metrics)"
    return (f"OpenAI API:   http://{local}:{args.port}/v1/chat/completions   (model '{served}')\n"
            f"Triton gRPC:  {triton}:{args.grpc_port}   HTTP: http://{triton}:{args.triton_http_port}   "
            f"metrics: {metrics}")


def _model_dir(model_path: str, load_format: str) -> str:
    """A local checkpoint directory; with --load-format dummy, a published model name
    (e.g. Qwen/Qwen3-VL-235B-A22B-Instruct) resolves to its bundled config: no hub is needed."""
    path = Path(model_path)
    if path.exists():
        return str(path.resolve())
    bundled = ROOT / "qwen3vl_backend" / "data" / "configs" / f"{path.name}.json"
    if load_format == "dummy" and bundled.exists():
        from .tools.make_tiny_checkpoint import write_model_dir

        out = SERVE_MODELS / path.name
        def complete() -> bool:
            return all((out / f).exists() for f in ("config.json", "tokenizer.json"))

        if not complete():
            # written aside and renamed into place: an interrupted or failed write (a missing
            # tokenizer source) leaves no half directory for the next launch to take as a model
            tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                write_model_dir(tmp, json.loads(bundled.read_text()))
                shutil.rmtree(out, ignore_errors=True)
                try:
                    os.replace(tmp, out)
                except OSError:              # another launch put its own complete copy there first
                    if not complete():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return str(out)
    known = ", ".join(sorted(p.stem for p in bundled.parent.glob("*.json")))
    raise SystemExit(f"--model-path {model_path!r} is not a local checkpoint directory (no hub is reached; "
                     f"with --load-format dummy these names work: {known})")


def _rank0_shard(model_path: str, cfg):
    """Rank 0's shard on the meta device (the largest: ranks differ only in the vocabulary's last
    rows); a layout the model cannot take (heads, experts, fp8 blocks) exits with its reason."""
    from .loader import build_model, model_config
    from .parallel import Parallel

    try:
        return build_model(model_config(model_path, cfg.quantization), "meta", cfg.torch_dtype,
                           Parallel(cfg.tp_size, 0, cfg.ep_size))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _check_weights_fit(model_path: str, cfg) -> int:
    """Refuse before starting anything a tp/ep layout the model cannot take, and, on a GPU, weights
    that alone pass --mem-fraction-static. -> the bytes of rank 0's weights."""
    from .loader import weight_bytes

    model = _rank0_shard(model_path, cfg)
    need = weight_bytes(model)
    if not cfg.device.startswith("cuda"):
        return need
    import torch

    total = torch.cuda.mem_get_info(torch.device(cfg.device))[1]
    if need > total * cfg.mem_fraction_static:
        per = f" per GPU at --tp {cfg.tp_size}" if cfg.tp_size > 1 else ""
        raise SystemExit(f"{Path(model_path).name}: its weights need {need / 1e9:.1f} GB{per} ({cfg.dtype}) but "
                         f"--mem-fraction-static {cfg.mem_fraction_static} of this GPU's {total / 1e9:.1f} GB is "
                         f"{total * cfg.mem_fraction_static / 1e9:.1f} GB (more GPUs: --tp; fp8: --quantization fp8 "
                         f"or an FP8 checkpoint)")
    return need


def _gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


class _Stopping(Exception):
    pass


def _on_signal(*_):
    """The first SIGINT/SIGTERM/SIGHUP interrupts whatever the launcher is doing (starting,
    waiting, restarting); later ones are ignored so that stopping itself runs to the end."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise _Stopping


def main(argv=None) -> int:
    # first of all: a process started in the background inherits SIGINT ignored, and systemd or
    # `kill` send SIGTERM, which must stop the children too, at any point of the launch
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return _main(argv)
    except _Stopping:
        return 0


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    settings = resolve(args)
    repo = Path(args.repository or ROOT / ".serve" / "model_repository").resolve()
    served = args.served_model_name or Path(args.model_path).resolve().name
    if args.dry_run:
        print(json.dumps({"repository": str(repo), "served_model_name": served, "listening": listening(args),
                          "settings": settings}, indent=2))
        return 0
    write_repository(repo, settings, instances=settings["instances"])
    server = None
    try:
        server = Server(repo, args.host, args.port, args.grpc_port, args.triton_http_port, args.metrics_port, served,
                        frontend_args(args, settings), repo.parent / "logs", ROOT / ".cache" / "triton",
                        args.enable_metrics, 1024 if settings["vit"]["keep_mm_feature_on_device"] == "true"
                        or settings["preprocess"]["use_cuda_ipc_transport"] == "1" else 0,
                        triton_host=args.triton_host)
        server.wait_ready()
        print(banner(args, served))
        print(f"logs: {repo.parent / 'logs'}   Ctrl-C stops both", flush=True)
        return supervise(server)
    finally:
        if server is not None:
            server.stop()


def supervise(server: Server, max_restarts: int = 5, window_s: float = 600) -> int:
    """Watch the service; when Triton or one of its model processes dies, start Triton again
    (at most `max_restarts` times in `window_s`, then give up)."""
    restarts: list[float] = []
    while True:
        why = server.check()
        if why is None:
            time.sleep(0.5)
            continue
        if server.frontend.poll() is not None:
            print(f"{why}: stopping", file=sys.stderr, flush=True)
            return 1
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < window_s] + [now]
        if len(restarts) > max_restarts:
            print(f"{why}: {max_restarts} restarts within {window_s:.0f}s, giving up", file=sys.stderr, flush=True)
            return 1
        print(f"{why}: restarting tritonserver", file=sys.stderr, flush=True)
        try:
            server.restart()
        except (RuntimeError, TimeoutError) as e:
            print(f"tritonserver did not come back: {e}", file=sys.stderr, flush=True)
            return 1
        print("serving again", file=sys.stderr, flush=True)

if __name__ == "__main__":
    sys.exit(main())
