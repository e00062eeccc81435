"""Launch Triton with the qwen3vl ensemble and the OpenAI adapter, SGLang-style flags.

    python -m qwen3vl_backend.launch --model-path DIR [--host H --port P] [--tp 1] [--load-format dummy] ...

Writes a model repository whose `config.pbtxt` parameters carry the settings, starts
tritonserver and the adapter, waits until healthy, prints the URLs; Ctrl-C stops both.
`--dry-run` prints the resolved settings and the repository path and starts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .tools.install_triton import install

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "model_repository"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


class Server:
    """tritonserver + the OpenAI adapter as child processes, stopped together."""

    def __init__(self, repo: Path, host: str, port: int, grpc_port: int, triton_http_port: int, metrics_port: int,
                 served_model_name: str, frontend_args: list[str], log_dir: Path, triton_dest: Path,
                 enable_metrics: bool = True, cuda_pool_mb: int = 0):
        self.repo, self.host, self.port = repo, host, port
        self.grpc_port, self.metrics_port = grpc_port, metrics_port
        layout = install(triton_dest)
        env = dict(os.environ)
        if layout["ld_library_path"]:
            env["LD_LIBRARY_PATH"] = layout["ld_library_path"] + ":" + env.get("LD_LIBRARY_PATH", "")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.triton_log = open(log_dir / "tritonserver.log", "w")
        self.frontend_log = open(log_dir / "frontend.log", "w")
        cmd = [layout["tritonserver"], "--model-repository", str(repo), "--grpc-port", str(grpc_port),
               "--http-port", str(triton_http_port), "--metrics-port", str(metrics_port), "--log-verbose", "0",
               f"--allow-metrics={'true' if enable_metrics else 'false'}"]
        if layout["backend_dir"]:
            cmd += ["--backend-directory", layout["backend_dir"]]
        if cuda_pool_mb:       # room for visual features handed between models as CUDA tensors
            cmd += [f"--cuda-memory-pool-byte-size=0:{cuda_pool_mb * 2**20}"]
        # each Python model's shared-memory region starts at 1 MB and grows 1 MB at a time by
        # default: one image's visual features (tens of MB) then cost ~30 growth steps per hand-off
        cmd += [f"--backend-config=python,shm-default-byte-size={64 * 2**20}",
                f"--backend-config=python,shm-growth-byte-size={64 * 2**20}"]
        cmd += shlex.split(os.environ.get("QWEN3VL_TRITON_ARGS", ""))    # e.g. --trace-config flags
        self.triton = subprocess.Popen(cmd, stdout=self.triton_log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        self.triton_http = f"http://127.0.0.1:{triton_http_port}"
        self.frontend = subprocess.Popen(
            [sys.executable, "-m", "openai_frontend", "--host", host, "--port", str(port),
             "--triton-url", f"127.0.0.1:{grpc_port}", "--served-model-name", served_model_name,
             *(["--triton-metrics-url", f"http://127.0.0.1:{metrics_port}/metrics"] if enable_metrics else []),
             *frontend_args],
            stdout=self.frontend_log, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_ready(self, timeout_s: float = 600) -> None:
        wait_http(f"{self.triton_http}/v2/health/ready", timeout_s, self.triton)
        wait_http(f"{self.url}/health", 60, self.frontend)

    def stop(self) -> None:
        for proc in (self.frontend, self.triton):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (self.frontend, self.triton):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.triton_log.close()
        self.frontend_log.close()


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
    a("--device", default="auto")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    a("--load-format", default="auto", choices=["auto", "dummy"])
    a("--context-length", "--max-model-len", dest="max_model_len", type=int, default=8192)
    a("--max-running-requests", type=int, default=64)
    a("--chunked-prefill-size", type=int, default=2048)
    a("--mem-fraction-static", type=float, default=0.88)
    a("--attention-backend", default="auto", choices=["auto", "torch", "triton", "fa3"])
    a("--mm-attention-backend", default="sdpa", choices=["sdpa", "triton", "fa3", "fa2"])
    a("--keep-mm-feature-on-device", action="store_true")
    a("--enable-vit-cuda-graph", action="store_true", help="ViT CUDA graphs bucketed by patch count (GPU)")
    a("--mm-max-concurrent-calls", type=int, default=32)
    a("--preprocess-instances", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
      help="preprocess model instances (requests tokenised and their media decoded in parallel)")
    a("--mm-per-request-timeout", type=float, default=10.0)
    a("--disable-radix-cache", action="store_true", help="turn the prefix cache off")
    a("--disable-overlap-schedule", action="store_true",
      help="read each step back before queueing the next (by default the host prepares the next step meanwhile)")
    a("--enable-cache-report", action="store_true")
    a("--enable-metrics", action="store_true")
    a("--allowed-local-media-path", default=None)
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
    from .config import ConfigError, EngineConfig

    gpus = _gpu_count()
    for name in ("tp", "ep"):
        n = getattr(args, name)
        if n < 1:
            raise SystemExit(f"--{name} must be >= 1")
        if n > max(gpus, 1):
            raise SystemExit(f"--{name} {n} needs {n} GPUs, {gpus} present")
        if n > 1:
            raise SystemExit(f"--{name} {n}: multi-GPU serving is not implemented in this build yet")
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
           "attention_backend": args.attention_backend}
    try:
        engine_cfg = EngineConfig.from_settings(llm)
    except ConfigError as e:
        raise SystemExit(f"invalid settings: {e}") from None
    _check_weights_fit(model_path, engine_cfg)
    ipc = _env_flag("QWEN3VL_USE_CUDA_IPC_TRANSPORT", "SGLANG_USE_CUDA_IPC_TRANSPORT") or "0"
    ipc = "1" if ipc.strip().lower() in ("1", "true", "yes", "on") else "0"
    cache_mb = _env_flag("QWEN3VL_VLM_CACHE_SIZE_MB", "SGLANG_VLM_CACHE_SIZE_MB") or "100"
    vit = {"model_path": model_path, "device": args.device, "dtype": args.dtype, "load_format": args.load_format,
           "mm_attention_backend": args.mm_attention_backend, "vlm_cache_size_mb": cache_mb,
           "keep_mm_feature_on_device": str(args.keep_mm_feature_on_device).lower(),
           "enable_vit_cuda_graph": str(args.enable_vit_cuda_graph).lower()}
    # --mm-max-concurrent-calls bounds media jobs server-wide: each preprocess instance gets an
    # equal share, and there are never more instances than jobs allowed
    if args.mm_max_concurrent_calls < 1:
        raise SystemExit("--mm-max-concurrent-calls must be >= 1")
    instances = min(args.preprocess_instances, args.mm_max_concurrent_calls)
    pre = {"model_path": model_path, "allowed_local_media_path": args.allowed_local_media_path or "",
           "mm_max_concurrent_calls": str(args.mm_max_concurrent_calls // instances),
           "mm_per_request_timeout": str(args.mm_per_request_timeout), "use_cuda_ipc_transport": ipc}
    return {"preprocess": pre, "vit": vit, "llm": llm, "instances": {"preprocess": instances}}


def _model_dir(model_path: str, load_format: str) -> str:
    """A local checkpoint directory; with --load-format dummy, a published model name
    (e.g. Qwen/Qwen3-VL-235B-A22B-Instruct) resolves to its bundled config: no hub is needed."""
    path = Path(model_path)
    if path.exists():
        return str(path.resolve())
    bundled = ROOT / "qwen3vl_backend" / "data" / "configs" / f"{path.name}.json"
    if load_format == "dummy" and bundled.exists():
        from .tools.make_tiny_checkpoint import write_model_dir

        out = ROOT / ".serve" / "models" / path.name
        if not (out / "config.json").exists():
            write_model_dir(out, json.loads(bundled.read_text()))
        return str(out)
    known = ", ".join(sorted(p.stem for p in bundled.parent.glob("*.json")))
    raise SystemExit(f"--model-path {model_path!r} is not a local checkpoint directory (no hub is reached; "
                     f"with --load-format dummy these names work: {known})")


def _check_weights_fit(model_path: str, cfg) -> None:
    """On a GPU: refuse before starting anything when the weights alone pass --mem-fraction-static."""
    if not cfg.device.startswith("cuda"):
        return
    import torch

    from .loader import build_model, weight_bytes
    from .model_config import ModelConfig

    need = weight_bytes(build_model(ModelConfig.from_path(model_path), "meta", cfg.torch_dtype))
    total = torch.cuda.mem_get_info(torch.device(cfg.device))[1]
    if need > total * cfg.mem_fraction_static:
        raise SystemExit(f"{Path(model_path).name}: its weights need {need / 1e9:.1f} GB ({cfg.dtype}) but "
                         f"--mem-fraction-static {cfg.mem_fraction_static} of this GPU's {total / 1e9:.1f} GB is "
                         f"{total * cfg.mem_fraction_static / 1e9:.1f} GB (one GPU: tensor and expert parallelism "
                         f"are not implemented in this build)")


def _gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = resolve(args)
    repo = Path(args.repository or ROOT / ".serve" / "model_repository").resolve()
    served = args.served_model_name or Path(args.model_path).resolve().name
    if args.dry_run:
        print(json.dumps({"repository": str(repo), "served_model_name": served, "settings": settings}, indent=2))
        return 0
    write_repository(repo, settings, instances=settings["instances"])
    frontend_args = ["--log-level", args.log_level]
    if args.enable_cache_report:
        frontend_args.append("--enable-cache-report")
    if args.allowed_local_media_path:
        frontend_args += ["--allowed-local-media-path", str(Path(args.allowed_local_media_path).resolve())]
    server = Server(repo, args.host, args.port, args.grpc_port, args.triton_http_port, args.metrics_port, served,
                    frontend_args, repo.parent / "logs", ROOT / ".cache" / "triton", args.enable_metrics,
                    1024 if args.keep_mm_feature_on_device or settings["preprocess"]["use_cuda_ipc_transport"] == "1"
                    else 0)
    stop = {"now": False}
    # installed explicitly: a process started in the background inherits SIGINT ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.update(now=True))
    try:
        server.wait_ready()
        print(f"OpenAI API:   {server.url}/v1/chat/completions   (model '{served}')")
        metrics = f"{server.url}/metrics" if args.enable_metrics else "off (--enable-metrics)"
        print(f"Triton gRPC:  127.0.0.1:{args.grpc_port}   HTTP: {server.triton_http}   metrics: {metrics}")
        print(f"logs: {repo.parent / 'logs'}   Ctrl-C stops both", flush=True)
        while not stop["now"] and server.triton.poll() is None and server.frontend.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
