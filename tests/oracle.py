"""transformers' Qwen3-VL as the parity oracle (test-only; never imported by the product).

torchvision on PyPI is a CUDA build whose C extension cannot load beside the CPU torch wheel;
transformers' Qwen3-VL processors use only its pure-PyTorch transforms and import once the two
operator schemas below exist.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if torch.version.cuda is None:       # the CPU wheel; on a GPU host torchvision's own extension loads
    for _op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{_op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass  # already defined in this process

import transformers  # noqa: E402
from transformers import AutoProcessor  # noqa: E402


def load_reference(path, dtype=torch.float32):
    """(processor, model) from transformers, offline, in float32 eager attention."""
    import json

    arch = json.load(open(os.path.join(path, "config.json")))["architectures"][0]
    cls = getattr(transformers, arch)
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(path)
    return processor, model
