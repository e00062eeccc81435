"""Weights: HF-format safetensors (single or sharded) mapped onto our parameters by a table.

Each table row is (checkpoint-name pattern, our parameter name, how to place the tensor).
Placement is "copy", "transpose" (the released fused experts are stored (E, H, 2I) and
(E, I, H); we keep linear-layout (E, 2I, H) and (E, H, I)), or one expert's gate/up/down shard
for checkpoints with per-expert tensors. Anything missing, unexpected or mis-shaped fails the
load with its name. `dummy` builds random weights at the config's shapes with no files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .model_config import ModelConfig
from .models.qwen3_vl import Qwen3VLForConditionalGeneration
from .models.vision import VisionModel

_EXPERTS = r"(model\.language_model\.layers\.\d+\.mlp\.experts)"
# (pattern, target, placement); the first matching row wins; targets use the pattern's groups.
WEIGHT_TABLE: list[tuple[str, str, str]] = [
    (_EXPERTS + r"\.gate_up_proj$", r"\1.w13", "transpose"),
    (_EXPERTS + r"\.down_proj$", r"\1.w2", "transpose"),
    (_EXPERTS + r"\.(\d+)\.gate_proj\.weight$", r"\1.w13", "expert:gate"),
    (_EXPERTS + r"\.(\d+)\.up_proj\.weight$", r"\1.w13", "expert:up"),
    (_EXPERTS + r"\.(\d+)\.down_proj\.weight$", r"\1.w2", "expert:down"),
    (r"^(model\.(visual|language_model)\..+|lm_head\.weight)$", r"\1", "copy"),
]
_COMPILED = [(re.compile(p), t, how) for p, t, how in WEIGHT_TABLE]


class WeightLoadError(ValueError):
    pass


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The model with uninitialised storage on `device` (meta allocates nothing)."""
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg).to(dtype)     # cast while nothing is allocated
    return model.eval() if str(device) == "meta" else materialize(model, device)


def materialize(model: Qwen3VLForConditionalGeneration, device) -> Qwen3VLForConditionalGeneration:
    """A meta-built model's uninitialised storage on `device`, embeddings tied where the config says."""
    model = model.to_empty(device=device)
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
            f"{free / 1e9:.1f} GB free; use a device with more memory or a smaller model "
            f"(tensor and expert parallelism are not implemented in this build)")


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors in {path}")
    return files


def _place(param: torch.Tensor, tensor: torch.Tensor, how: str, match: re.Match, name: str) -> None:
    raw_shape = tuple(tensor.shape)
    if how == "transpose":
        tensor = tensor.transpose(1, 2)
        dst = param.data
    elif how.startswith("expert:"):
        expert, shard = int(match.group(2)), how.split(":")[1]
        dst = param.data[expert]
        if shard != "down":
            half = dst.shape[0] // 2
            dst = dst[:half] if shard == "gate" else dst[half:]
    else:
        dst = param.data
    if tuple(dst.shape) != tuple(tensor.shape):
        want = tuple(dst.shape)
        if how == "transpose":
            want = (want[0], want[2], want[1])
        raise WeightLoadError(f"{name}: checkpoint shape {raw_shape}, expected {want}")
    dst.copy_(tensor.to(dst.dtype))


def load_weights(model: nn.Module, path: str | Path, prefix: str = "") -> set[str]:
    """Copy every checkpoint tensor into its parameter; returns the parameter names loaded.

    With `prefix` (e.g. "model.visual."), `model` is that submodule: only tensors under the
    prefix are read, and every one of the submodule's parameters must be among them.
    """
    path = Path(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    expert_shards: dict[str, int] = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if not name.startswith(prefix):
                    continue
                for pattern, target, how in _COMPILED:
                    m = pattern.search(name)
                    if m:
                        break
                else:
                    raise WeightLoadError(f"unexpected tensor {name!r} in {file.name}")
                pname = m.expand(target)[len(prefix):]
                if pname not in params:
                    raise WeightLoadError(f"unexpected tensor {name!r} in {file.name} (no parameter {pname})")
                _place(params[pname], f.get_tensor(name), how, m, name)
                if how.startswith("expert:"):
                    expert_shards[pname] = expert_shards.get(pname, 0) + 1
                loaded.add(pname)
    cfg = model.cfg
    for pname, n in expert_shards.items():
        want = cfg.text.num_experts * (2 if pname.endswith("w13") else 1)
        if n != want:
            raise WeightLoadError(f"{pname}: {n} per-expert tensors in the checkpoint, expected {want}")
    if getattr(cfg, "tie_word_embeddings", False):
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightLoadError(f"checkpoint {path} lacks {len(missing)} tensors: {missing[:5]}{more}")
    return loaded


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


def load_model(path: str | Path, device="cpu", dtype=torch.float32, load_format: str = "auto"):
    """Build and fill the model: `auto` reads safetensors, `dummy` draws random weights."""
    cfg = ModelConfig.from_path(path)
    model = build_model(cfg, "meta", dtype)
    check_weights_fit(model, device, Path(path).name)
    model = materialize(model, device)
    if load_format == "dummy":
        init_dummy_weights(model)
    elif load_format == "auto":
        load_weights(model, path)
    else:
        raise ValueError(f"unknown load format {load_format!r}: expected auto or dummy")
    return model
