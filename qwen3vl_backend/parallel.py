"""Tensor and expert parallelism: who holds which slice, and how a step reaches every rank.

SGLang's semantics: `--tp N` shards attention, dense MLPs, the embedding and the head over N
ranks; `--ep M` (M divides N) splits each MoE layer's experts into M groups of whole experts,
and the N / M ranks of a group split their experts' intermediate dimension (`--tp` alone: M = 1,
every rank a slice of every expert). Either way each rank's MoE output is a partial sum, combined
by the same all-reduce as a row-parallel layer's.

Rank 0 is the engine: scheduler, block manager, prefix cache, ViT, sampler. Each step it
broadcasts a small header (the batch's shape and host-side lists) over a gloo group and the
step's input tensors over the default group (NCCL on GPUs, gloo on CPU); ranks 1..N-1
(`python -m qwen3vl_backend.engine.tp_worker`, started by rank 0) run the same forward on their
shards and their own KV caches and CUDA graphs. Sampling happens once, on rank 0, after the
vocab-parallel head's logits are gathered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# NVLink multicast (NVLS) can take a shared host's GPUs out of service: off in every process we start
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# every rank on the engine's one GPU, collectives over gloo, no CUDA graphs (gloo's collectives
# cannot be captured): tensor parallelism's arithmetic on a one-GPU host, for tests; slow. With
# QWEN3VL_PEER_ALLREDUCE=1 the sums go through qwen3vl_kernels/allreduce.py between the two processes
ONE_DEVICE_ENV = "QWEN3VL_TP_ONE_DEVICE"


def one_device() -> bool:
    return os.environ.get(ONE_DEVICE_ENV) == "1"


def disable_multicast(env: dict | None = None) -> dict:
    """Set the variables that keep NVLS off (in `env`, else this process's environment)."""
    target = os.environ if env is None else env
    target.update(NO_MULTICAST)
    return target


# the two-GPU one-shot all-reduce (qwen3vl_kernels/allreduce.py) when the runner set one up, else None
_peer_all_reduce = None


def set_peer_all_reduce(fn) -> None:
    global _peer_all_reduce
    _peer_all_reduce = fn


def all_reduce(t) -> None:
    """Sum `t` in place over the tensor-parallel ranks: the peer all-reduce where it takes the
    tensor (two GPUs, up to its capacity), else torch.distributed (NCCL, gloo on CPU)."""
    if _peer_all_reduce is not None and _peer_all_reduce(t):
        return
    import torch.distributed as dist

    dist.all_reduce(t)


@dataclass(frozen=True)
class Parallel:
    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1

    def __post_init__(self):
        if self.tp_size < 1 or self.ep_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"bad parallel layout tp={self.tp_size} rank={self.tp_rank} ep={self.ep_size}")
        if self.tp_size % self.ep_size:
            raise ValueError(f"--ep {self.ep_size} must divide --tp {self.tp_size}")

    @property
    def moe_tp_size(self) -> int:
        """Ranks that split one expert group's intermediate dimension."""
        return self.tp_size // self.ep_size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank % self.moe_tp_size

    @property
    def ep_rank(self) -> int:
        return self.tp_rank // self.moe_tp_size


def check_moe_split(num_experts: int, intermediate: int, tp: int, ep: int,
                    block: tuple[int, int] | None = None) -> None:
    """Refuse a layout the experts cannot take, naming the --ep that works (as SGLang does)."""
    if ep > 1 and num_experts % ep:
        raise ValueError(f"--ep {ep}: {num_experts} experts do not split into {ep} groups")
    moe_tp = tp // ep
    if intermediate % moe_tp == 0 and (block is None or (intermediate // moe_tp) % block[0] == 0
                                       and (intermediate // moe_tp) % block[1] == 0):
        return
    works = [e for e in range(1, tp + 1) if tp % e == 0 and num_experts % e == 0
             and intermediate % (tp // e) == 0
             and (block is None or (intermediate // (tp // e)) % block[0] == 0
                  and (intermediate // (tp // e)) % block[1] == 0)]
    what = f"fp8 blocks of {list(block)}" if block else "equal slices"
    hint = f"; use --ep {works[0]}" if works else ""
    raise ValueError(f"--tp {tp} --ep {ep}: each rank's slice of the expert intermediate size {intermediate} "
                     f"is {intermediate / moe_tp:g}, not {what}{hint}")
