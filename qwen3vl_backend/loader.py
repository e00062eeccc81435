"""Weights: HF-format safetensors (single or sharded) mapped onto our parameters by a table.

Each table row maps a checkpoint-name pattern to our parameter and a shard id; the parameter's
own `weight_loader(param, tensor, shard_id[, expert_id])` (layers/linear.py, layers/moe.py)
puts the tensor (this rank's slice of it) where it belongs: q/k/v into the fused qkv weight,
gate/up into the merged one, the experts from either the released fused tensors or one tensor
per expert. Anything missing, unexpected, mis-shaped or incomplete fails the load with its name.
`dummy` builds random weights at the config's shapes with no files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qwen3vl_kernels.fp8 import FP8

from .layers.linear import ShapeMismatch, default_weight_loader
from .model_config import ModelConfig, QuantConfig
from .models.qwen3_vl import Qwen3VLForConditionalGeneration
from .models.vision import VisionModel
from .parallel import Parallel

_EXPERTS = r"(model\.language_model\.layers\.\d+\.mlp\.experts)"
_LM = r"(model\.language_model\.layers\.\d+)"
# (pattern, target, shard): the first matching row wins; targets use the pattern's groups; shard
# is None (the whole tensor) or a function of the match -> (shard id, expert id or None).
WEIGHT_TABLE: list[tuple[str, str, object]] = [
    (_EXPERTS + r"\.gate_up_proj$", r"\1.w13", lambda m: ("gate_up", None)),
    (_EXPERTS + r"\.down_proj$", r"\1.w2", lambda m: ("down", None)),
    (_EXPERTS + r"\.(\d+)\.(gate|up)_proj\.weight$", r"\1.w13", lambda m: (m.group(3), int(m.group(2)))),
    (_EXPERTS + r"\.(\d+)\.down_proj\.weight$", r"\1.w2", lambda m: ("down", int(m.group(2)))),
    (_EXPERTS + r"\.(\d+)\.(gate|up)_proj\.weight_scale_inv$", r"\1.w13_weight_scale_inv",
     lambda m: (m.group(3), int(m.group(2)))),
    (_EXPERTS + r"\.(\d+)\.down_proj\.weight_scale_inv$", r"\1.w2_weight_scale_inv", lambda m: ("down", int(m.group(2)))),
    (_LM + r"\.self_attn\.(q|k|v)_proj\.(weight|bias|weight_scale_inv)$", r"\1.self_attn.qkv_proj.\3",
     lambda m: (m.group(2), None)),
    (_LM + r"\.mlp\.(gate|up)_proj\.(weight|weight_scale_inv)$", r"\1.mlp.gate_up_proj.\3",
     lambda m: (0 if m.group(2) == "gate" else 1, None)),
    (r"^(model\.(visual|language_model)\..+|lm_head\.weight)$", r"\1", None),
]
_COMPILED = [(re.compile(p), t, shard) for p, t, shard in WEIGHT_TABLE]


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under the released checkpoint's names and layouts (the table's inverse):
    what make_tiny_checkpoint writes, and how the tests read a model back."""
    out = {}
    tied = getattr(model.cfg, "tie_word_embeddings", False)
    for name, p in model.named_parameters():
        t = p.detach()
        if tied and name == "lm_head.weight":
            continue
        if name.endswith(".qkv_proj.weight") or name.endswith(".qkv_proj.bias"):
            attn = model.get_submodule(name.rsplit(".", 2)[0]).qkv_proj
            q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
            base, kind = name.rsplit(".qkv_proj.", 1)
            for shard, part in zip("qkv", t.split([q, kv, kv])):
                out[f"{base}.{shard}_proj.{kind}"] = part.contiguous()
        elif name.endswith(".mlp.gate_up_proj.weight"):
            gate, up = t.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            out[name.replace("gate_up_proj", "up_proj")] = up.contiguous()
        elif name.endswith("mlp.experts.w13"):
            out[name[: -len("w13")] + "gate_up_proj"] = t.transpose(1, 2).contiguous()
        elif name.endswith("mlp.experts.w2"):
            out[name[: -len("w2")] + "down_proj"] = t.transpose(1, 2).contiguous()
        else:
            out[name] = t.contiguous()
    return out


