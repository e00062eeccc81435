"""Model architecture read from an HF-format Qwen3-VL `config.json` (dense or MoE).

Only the fields the model code needs, with the released defaults. Leaf layers never see these
dataclasses: they take plain numbers (habit 3 of STYLE.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MOE_ARCH = "Qwen3VLMoeForConditionalGeneration"
DENSE_ARCH = "Qwen3VLForConditionalGeneration"


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    mrope_interleaved: bool = True
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's `quantization_config` (Qwen's FP8 releases: quant_method fp8, fmt e4m3,
    activation_scheme dynamic, weight_block_size [bn, bk]), or `--quantization fp8` applied to a
    bf16 checkpoint as it loads (`online`). `ignored` names modules that stay unquantized."""
    method: str = "fp8"
    block: tuple[int, int] = (128, 128)
    ignored: tuple[str, ...] = ()
    online: bool = False

    # what the releases leave in bf16, and what --quantization fp8 leaves too
    DEFAULT_IGNORED = ("model.visual", "mlp.gate", "embed_tokens", "lm_head")

    def skips(self, *names: str) -> bool:
        """Whether modules with these (checkpoint) names stay unquantized: an entry names the
        module, a module above it, or the end of its dotted name (`mlp.gate`)."""
        for name in names:
            for entry in self.ignored:
                if name == entry or name.startswith(entry + ".") or name.endswith("." + entry):
                    return True
        return False

    @classmethod
    def from_hf(cls, qc: dict | None) -> "QuantConfig | None":
        if not qc:
            return None
        method = qc.get("quant_method")
        if method != "fp8":
            raise ValueError(f"quantization_config quant_method {method!r} is not supported (fp8 block is)")
        if qc.get("fmt", "e4m3") != "e4m3" or qc.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"fp8 checkpoints must be e4m3 with dynamic activations, got fmt={qc.get('fmt')!r} "
                             f"activation_scheme={qc.get('activation_scheme')!r}")
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"fp8 checkpoints need weight_block_size [bn, bk], got {block!r} (per-tensor fp8 is "
                             "not supported)")
        ignored = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ()
        return cls("fp8", (block[0], block[1]), tuple(ignored))

    @classmethod
    def online_fp8(cls) -> "QuantConfig":
        return cls("fp8", (128, 128), cls.DEFAULT_IGNORED, online=True)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    torch_dtype: str = "bfloat16"
    quant: QuantConfig | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.text.num_experts > 0

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else (MOE_ARCH if cfg.get("model_type") == "qwen3_vl_moe" else DENSE_ARCH)
        if arch not in (MOE_ARCH, DENSE_ARCH):
            raise ValueError(f"unsupported architecture {arch!r}: expected {DENSE_ARCH} or {MOE_ARCH}")
        if "text_config" not in cfg or "vision_config" not in cfg:
            raise ValueError("config.json lacks text_config or vision_config: not a Qwen3-VL checkpoint")
        return cls(
            architecture=arch,
            text=_text_config(cfg["text_config"]),
            vision=_vision_config(cfg["vision_config"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", cfg["text_config"].get("tie_word_embeddings", False))),
            image_token_id=cfg.get("image_token_id", 151655),
            video_token_id=cfg.get("video_token_id", 151656),
            vision_start_token_id=cfg.get("vision_start_token_id", 151652),
            vision_end_token_id=cfg.get("vision_end_token_id", 151653),
            torch_dtype=cfg["text_config"].get("dtype") or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16",
            quant=QuantConfig.from_hf(cfg.get("quantization_config") or cfg["text_config"].get("quantization_config")),
            raw=cfg,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no config.json at {file}")
        return cls.from_dict(json.loads(file.read_text()))


def _text_config(t: dict) -> TextConfig:
    rope = t.get("rope_scaling") or t.get("rope_parameters") or {}
    theta = t.get("rope_theta", rope.get("rope_theta", 5_000_000.0))
    kw = dict(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
        max_position_embeddings=t.get("max_position_embeddings", 262144),
        attention_bias=bool(t.get("attention_bias", False)),
    )
    if t.get("num_experts"):
        kw.update(
            num_experts=t["num_experts"],
            num_experts_per_tok=t["num_experts_per_tok"],
            moe_intermediate_size=t["moe_intermediate_size"],
            norm_topk_prob=bool(t.get("norm_topk_prob", True)),
            decoder_sparse_step=t.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(t.get("mlp_only_layers", ())),
        )
    if sum(kw["mrope_section"]) * 2 != kw["head_dim"]:
        raise ValueError(f"mrope_section {kw['mrope_section']} does not cover head_dim {kw['head_dim']}")
    return TextConfig(**kw)


def _vision_config(v: dict) -> VisionConfig:
    rope = v.get("rope_parameters") or {}
    return VisionConfig(
        depth=v["depth"],
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"],
        in_channels=v.get("in_channels", 3),
        patch_size=v.get("patch_size", 16),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        out_hidden_size=v["out_hidden_size"],
        num_position_embeddings=v.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", ())),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )
