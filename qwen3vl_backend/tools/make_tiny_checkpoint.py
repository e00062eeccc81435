"""Write a complete, small HF-format Qwen3-VL checkpoint with seeded random weights.

    python -m qwen3vl_backend.tools.make_tiny_checkpoint OUT [--dense] [--seed N]

Real vocabulary and special tokens, real chat template and processor configs, the released
tensor names and layouts (fused experts (E, H, 2I) / (E, I, H)), sharded with an index; small
sizes with the real structure: several layers and experts, GQA, all three DeepStack levels.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen3vl_kernels.fp8 import FP8, dequantize_weight_blocks, quantize_weight_blocks

from ..loader import build_model, checkpoint_tensors
from ..model_config import DENSE_ARCH, MOE_ARCH, ModelConfig, QuantConfig
from .build_tokenizer import write_tokenizer_files

DATA = Path(__file__).resolve().parent.parent / "data"


def tiny_config(dense: bool, fp8_block: tuple[int, int] | None = None) -> dict:
    # Expert matrices must not be square: transformers skips its layout transpose when the
    # shapes already agree, which would hide a transposition bug on either side.
    text = {
        "attention_bias": False, "head_dim": 32, "hidden_act": "silu", "hidden_size": 64,
        "intermediate_size": 128, "max_position_embeddings": 262144, "num_attention_heads": 4,
        "num_hidden_layers": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"},
        "rope_theta": 5000000, "vocab_size": 151936, "dtype": "float32",
    }
    vision = {
        "deepstack_visual_indexes": [1, 2, 3], "depth": 5, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 64,
        "num_heads": 2, "num_position_embeddings": 2304, "out_hidden_size": 64, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    }
    if fp8_block:
        # every merged shard (q/k/v, gate/up, each expert's gate/up) starts on a block boundary,
        # as in the releases; the hidden size (64) stays a partial block at 128
        lcm = math.lcm(*fp8_block)
        text.update(head_dim=64, rope_scaling={**text["rope_scaling"], "mrope_section": [12, 10, 10]},
                    intermediate_size=-(-128 // fp8_block[0]) * fp8_block[0])
    if dense:
        text.update(model_type="qwen3_vl_text", tie_word_embeddings=True)
        vision["model_type"] = "qwen3_vl"
        arch, model_type, tie = DENSE_ARCH, "qwen3_vl", True
    else:
        text.update(model_type="qwen3_vl_moe_text", decoder_sparse_step=1, mlp_only_layers=[],
                    moe_intermediate_size=48 if not fp8_block else _not_square(-(-48 // lcm) * lcm, lcm, 64),
                    norm_topk_prob=True,
                    num_experts=8, num_experts_per_tok=2)
        vision["model_type"] = "qwen3_vl_moe"
        arch, model_type, tie = MOE_ARCH, "qwen3_vl_moe", False
    cfg = {
        "architectures": [arch], "model_type": model_type, "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "text_config": text, "tie_word_embeddings": tie, "vision_config": vision,
    }
    if fp8_block:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(fp8_block),
                                      "modules_to_not_convert": list(QuantConfig.DEFAULT_IGNORED)}
    return cfg


def _not_square(size: int, step: int, hidden: int) -> int:
    """An expert size that is whole blocks and differs from the hidden size (see above)."""
    return size + step if size == hidden else size


def _quantizable(name: str) -> bool:
    """What Qwen's FP8 releases quantize: the decoder's projections and experts (not the vision
    tower, the router, the embeddings, the head or any norm)."""
    return (name.startswith("model.language_model.layers.") and name.endswith("_proj.weight")
            and ".mlp.gate." not in name)


def fp8_state(state: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A float state under the released names -> the FP8 release's: eligible weights as fp8 with
    `weight_scale_inv` block scales, the experts as one tensor per expert."""
    out = {}
    for name, t in state.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            base = name.rsplit(".", 1)[0]
            inter = t.shape[2] // 2 if name.endswith("gate_up_proj") else t.shape[1]
            for e in range(t.shape[0]):
                w = t[e].T                                   # linear layout: (out, in)
                parts = {"gate_proj": w[:inter], "up_proj": w[inter:]} if name.endswith("gate_up_proj") \
                    else {"down_proj": w}
                for proj, part in parts.items():
                    q, scale = quantize_weight_blocks(part, block)
                    out[f"{base}.{e}.{proj}.weight"], out[f"{base}.{e}.{proj}.weight_scale_inv"] = q, scale
        elif _quantizable(name):
            out[name], out[name + "_scale_inv"] = quantize_weight_blocks(t, block)
        else:
            out[name] = t
    return out