class WeightLoadError(ValueError):
    pass


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                par: Parallel = Parallel()):
    """The model (this rank's shard under `par`) with uninitialised storage on `device` (meta
    allocates nothing). `dtype` is the default for every parameter; quantized weights and their
    scales keep their own."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration(cfg, par)
    finally:
        torch.set_default_dtype(previous)
    return model.eval() if str(device) == "meta" else materialize(model, device)


def materialize(model: Qwen3VLForConditionalGeneration, device) -> Qwen3VLForConditionalGeneration:
    """A meta-built model's uninitialised storage on `device`, embeddings tied where the config says."""
    loaders = {n: p.weight_loader for n, p in model.named_parameters() if hasattr(p, "weight_loader")}
    model = model.to_empty(device=device)
    for name, p in model.named_parameters():      # to_empty made new Parameters: hand the loaders on
        if name in loaders:
            p.weight_loader = loaders[name]
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters in their dtype (a meta-built model: nothing is allocated)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory where the weights would go: the GPU's, or the host's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_weights_fit(model: nn.Module, device, what: str) -> None:
    """Refuse, before allocating, weights that cannot fit (instead of an out-of-memory failure
    half-way through the load, or the host killing the process)."""
    device = torch.device(device)
    need = weight_bytes(model)
    free = free_memory_bytes(device)
    if free is not None and need > free:
        raise WeightLoadError(
            f"{what}: the weights need {need / 1e9:.1f} GB ({next(model.parameters()).dtype}) but {device} has "
            f"{free / 1e9:.1f} GB free; use a device with more memory, a smaller model, more GPUs "
            f"(--tp) or fp8 (--quantization fp8)")


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors in {path}")
    return files


