"""The llm's visual features out of Triton's CUDA memory pool (serving/triton_tensors.off_the_pool)."""

from __future__ import annotations

import pytest
import torch

from qwen3vl_backend.serving.triton_tensors import off_the_pool


def test_host_features_and_non_float_tensors_pass_through_untouched():
    host = torch.randn(4, 8)
    assert off_the_pool(host, torch.bfloat16) is host
    if torch.cuda.is_available():
        ids = torch.arange(6, device="cuda")
        assert off_the_pool(ids, torch.bfloat16) is ids       # the engine refuses them with its 400


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_features_become_the_engines_own_copy_in_its_dtype(dtype):
    """A copy (never a view of the pool's block, even where the dtype already matches) holding the
    values the engine's own cast would give."""
    pooled = torch.randn(3, 920, 64, device="cuda")
    own = off_the_pool(pooled, dtype)
    assert own.dtype == dtype and own.device == pooled.device
    assert own.untyped_storage().data_ptr() != pooled.untyped_storage().data_ptr()
    assert torch.equal(own, pooled.to(dtype))
    pooled.fill_(7.0)                   # the pool's block reused by another request
    assert not torch.equal(own, pooled.to(dtype))
