"""Write a complete, small HF-format Qwen3-VL checkpoint with seeded random weights.

    python -m qwen3vl_backend.tools.make_tiny_checkpoint OUT [--dense] [--seed N]

Real vocabulary and special tokens, real chat template and processor configs, the released
tensor names and layouts (fused experts (E, H, 2I) / (E, I, H)), sharded with an index; small
sizes with the real structure: several layers and experts, GQA, all three DeepStack levels.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..loader import build_model, checkpoint_tensors
from ..model_config import DENSE_ARCH, MOE_ARCH, ModelConfig
from .build_tokenizer import write_tokenizer_files

DATA = Path(__file__).resolve().parent.parent / "data"


def tiny_config(dense: bool) -> dict:
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
    if dense:
        text.update(model_type="qwen3_vl_text", tie_word_embeddings=True)
        vision["model_type"] = "qwen3_vl"
        arch, model_type, tie = DENSE_ARCH, "qwen3_vl", True
    else:
        text.update(model_type="qwen3_vl_moe_text", decoder_sparse_step=1, mlp_only_layers=[],
                    moe_intermediate_size=48, norm_topk_prob=True, num_experts=8, num_experts_per_tok=2)
        vision["model_type"] = "qwen3_vl_moe"
        arch, model_type, tie = MOE_ARCH, "qwen3_vl_moe", False
    return {
        "architectures": [arch], "model_type": model_type, "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "text_config": text, "tie_word_embeddings": tie, "vision_config": vision,
    }


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


def make_tiny_checkpoint(out: str | Path, dense: bool = False, seed: int = 0, shards: int = 2) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = tiny_config(dense)
    state = _random_state(build_model(ModelConfig.from_dict(cfg_dict), "meta", torch.float32), seed)
    _save_sharded(state, out, shards)
    return write_model_dir(out, cfg_dict)


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
    args = ap.parse_args(argv)
    print(make_tiny_checkpoint(args.out, args.dense, args.seed))


if __name__ == "__main__":
    main()
