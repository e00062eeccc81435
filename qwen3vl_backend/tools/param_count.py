"""Build a model on the meta device (no memory) and report its parameter count.

    python -m qwen3vl_backend.tools.param_count CONFIG_OR_DIR   # e.g. the bundled 30B-A3B config
"""

import argparse
import json

from ..loader import build_model, count_parameters
from ..model_config import ModelConfig


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="config.json or a checkpoint directory")
    args = ap.parse_args(argv)
    cfg = ModelConfig.from_path(args.config)
    model = build_model(cfg, "meta")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(json.dumps({"architecture": cfg.architecture, "parameters": count_parameters(model),
                      "expert_parameters": experts, "device": "meta"}))


if __name__ == "__main__":
    main()
