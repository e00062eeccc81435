"""The engine's one validated config, and the one parser of settings into it.

`EngineConfig.from_settings` takes string settings: Triton `config.pbtxt` parameters and the
launcher's flags both arrive that way, under the same names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .errors import ConfigError
from .parallel import one_device
from .processing.chat import parse_mm_limits
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = {"auto": None, "fp8_e4m3": torch.float8_e4m3fn}


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_bool(text: str) -> bool:
    """A setting's boolean, the one spelling rule for config.pbtxt parameters, the launcher's
    environment and the settings dataclasses: 1/true/yes/on or 0/false/no/off, any case;
    ValueError otherwise."""
    try:
        return BOOL_WORDS[str(text).strip().lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not a boolean (1/true/yes/on or 0/false/no/off)") from None


@dataclass
class EngineConfig:
    model_path: str = ""
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                   # auto (float32 on cpu, bfloat16 on cuda) | float32 | bfloat16
    load_format: str = "auto"             # auto | dummy
    max_model_len: int = 8192
    block_size: int = 16
    num_kv_blocks: int = 0                # 0: sized from mem_fraction_static (cuda) or 2048 (cpu)
    mem_fraction_static: float = 0.88
    max_num_seqs: int = 64                # SGLang's --max-running-requests
    max_num_batched_tokens: int = 2048    # SGLang's --chunked-prefill-size
    enable_prefix_cache: bool = True
    attention_backend: str = "auto"       # auto (triton on cuda, torch on cpu) | torch | triton | fa3
    moe_backend: str = "auto"             # auto (triton on cuda, torch on cpu) | torch | triton
    mm_attention_backend: str = "sdpa"    # sdpa | triton | fa3
    vlm_cache_size_mb: float = 0.0       # the engine's own ViT cache (the Triton vit model has its own)
    cuda_graph_max_bs: int = 128          # decode steps up to this batch replay CUDA graphs; 0 disables
    prefill_cuda_graph_max_tokens: int = 4096   # one new prompt up to this many tokens (and the chunked-prefill
                                          # size) replays a prefill graph (cuda only); 0 disables
    prefill_cuda_graph_max_seqs: int = 4  # new prompts packed into one prefill graph step (1: one prompt a step)
    prefill_pack_max_tokens: int = 2048   # and their tokens at most (a prompt alone may be longer; scheduler.py)
    solo_prefill: bool = True             # with prefill graphs: a waiting prompt of 256+ tokens that fits one
                                          # is prefilled in a step of its own, ahead of decoding (scheduler.py)
    enable_vit_cuda_graph: bool = False   # the ViT replays CUDA graphs bucketed by patch count (cuda only)
    overlap_schedule: bool = True         # queue step n+1 before reading step n back (SGLang's overlap scheduler)
    quantization: str = ""                # "" (as the checkpoint is) | fp8: quantize a bf16 checkpoint as it loads
    kv_cache_dtype: str = "auto"          # the KV cache's elements: auto (the model's dtype) | fp8_e4m3 (or "fp8")
    seed: int = 0
    tp_size: int = 1                      # tensor parallelism: one process per GPU (qwen3vl_backend/parallel.py)
    ep_size: int = 1                      # expert parallelism within the tp ranks (divides tp_size)
    nnodes: int = 1                       # hosts the tp ranks span; each other host runs engine.tp_worker
    node_rank: int = 0
    dist_init_addr: str = ""              # host:port of rank 0's rendezvous (default: loopback, a free port)
    dist_timeout_s: float = 600.0         # a collective no rank answers for this long fails the group
    moe_routing: str = "model"            # model | uniform: benchmarks' stand-in for a real checkpoint's routing
    sampling_defaults: str = "model"      # model (generation_config.json's) | openai: what unset sampling fields take

    def __post_init__(self):
        if not self.model_path:
            raise ConfigError("model_path is required")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.load_format == "auto" and not (Path(self.model_path) / "config.json").exists():
            raise ConfigError(f"model_path {self.model_path!r} has no config.json")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device cuda requested but no CUDA device is available")
        if self.dtype == "auto":
            self.dtype = "float32" if self.device == "cpu" else "bfloat16"
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.attention_backend == "triton" and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ConfigError(f"block_size must be a power of two >= 16 with the triton attention backend, "
                              f"got {self.block_size}")
        if self.tp_size < 1 or self.ep_size < 1 or self.tp_size % self.ep_size:
            raise ConfigError(f"tp_size {self.tp_size} and ep_size {self.ep_size}: both >= 1, ep dividing tp")
        if self.nnodes < 1 or self.tp_size % self.nnodes or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"nnodes {self.nnodes} must divide tp_size {self.tp_size}, node_rank in [0, nnodes)")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ConfigError("several nodes need dist_init_addr (host:port of node 0)")
        if (self.device.startswith("cuda") and not one_device()
                and self.tp_size // self.nnodes > torch.cuda.device_count() - self.device_index):
            raise ConfigError(f"tp_size {self.tp_size} needs {self.tp_size // self.nnodes} GPUs per node from "
                              f"{self.device}, {torch.cuda.device_count()} present")
        if self.sampling_defaults not in ("model", "openai"):
            raise ConfigError(f"sampling_defaults must be model or openai, got {self.sampling_defaults!r}")
        if self.moe_routing not in ("model", "uniform"):
            raise ConfigError(f"moe_routing must be model or uniform, got {self.moe_routing!r}")
        for name in ("cuda_graph_max_bs", "prefill_cuda_graph_max_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.prefill_pack_max_tokens < 0:
            raise ConfigError(f"prefill_pack_max_tokens must be >= 0, got {self.prefill_pack_max_tokens}")
        if self.prefill_cuda_graph_max_seqs < 1:
            raise ConfigError(f"prefill_cuda_graph_max_seqs must be >= 1, got {self.prefill_cuda_graph_max_seqs}")
        if self.quantization not in ("", "fp8"):
            raise ConfigError(f"quantization must be fp8 (or empty), got {self.quantization!r}")
        if self.kv_cache_dtype == "fp8":
            self.kv_cache_dtype = "fp8_e4m3"                  # vLLM's spelling of the same
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be auto or fp8_e4m3 (fp8), got {self.kv_cache_dtype!r}"
                              + (": fp8_e5m2 is not supported" if self.kv_cache_dtype == "fp8_e5m2" else ""))
        if self.num_kv_blocks < 0:
            raise ConfigError("num_kv_blocks must be >= 0")
        if not 0 < self.mem_fraction_static < 1:
            raise ConfigError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        for name in ("attention_backend", "moe_backend"):
            if getattr(self, name) == "auto":
                setattr(self, name, "triton" if self.device.startswith("cuda") else "torch")
        for name, allowed in (("attention_backend", ("torch", "triton", "fa3")), ("moe_backend", ("torch", "triton")),
                              ("mm_attention_backend", ("sdpa", "triton", "fa3", "fa2"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        """The KV cache's element type: the model's dtype, or float8 e4m3 (layers/attention.py's
        kv_cast: values stored as they are, saturated at 448, no scale)."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or self.torch_dtype

    @property
    def device_index(self) -> int:
        """The first GPU of this node's ranks (cuda:N), 0 for plain cuda."""
        return int(self.device.split(":")[1]) if ":" in self.device else 0

    def rank_device(self, rank: int) -> str:
        """Global rank -> its device: consecutive GPUs from `device` on each node (all on `device`
        with parallel.one_device())."""
        if not self.device.startswith("cuda"):
            return self.device
        if one_device():
            return f"cuda:{self.device_index}"
        return f"cuda:{self.device_index + rank % (self.tp_size // self.nnodes)}"

    @classmethod
    def from_settings(cls, settings: dict[str, str]) -> "EngineConfig":
        """String settings (config.pbtxt parameters, launcher flags) -> validated config."""
        return parse_settings(cls, settings, "engine")