def load_weights(model: nn.Module, path: str | Path, prefix: str = "") -> set[str]:
    """Hand every checkpoint tensor to its parameter's loader; returns the parameter names loaded.

    With `prefix` (e.g. "model.visual."), `model` is that submodule: only tensors under the
    prefix are read, and every one of the submodule's parameters must be among them.
    """
    path = Path(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    pieces: dict[str, set] = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if not name.startswith(prefix):
                    continue
                for pattern, target, shard in _COMPILED:
                    m = pattern.search(name)
                    if m:
                        break
                else:
                    raise WeightLoadError(f"unexpected tensor {name!r} in {file.name}")
                pname = m.expand(target)[len(prefix):]
                if pname.startswith("model.visual.") and getattr(getattr(model, "model", None), "visual", True) is None:
                    continue                    # a tensor-parallel rank other than 0: no vision tower
                if pname not in params:
                    raise WeightLoadError(f"unexpected tensor {name!r} in {file.name} (no parameter {pname})")
                param = params[pname]
                loader = getattr(param, "weight_loader", default_weight_loader)
                shard_id, expert = shard(m) if shard is not None else (None, None)
                try:
                    if expert is None:
                        loader(param, f.get_tensor(name), shard_id)
                    else:
                        loader(param, f.get_tensor(name), shard_id, expert)
                except ShapeMismatch as e:
                    raise WeightLoadError(f"{name}: {e}") from None
                pieces.setdefault(pname, set()).add((shard_id, expert))
    quant = getattr(model.cfg, "quant", None)
    if quant is not None and quant.online:        # scales came with their weights, quantized on load
        for name in params:
            if name.endswith("weight_scale_inv"):
                owner = name.removesuffix("_scale_inv") if name.endswith(".weight_scale_inv") \
                    else name.removesuffix("_weight_scale_inv")
                if owner in pieces:
                    pieces[name] = pieces[owner]
    _check_complete(model, params, pieces, path)
    return set(pieces) | ({"lm_head.weight"} if getattr(model.cfg, "tie_word_embeddings", False) else set())


def _check_complete(model, params: dict, pieces: dict[str, set], path: Path) -> None:
    """Every parameter loaded, and every piece of a merged one (q/k/v, gate/up, all experts)."""
    tied = getattr(model.cfg, "tie_word_embeddings", False)
    missing = sorted(n for n in params if n not in pieces and not (tied and n == "lm_head.weight"))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightLoadError(f"checkpoint {path} lacks {len(missing)} tensors: {missing[:5]}{more}")
    for pname, got in pieces.items():
        ids = {shard for shard, _ in got}
        if ids & {"q", "k", "v"} and ids != {"q", "k", "v"}:
            raise WeightLoadError(f"{pname}: the checkpoint has {sorted(ids)} of q, k, v")
        if ".gate_up_proj." in pname and ids != {0, 1}:
            raise WeightLoadError(f"{pname}: the checkpoint lacks the {'gate' if 0 not in ids else 'up'} projection")
        experts = {e for _, e in got if e is not None}
        if experts:
            e = model.get_submodule(pname.rsplit(".", 1)[0]).num_experts
            want = e * (2 if ".w13" in pname else 1)
            if len(got) != want:
                raise WeightLoadError(f"{pname}: {len(got)} per-expert tensors in the checkpoint, expected {want}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights at real shapes: norms at one, biases zero, the rest small normal noise.

    Seeded per device, so every process that builds the same model gets the same weights (the
    `vit` and `llm` Triton models, or two launches being compared).
    """
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        elif name.endswith("weight_scale_inv"):
            p.fill_(0.02 / 64)                   # fp8 values ~N(0, 64) below: weights ~N(0, 0.02)
        elif p.dtype == FP8:
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            for part in (p.data if p.dim() == 3 else p.data[None]):       # an expert at a time
                part.copy_(torch.empty(part.shape, device=p.device).normal_(0.0, 64.0, generator=gen).clamp_(-448, 448))
        else:
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            p.normal_(0.0, 0.02, generator=gen)


def load_vision_model(path: str | Path, device="cpu", dtype=torch.float32, load_format: str = "auto") -> VisionModel:
    """Only the vision tower (the `vit` Triton model): the decoder's weights are never read."""
    cfg = ModelConfig.from_path(path)
    with torch.device("meta"):
        model = VisionModel(cfg.vision).to(dtype)
    check_weights_fit(model, device, f"the vision tower of {Path(path).name}")
    model = model.to_empty(device=device).eval()
    if load_format == "dummy":
        init_dummy_weights(model)
    elif load_format == "auto":
        load_weights(model, path, prefix="model.visual.")
    else:
        raise ValueError(f"unknown load format {load_format!r}: expected auto or dummy")
    return model


def model_config(path: str | Path, quantization: str = "") -> ModelConfig:
    """The checkpoint's config; `quantization="fp8"` quantizes a bf16 checkpoint's eligible weights
    as they load (SGLang's and vLLM's --quantization fp8; a checkpoint already fp8 is as it is)."""
    cfg = ModelConfig.from_path(path)
    if quantization == "fp8" and cfg.quant is None:
        cfg = dataclasses.replace(cfg, quant=QuantConfig.online_fp8())
    elif quantization not in ("", "fp8"):
        raise ValueError(f"unknown quantization {quantization!r}: expected fp8")
    return cfg


def load_model(path: str | Path, device="cpu", dtype=torch.float32, load_format: str = "auto", quantization: str = "",
               par: Parallel = Parallel()):
    """Build and fill the model (this rank's shard): `auto` reads safetensors, `dummy` draws
    random weights."""
    cfg = model_config(path, quantization)
    model = build_model(cfg, "meta", dtype, par)
    check_weights_fit(model, device, Path(path).name + (f" (rank {par.tp_rank} of {par.tp_size})" if par.tp_size > 1 else ""))
    model = materialize(model, device)
    if load_format == "dummy":
        init_dummy_weights(model)
    elif load_format == "auto":
        load_weights(model, path)
    else:
        raise ValueError(f"unknown load format {load_format!r}: expected auto or dummy")
    return model
