"""CUDA IPC transport of pixels and --keep-mm-feature-on-device, end to end on a GPU.

Two servers on the tiny checkpoint, the host path and the device path (pixels from preprocess
to vit as CUDA tensors and unresized, visual features from vit to llm likewise): the same greedy answers, and
Triton's counters show where the tensors arrived. Skipped without a CUDA device. On the GPU
machine it runs under the Triton bundle's Python (numpy < 2 for the stub):
    source .gpu-bundle/activate.sh .gpu-bundle && /tmp/pyenv/bin/python -m pytest tests/test_server_gpu.py
"""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from conftest import data_uri, image_bytes, make_image, start_server
from qwen3vl_backend.launch import write_repository
from qwen3vl_backend.supervisor import Server

pytestmark = [pytest.mark.server, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
MESSAGES = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(w, h, s)))}},
                                          {"type": "text", "text": "Describe it."}]}]
            for w, h, s in ((200, 150, 51), (96, 300, 52), (333, 257, 53))]
# and a JPEG, which the device path sends undecoded for nvJPEG (decode_jpeg_on_vit): no pixels travel
JPEG = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(
    image_bytes(make_image(640, 480, 54), "JPEG"), "image/jpeg")}}, {"type": "text", "text": "Describe it."}]}]


def _serve(tiny_moe, root, on_device: bool) -> Server:
    gpu = {"model_path": str(tiny_moe), "device": "cuda", "dtype": "bfloat16"}
    repo = write_repository(root / "repo", {
        # the device path also sends images unresized, for the vit to resize on the GPU
        "preprocess": {"model_path": str(tiny_moe), "use_cuda_ipc_transport": "1" if on_device else "0",
                       "resize_on_vit": str(on_device).lower(), "decode_jpeg_on_vit": str(on_device).lower()},
        "vit": {**gpu, "vlm_cache_size_mb": "0", "keep_mm_feature_on_device": str(on_device).lower()},
        "llm": {**gpu, "max_model_len": "2048", "num_kv_blocks": "512"},
    })
    return start_server(repo, root, cuda_pool_mb=256 if on_device else 0)


def _answers_and_counters(srv: Server):
    answers = []
    for messages in [*MESSAGES, JPEG]:
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120,
                       json={"model": "tiny-moe", "messages": messages, "temperature": 0, "max_tokens": 16})
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
    text = httpx.get(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).text
    counters = {(fam, m.group(1)): float(m.group(2))
                for fam in ("qwen3vl_vit_pixels_total", "qwen3vl_llm_visual_features_total")
                for m in re.finditer(rf'^{fam}\{{[^}}]*where="(\w+)"[^}}]*\}} ([0-9.e+-]+)$', text, re.M)}
    return answers, counters


def test_device_transport_gives_the_host_paths_answers(tiny_moe, tmp_path):
    results = {}
    for on_device in (False, True):
        srv = _serve(tiny_moe, tmp_path / str(on_device), on_device)
        try:
            results[on_device] = _answers_and_counters(srv)
        finally:
            srv.stop()
    (host_answers, host_counts), (dev_answers, dev_counts) = results[False], results[True]
    assert dev_answers == host_answers
    n = len(MESSAGES) + 1
    for fam in ("qwen3vl_vit_pixels_total", "qwen3vl_llm_visual_features_total"):
        assert host_counts[(fam, "host")] == n and host_counts[(fam, "gpu")] == 0
        # the JPEG's pixels are made on the vit's GPU: none arrive there
        sent = n - 1 if fam == "qwen3vl_vit_pixels_total" else n
        assert dev_counts[(fam, "gpu")] == sent and dev_counts[(fam, "host")] == 0