def parse_settings(cls, settings: dict[str, str], what: str):
    """String settings -> the dataclass `cls`, each converted to its field's type.

    Values may use `$VAR` / `${VAR}` environment references; unknown names are refused.
    """
    types = {f.name: f.type for f in fields(cls)}
    kwargs = {}
    for key, raw in settings.items():
        if key not in types:
            raise ConfigError(f"unknown {what} setting {key!r}")
        value = os.path.expandvars(str(raw))
        kind = types[key]
        try:
            if kind in ("int", int):
                kwargs[key] = int(value)
            elif kind in ("float", float):
                kwargs[key] = float(value)
            elif kind in ("bool", bool):
                kwargs[key] = parse_bool(value)
            else:
                kwargs[key] = value
        except ValueError:
            raise ConfigError(f"setting {key}={value!r} is not a valid {kind}") from None
    return cls(**kwargs)


@dataclass
class PreprocessConfig:
    """The `preprocess` model's settings: media safety and the limits checked before the ViT."""
    model_path: str = ""
    max_model_len: int = 8192
    allowed_local_media_path: str = ""        # file:// URLs under it; empty: refused
    allowed_media_domains: str = ""           # comma-separated hosts; empty: any host
    allow_private_media_urls: bool = False    # loopback/private/link-local addresses (labs, tests)
    media_fetch_timeout_s: float = 10.0
    max_media_bytes: int = 64 * 2**20
    limit_mm_per_prompt: str = '{"image": 16, "video": 2}'     # JSON, or image=16,video=2 (vLLM's two forms)
    mm_max_concurrent_calls: int = 32
    mm_per_request_timeout: float = 10.0
    use_cuda_ipc_transport: bool = False
    # requests of images only send them unresized, for the vit to resize on its GPU (the launcher:
    # on where the vit runs on one, unless --resize-images-on-host)
    resize_on_vit: bool = False
    # and JPEGs that the vit decodes to the same pixels on its GPU by nvJPEG (processing/jpeg_gpu.py)
    # undecoded (the launcher: with resize_on_vit where nvJPEG loads, unless --decode-images-on-host)
    decode_jpeg_on_vit: bool = False

    def __post_init__(self):
        if not self.model_path:
            raise ConfigError("model_path is required")
        for name in ("max_model_len", "max_media_bytes", "mm_max_concurrent_calls"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("media_fetch_timeout_s", "mm_per_request_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        self.mm_limits = parse_mm_limits(self.limit_mm_per_prompt)

    @classmethod
    def from_settings(cls, settings: dict[str, str]) -> "PreprocessConfig":
        return parse_settings(cls, settings, "preprocess")

    def media_policy(self):
        from .processing.media import MediaPolicy

        hosts = tuple(h.strip().lower() for h in self.allowed_media_domains.split(",") if h.strip())
        return MediaPolicy(allowed_local_dir=self.allowed_local_media_path or None,
                           fetch_timeout_s=self.media_fetch_timeout_s, max_bytes=self.max_media_bytes,
                           allowed_domains=hosts or None, allow_private=self.allow_private_media_urls)

    def limits(self):
        from .serving.preprocess import PreprocessLimits

        return PreprocessLimits(self.max_model_len, self.mm_limits["image"], self.mm_limits["video"])