def dequantized_state(state: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The inverse for references: fp8 weights times their scales in float32, experts fused again
    in the bf16 release's layout (what transformers loads)."""
    out, experts = {}, {}
    for name, t in state.items():
        if name.endswith("_scale_inv"):
            continue
        w = dequantize_weight_blocks(t, state[name + "_scale_inv"], block) if t.dtype == FP8 else t
        parts = name.split(".")
        if ".mlp.experts." in name:
            base = ".".join(parts[: parts.index("experts") + 1])
            experts.setdefault(base, {}).setdefault(int(parts[parts.index("experts") + 1]), {})[parts[-2]] = w
        else:
            out[name] = w
    for base, per in experts.items():
        n = len(per)
        out[f"{base}.gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]]).T
                                                   for e in range(n)]).contiguous()
        out[f"{base}.down_proj"] = torch.stack([per[e]["down_proj"].T for e in range(n)]).contiguous()
    return out


@torch.no_grad()
def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights under the released names and layouts (drawn in the checkpoint's own terms,
    so they do not depend on how our modules group them). Larger than usual init so the tiny
    model's logits are well separated (greedy is stable)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in sorted(checkpoint_tensors(model).items()):
        if name.endswith("bias"):
            state[name] = torch.randn(t.shape, generator=gen) * 0.02
        elif "norm" in name:
            state[name] = 1.0 + torch.randn(t.shape, generator=gen) * 0.1
        else:
            fan_in = t.shape[-1] if t.dim() > 1 else 1
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                fan_in = t.shape[1]                         # stored (E, in, out)
            std = 1.0 if "embed" in name else fan_in ** -0.5
            state[name] = torch.randn(t.shape, generator=gen) * std
    return state


def write_model_dir(out: str | Path, config: dict) -> Path:
    """A checkpoint directory without weights (config, tokenizer, processor files): for `dummy` loads."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
                 "generation_config.json"):
        shutil.copyfile(DATA / name, out / name)
    write_tokenizer_files(out)
    return out


def make_tiny_checkpoint(out: str | Path, dense: bool = False, seed: int = 0, shards: int = 2,
                         fp8_block: tuple[int, int] | None = None) -> Path:
    """`fp8_block`: an FP8 checkpoint in the releases' layout (block-scaled e4m3, per-expert
    tensors) with that block; 128 x 128 as released, a smaller one for multi-block scale grids."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = tiny_config(dense, fp8_block)
    plain = {k: v for k, v in cfg_dict.items() if k != "quantization_config"}
    state = _random_state(build_model(ModelConfig.from_dict(plain), "meta", torch.float32), seed)
    _save_sharded(fp8_state(state, fp8_block) if fp8_block else state, out, shards)
    return write_model_dir(out, cfg_dict)


def write_dequantized(src: str | Path, out: str | Path) -> Path:
    """An FP8 checkpoint dequantized to a float32 one (the reference transformers runs)."""
    from safetensors.torch import load_file

    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    out.mkdir(parents=True, exist_ok=True)
    _save_sharded(dequantized_state(state, tuple(qc["weight_block_size"])), out, 2)
    return write_model_dir(out, cfg)


def _save_sharded(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    names = sorted(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(out / file), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = file
            total += state[n].numel() * state[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--dense", action="store_true", help="dense Qwen3-VL (default: MoE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp8", action="store_true", help="block-scaled FP8 in the releases' layout")
    ap.add_argument("--fp8-block", type=int, nargs=2, default=(128, 128), metavar=("BN", "BK"))
    args = ap.parse_args(argv)
    print(make_tiny_checkpoint(args.out, args.dense, args.seed, fp8_block=tuple(args.fp8_block) if args.fp8 else None))


if __name__ == "__main__":
    main()
